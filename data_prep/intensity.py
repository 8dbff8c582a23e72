"""Intensity normalisation: CT window/level, MRI percentile scaling, histogram matching.

All outputs are float32 in [0, 1].
"""

import numpy as np

MATCH_QUANTILES = np.linspace(0.0, 1.0, 101)


def window_level(data, width, level):
    """CT window: ``[level - width/2, level + width/2]`` HU -> [0, 1], clipped outside."""
    low = level - width / 2.0
    return np.clip((np.asarray(data, np.float32) - low) / width, 0.0, 1.0).astype(np.float32)


def percentile_scale(data, low_percentile, high_percentile):
    """Clip to the volume's own percentiles and rescale to [0, 1] (MRI: arbitrary units)."""
    data = np.asarray(data, np.float32)
    low, high = np.percentile(data, [low_percentile, high_percentile])
    if high <= low:
        high = low + 1.0
    return np.clip((data - low) / (high - low), 0.0, 1.0).astype(np.float32)


def match_histogram(data, reference_quantiles, mask):
    """Map ``data`` so the quantiles of its ``mask`` voxels match ``reference_quantiles``.

    A piecewise-linear monotone map through the quantiles at :data:`MATCH_QUANTILES`, anchored
    so 0 -> 0 and 1 -> 1 (saturated CT voxels stay saturated). Voxels outside the mask are
    mapped with the same curve.
    """
    if mask.sum() < 2:
        return data
    source = _increasing(np.quantile(data[mask], MATCH_QUANTILES))
    target = np.asarray(reference_quantiles, float)
    source = np.r_[0.0, source, 1.0]
    target = np.r_[0.0, target, 1.0]
    source = _increasing(source)
    mapped = np.interp(data.astype(np.float64), source, np.maximum.accumulate(target))
    return np.clip(mapped, 0.0, 1.0).astype(np.float32)


def reference_quantiles(data, mask):
    """Quantiles of the reference subject's ``mask`` voxels, for :func:`match_histogram`."""
    return np.quantile(data[mask], MATCH_QUANTILES)


def _increasing(values):
    """Make a non-decreasing sequence strictly increasing (np.interp needs that)."""
    values = np.maximum.accumulate(np.asarray(values, float))
    return values + np.arange(len(values)) * 1e-9
