"""Voxel grids and axis-aligned maps: identity and centred grids, point mapping, per-axis reads.

Pure TensorFlow maths (no Keras, no files); the conventions are `vtn_tf.core.sampling`'s.
"""

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import tensorflow as tf

# A tensor, or an array TensorFlow converts.
TensorLike: TypeAlias = "tf.Tensor | np.ndarray"


def identity_grid(spatial_shape: Sequence[int], dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Voxel index coordinates of a grid.

    Args:
      spatial_shape: ``(X, Y, Z)``.
    Returns:
      ``[X, Y, Z, 3]`` tensor, ``grid[i, j, k] = (i, j, k)`` in voxels.
    """
    axes = [tf.range(n, dtype=dtype) for n in spatial_shape]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def centred_grid(spatial_shape: Sequence[int], dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Voxel coordinates measured from the volume centre: ``index_j - (size_j - 1) / 2``.

    Returns ``[X, Y, Z, 3]`` in voxels; the affine subnetwork's transform acts on these.
    """
    centre = tf.constant([(n - 1) / 2.0 for n in spatial_shape], dtype=dtype)
    return identity_grid(spatial_shape, dtype) - centre


def identity_grid_dynamic(size: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """`identity_grid` for a shape known only at run time (a 3-element int tensor)."""
    axes = [tf.range(size[i], dtype=tf.int32) for i in range(3)]
    return tf.cast(tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1), dtype)


def map_points(points: tf.Tensor, matrix: TensorLike) -> tf.Tensor:
    """``matrix`` ``[3, 4]`` (or 4x4) applied to ``points`` ``[..., 3]``: ``[..., 3]``, one
    multiply-add per entry (no matrix product: under XLA on the CPU it fuses with what follows)."""
    return tf.stack([points[..., 0] * matrix[i, 0] + points[..., 1] * matrix[i, 1] + points[..., 2] * matrix[i, 2]
                     + matrix[i, 3] for i in range(3)], -1)


def axis_reads(position: np.ndarray, size: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Where positions along one axis read it, for a linear interpolation with edge clamping.

    Args:
      position: ``[n]`` numpy float, continuous indices into an axis of ``size`` entries.
    Returns:
      ``(lower, upper, weight)`` tf int32, int32, float32 ``[n]``: each position clamped to
      ``[0, size - 1]`` lies between entries ``lower`` and ``upper`` with the weight ``weight``
      of the upper one. An axis-aligned map (a scaling and a shift per axis) reads a grid as
      these per axis: trilinear sampling with ``"clamp"`` (:func:`sample`), one axis at a time
      (:func:`lerp_axis`).
    """
    position = np.clip(np.asarray(position, np.float64), 0.0, size - 1)
    lower = np.clip(np.floor(position), 0, max(size - 2, 0))
    upper = np.minimum(lower + 1, size - 1)
    return tf.constant(lower, tf.int32), tf.constant(upper, tf.int32), tf.constant(position - lower, tf.float32)


def lerp_axis(values: tf.Tensor, lower: tf.Tensor, upper: tf.Tensor, weight: tf.Tensor, axis: int) -> tf.Tensor:
    """Linear interpolation of ``values`` along ``axis`` between the entries ``lower`` and
    ``upper`` with the weights ``weight`` of the upper ones (one per output entry,
    :func:`axis_reads`)."""
    shape = [1] * len(values.shape)
    shape[axis] = -1
    weight = tf.reshape(weight, shape)
    return tf.gather(values, lower, axis=axis) * (1.0 - weight) + tf.gather(values, upper, axis=axis) * weight
