"""World geometry of voxel grids in numpy: voxel sizes, voxel-to-voxel maps between two grids,
and the flip between RAS (NIfTI, nibabel) and LPS (ITK) millimetres.

No TensorFlow: the file readers and writers (`vtn_tf.io`) use it too.
"""

import numpy as np

# RAS <-> LPS: x and y change sign (the same matrix both ways).
LPS_FLIP = np.diag([-1.0, -1.0, 1.0])
LPS_FLIP4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm per array axis: the norms of the 4x4 ``affine``'s first three columns."""
    sizes = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    return float(sizes[0]), float(sizes[1]), float(sizes[2])


def voxel_map(source_affine: np.ndarray, target_affine: np.ndarray) -> np.ndarray:
    """The 4x4 map from voxel indices of the source grid to those of the target grid through
    world space, ``target_affine^-1 source_affine`` (``voxel_map(A_f, A_m)``: fixed voxel ->
    moving voxel)."""
    return np.linalg.inv(np.asarray(target_affine, float)) @ np.asarray(source_affine, float)
