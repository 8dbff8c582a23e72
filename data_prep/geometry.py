"""Cropping boxes, resampling onto a new grid, and the matching affine and point maps.

A crop box is a pair of integer index arrays ``(low, high)`` (``high`` exclusive) on the
original grid. Resampling a box of ``n`` voxels onto ``g`` voxels scales by ``s = n / g``
with voxel *cells* aligned at the box edges, so new index ``j`` sits at old index
``low + s * j + (s - 1) / 2``. The new affine is ``old_affine @ M`` with that map ``M``,
so a voxel's world (RAS mm) coordinate names the same anatomy before and after.
"""

import math

import numpy as np
from scipy import ndimage


def bounding_box(mask, margin_mm, spacing):
    """Box around the ``True`` voxels of ``mask``, widened by ``margin_mm`` and clipped.

    Returns ``(low, high)`` int arrays (high exclusive), or None if the mask is empty.
    """
    if not mask.any():
        return None
    low, high = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        pad = int(math.ceil(margin_mm / spacing[axis]))
        low.append(max(present[0] - pad, 0))
        high.append(min(present[-1] + 1 + pad, mask.shape[axis]))
    return np.array(low), np.array(high)


def full_box(shape):
    return np.zeros(3, int), np.array(shape, int)


def grid_map(box, grid):
    """4x4 map from new voxel indices to old voxel indices for ``box`` resampled to ``grid``."""
    low, high = box
    scale = (high - low) / np.asarray(grid, float)
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(scale)
    matrix[:3, 3] = low + (scale - 1) / 2
    return matrix


def resample(data, box, grid, order):
    """Resample ``data[box]`` onto ``grid`` (order 1 = trilinear, 0 = nearest; edges clamped).

    Nearest-neighbour output only holds values present in the input, in the input dtype.
    """
    low, high = box
    if tuple(high - low) == tuple(grid):
        return np.array(data[low[0]:high[0], low[1]:high[1], low[2]:high[2]])
    matrix = grid_map(box, grid)
    output = np.float32 if order else data.dtype
    source = data.astype(np.float32) if order else data
    return ndimage.affine_transform(source, matrix[:3, :3], offset=matrix[:3, 3],
                                    output_shape=tuple(grid), output=output, order=order,
                                    mode="nearest")


def resampled_affine(affine, box, grid):
    """Affine (new voxel indices -> RAS mm) of ``box`` resampled onto ``grid``."""
    return np.asarray(affine, float) @ grid_map(box, grid)


def world_to_voxel(points, affine):
    """``(N, 3)`` RAS-mm points -> continuous voxel indices of the grid with ``affine``."""
    points = np.asarray(points, float).reshape(-1, 3)
    homogeneous = np.c_[points, np.ones(len(points))]
    return (np.linalg.inv(affine) @ homogeneous.T).T[:, :3]


def voxel_to_world(points, affine):
    """``(N, 3)`` continuous voxel indices -> RAS-mm points."""
    points = np.asarray(points, float).reshape(-1, 3)
    return (affine @ np.c_[points, np.ones(len(points))].T).T[:, :3]
