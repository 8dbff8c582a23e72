"""Evaluation: protocols and per-pair scores on prepared data (`protocols`), result files and the
paired comparison (`statistics`), native-resolution evaluation of the original files
(`native`), and the classical baselines (`baselines`).
"""
