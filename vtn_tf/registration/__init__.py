"""Registering image files with a trained model: settings and presets (`settings`), the pair on the
network grid (`inputs`, `affine_search`), the network pass (`network`, `finetune`), refinement
(`refinement`, `optimiser`), resampling (`kernels`, `resampling`), the inverse (`inverse`), the
outputs (`outputs`), the whole registration (`pipeline`) and pairs from a CSV (`batch`).
"""
