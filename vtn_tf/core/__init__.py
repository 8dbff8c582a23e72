"""Floor 1, the spatial maths: TensorFlow on tensors, no Keras and no files.

`vtn_tf.core.sampling` (warp, sample, corner tables), `vtn_tf.core.grids` (identity and
centred grids, point maps, per-axis reads), `vtn_tf.core.fields` (composition, affine flows,
derivatives, Jacobians), `vtn_tf.core.geometry` (numpy: voxel sizes, grid-to-grid maps, the
RAS/LPS flip) and `vtn_tf.core.metrics` (overlap, folding and landmark scores). The names of
the first four are also reachable here (``vtn_tf.core.warp``); each submodule loads on first
use, so `vtn_tf.io` uses `vtn_tf.core.geometry` without loading TensorFlow.
"""

import importlib

_NAMES = {
    "affine_flow": "fields",
    "axis_reads": "grids",
    "centred_grid": "grids",
    "check_flow": "sampling",
    "check_rank": "sampling",
    "check_same_grid": "sampling",
    "cofactors": "fields",
    "compose": "fields",
    "corner_table": "sampling",
    "forward_jacobian_determinant": "fields",
    "identity_grid": "grids",
    "identity_grid_dynamic": "grids",
    "jacobian_determinant": "fields",
    "lerp_axis": "grids",
    "map_points": "grids",
    "sample": "sampling",
    "sample_at_linear": "sampling",
    "sample_at_nearest": "sampling",
    "sample_linear": "sampling",
    "sample_linear_forward": "sampling",
    "sample_mapped": "sampling",
    "spacing": "geometry",
    "spatial_gradient": "fields",
    "voxel_map": "geometry",
    "warp": "sampling",
}


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"vtn_tf.core.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'vtn_tf.core' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES))
