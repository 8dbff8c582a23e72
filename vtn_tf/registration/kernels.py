"""The compiled resampling kernels of registration and the slabs they run in.

Every resampling of a registration runs in TensorFlow with the project's compiled sampler
(`vtn_tf.core.sampling`), float32, in slabs of the target grid so memory stays bounded. The
kernels are XLA-compiled once per slab shape and mode (static shapes), built on first use.
"""

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from vtn_tf.core import grids, sampling


# ----- TensorFlow resampling -----------------------------------------------------------------
def expected_retracing(record):
    """A `logging` filter: False for TensorFlow's retracing warning. The compiled resampling,
    search and refinement kernels trace once per grid size and mode by design (XLA needs
    static shapes), so a run over scans of several sizes retraces them as it should."""
    return "triggered tf.function retracing" not in record.getMessage()


class _RetracingFilter(logging.Filter):
    def filter(self, record):
        return expected_retracing(record)


def quiet_retracing(function):
    """Run ``function`` with :func:`expected_retracing` on the ``tensorflow`` logger (only
    while it runs: the caller's own functions keep their warnings outside these calls)."""
    @functools.wraps(function)
    def quiet(*args, **kwargs):
        logger, only = logging.getLogger("tensorflow"), _RetracingFilter()
        logger.addFilter(only)
        try:
            return function(*args, **kwargs)
        finally:
            logger.removeFilter(only)
    return quiet


SLAB_VOXELS = 1 << 23  # fixed-grid voxels resampled at a time (bounds memory on large grids)


def slabs(shape):
    """Row ranges along axis 0 of a grid of ``shape`` holding at most ``SLAB_VOXELS`` voxels."""
    rows = max(1, SLAB_VOXELS // max(1, int(shape[1]) * int(shape[2])))
    return [range(start, min(start + rows, int(shape[0]))) for start in range(0, int(shape[0]), rows)]


_KERNELS: dict[str, Callable[..., Any]] = {}


_KERNELS_LOCK = threading.Lock()


def compiled():
    """The compiled kernels of this module, built on first use (io-only users never import TF).

    Each builds the voxel grid of a slab inside XLA (``shape``: the slab's static ``(rows, Y, Z)``,
    ``start``: its first row), so neither the grid nor the mapped positions are materialised
    apart from what is returned: one fused program per slab shape."""
    with _KERNELS_LOCK:
        if not _KERNELS:
            _KERNELS.update(_build_kernels())
    return _KERNELS


def _build_kernels():
    def grid(start, shape):
        """Voxel index components ``(x, y, z)``, broadcastable to ``[rows, Y, Z]``."""
        return (tf.reshape(tf.range(shape[0], dtype=tf.float32) + start, [-1, 1, 1]),
                tf.reshape(tf.range(shape[1], dtype=tf.float32), [1, -1, 1]),
                tf.reshape(tf.range(shape[2], dtype=tf.float32), [1, 1, -1]))

    def mapped(matrix, p, shape):
        """``matrix`` (``[3, 4]``) applied to the point components ``p``: ``[rows, Y, Z, 3]``."""
        return tf.stack([tf.broadcast_to(p[0] * matrix[i, 0] + p[1] * matrix[i, 1] + p[2] * matrix[i, 2]
                                         + matrix[i, 3], shape) for i in range(3)], axis=-1)

    def positions(start, matrix, field, shape):
        """``matrix (x + field(x))`` for the slab's voxels ``x`` (``field`` None: 0)."""
        p = grid(start, shape)
        if field is not None:
            p = tuple(p[c] + field[..., c] for c in range(3))
        return mapped(matrix, p, shape)

    @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
    def map_points(points, matrix):
        return grids.map_points(points, matrix)

    @tf.function(jit_compile=True, autograph=False)
    def grid_points(start, shape):
        return tf.stack([tf.broadcast_to(c, shape) for c in grid(start, shape)], axis=-1)

    @tf.function(jit_compile=True, autograph=False)
    def resample(image, start, matrix, field, shape, nearest, zero):
        at = positions(start, matrix, field, shape)[None]
        if nearest:
            return sampling.sample_at_nearest(image, at, zero)[0, ..., 0]
        return sampling.sample_at_linear(image, at, zero)[0, ..., 0]

    lerp_axis = tf.function(grids.lerp_axis, jit_compile=True, autograph=False)

    @tf.function(jit_compile=True, autograph=False)
    def flow_on_fixed(flow, lower, upper, weight, linear, offset, start, shape):
        """``linear f + offset (x)``: ``f`` the network flow interpolated along axis 0 (already
        along axes 1 and 2), ``offset`` a [3, 4] affine map of the slab's voxels."""
        f = lerp_axis(flow, lower, upper, weight, 0)
        x = grid(start, shape)
        return tf.stack([f[..., 0] * linear[c, 0] + f[..., 1] * linear[c, 1] + f[..., 2] * linear[c, 2]
                         + x[0] * offset[c, 0] + x[1] * offset[c, 1] + x[2] * offset[c, 2] + offset[c, 3]
                         for c in range(3)], axis=-1)

    @tf.function(jit_compile=True, autograph=False)
    def intensity(data, low, scale, source, target, steps):
        """``clip((data - low) / scale)`` (float32, as numpy computes it) through the curve of
        knots ``source`` -> ``target`` (float64, as ``np.interp``): the segment by a binary
        search of ``steps`` (static) halvings, the value in float64, then float32."""
        x = tf.clip_by_value((tf.cast(data, tf.float32) - low) / scale, 0.0, 1.0)
        if source is None:
            return x
        x = tf.cast(x, tf.float64)
        last = int(source.shape[0]) - 2
        k = tf.zeros_like(x, tf.int32)
        for step in steps:
            candidate = tf.minimum(k + step, last)
            k = tf.where(tf.gather(source, candidate) <= x, candidate, k)
        low_knot, high_knot = tf.gather(source, k), tf.gather(source, k + 1)
        low_value, high_value = tf.gather(target, k), tf.gather(target, k + 1)
        value = (high_value - low_value) / (high_knot - low_knot) * (x - low_knot) + low_value
        return tf.cast(tf.clip_by_value(value, 0.0, 1.0), tf.float32)

    @tf.function(jit_compile=True, autograph=False)
    def length_stats(flow, spacing):
        millimetres = tf.norm(flow * spacing, axis=-1)
        return tf.reduce_mean(millimetres), tf.reduce_max(millimetres)

    return dict(map_points=map_points, grid_points=grid_points, resample=resample, lerp_axis=lerp_axis,
                flow_on_fixed=flow_on_fixed, intensity=intensity, length_stats=length_stats)


def rows_shape(shape, rows):
    return (len(rows), int(shape[1]), int(shape[2]))


def grid_rows(shape, rows):
    """Voxel indices ``[len(rows), Y, Z, 3]`` float32 (tf) of slices ``rows`` of a grid."""
    return compiled()["grid_points"](tf.constant(float(rows.start)), rows_shape(shape, rows))


def matrix34(matrix):
    return tf.constant(np.asarray(matrix, np.float64)[:3], tf.float32)


def affine_points(matrix, points):
    """``matrix`` (4x4 numpy) applied to points ``[..., 3]`` (tf float32), one fused XLA kernel."""
    return compiled()["map_points"](points, matrix34(matrix))


def as_image(data):
    """numpy ``[X, Y, Z]`` -> tf ``[1, X, Y, Z, 1]`` (labels keep their integer dtype)."""
    data = np.asarray(data)
    if data.dtype.kind == "f":
        data = data.astype(np.float32, copy=False)
    elif data.dtype.kind in "iub" and data.dtype != np.int32:
        data = data.astype(np.int64 if data.dtype.itemsize > 4 or data.dtype == np.uint32 else np.int32)
    return tf.convert_to_tensor(data[None, ..., None])


def joined(parts):
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)
