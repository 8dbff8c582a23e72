"""Resampling between grids through a map and a field: images, label maps, the network's
flow onto the fixed grid, intensity normalisation and displacement statistics, in the compiled
kernels of `vtn_tf.registration.kernels`."""

import numpy as np
import tensorflow as tf

from vtn_tf.core import grids
from vtn_tf.registration import kernels


def resample_through(data, matrix, shape, interpolation="linear", outside="zero", field=None):
    """``data`` sampled onto a grid of ``shape`` at its voxel index ``matrix (x + field(x))``.

    Args:
      data: ``[X', Y', Z']`` numpy array (the source grid); integer for ``"nearest"``; or
        the same as a tf tensor ``[1, X', Y', Z', 1]`` (see :func:`kernels.as_image`).
      matrix: 4x4 map from target voxel positions to source voxel indices.
      shape: ``(X, Y, Z)`` of the target grid.
      interpolation, outside: as `vtn_tf.sampling.sample`.
      field: optional ``[X, Y, Z, 3]`` float32 (tf or numpy) displacement in target voxels
        (pulling) added to the target voxel positions before ``matrix``.
    Returns:
      ``[X, Y, Z]`` numpy array (float32 for linear, ``data``'s dtype for nearest); ``data``
      itself when ``matrix`` is the identity on a grid of its shape and there is no field.
    """
    if interpolation not in ("linear", "nearest") or outside not in ("zero", "clamp"):
        raise ValueError(f"unknown interpolation {interpolation!r} or outside mode {outside!r}")
    if (field is None and not isinstance(data, tf.Tensor) and tuple(np.shape(data)) == tuple(shape)
            and np.allclose(matrix, np.eye(4), rtol=0.0, atol=1e-9)):
        # the same grid (scans in one space): sampling at the voxels returns them, no resampling
        return np.asarray(data, np.float32) if interpolation == "linear" else np.asarray(data)
    if isinstance(data, tf.Tensor):  # already [1, X', Y', Z', 1] (one conversion for several calls)
        image, dtype = data, data.dtype.as_numpy_dtype
    else:
        image = kernels.as_image(np.asarray(data, np.float32) if interpolation == "linear" else data)
        dtype = np.asarray(data).dtype
    if field is not None:
        field = tf.convert_to_tensor(field, tf.float32)
    parts = [kernels.compiled()["resample"](image, tf.constant(float(rows.start)), kernels.matrix34(matrix),
                                    None if field is None else field[rows.start:rows.stop],
                                    kernels.rows_shape(shape, rows), interpolation == "nearest", outside == "zero")
             for rows in kernels.slabs(shape)]
    out = np.asarray(kernels.joined(parts))
    return out.astype(dtype, copy=False) if interpolation == "nearest" else out


def axis_weights(G, axis, size, network_size, rows=None):
    """Where fixed index ``x`` along ``axis`` reads the network grid: `vtn_tf.grids.axis_reads`
    (``[len(rows)]`` or ``[size]``) of the network position ``G^-1 x``, trilinear sampling
    with edge clamping."""
    x = np.arange(size, dtype=np.float64) if rows is None else np.arange(rows.start, rows.stop, dtype=np.float64)
    return grids.axis_reads((x - G[axis, 3]) / G[axis, axis], network_size)


def network_flow_on_fixed(network_flow, G, fixed_shape, K=None):
    """The network's flow as the displacement ``flow_voxels`` on the fixed grid (tf).

    Args:
      network_flow: ``[Xn, Yn, Zn, 3]`` voxels of the network grid, pulling.
      G: 4x4 network index -> fixed index (a scaling and a shift per axis, as
        `vtn_tf.preparation.grid_map` makes).
      fixed_shape: ``(X, Y, Z)`` of the fixed grid.
      K: optional 4x4 fixed voxel position -> fixed voxel position applied after the flow
        (the initial alignment ``A_f^-1 T A_f``); None: the identity.
    Returns:
      ``[X, Y, Z, 3]`` float32 tf tensor, voxels of the fixed grid, pulling: fixed voxel ``x``
      goes to the fixed-grid position ``K (x + S f_N(G^-1 x))``, trilinear in between network
      voxels and edge-clamped beyond them.

    ``G`` is axis-aligned, so the trilinear interpolation is separable: the flow is
    interpolated along z, then y, then x (in slabs of the fixed grid), and the result is
    ``K_lin S f + (K - I) x``.
    """
    G = np.asarray(G, np.float64)
    if np.count_nonzero(G[:3, :3] - np.diag(np.diag(G[:3, :3]))):
        raise ValueError("network_flow_on_fixed needs an axis-aligned G (a scaling and a shift)")
    K = np.eye(4) if K is None else np.asarray(K, np.float64)
    compiled = kernels.compiled()
    flow = tf.convert_to_tensor(np.asarray(network_flow, np.float32))
    network_shape = flow.shape[:3]
    for axis in (2, 1):
        flow = compiled["lerp_axis"](flow, *axis_weights(G, axis, int(fixed_shape[axis]), network_shape[axis]), axis)
    linear = tf.constant(K[:3, :3] @ np.diag(np.diag(G)[:3]), tf.float32)
    offset = kernels.matrix34(K - np.eye(4))
    return kernels.joined([compiled["flow_on_fixed"](flow, *axis_weights(G, 0, int(fixed_shape[0]), network_shape[0],
                                                                         rows),
                                                     linear, offset, tf.constant(float(rows.start)),
                                                     kernels.rows_shape(fixed_shape, rows))
                           for rows in kernels.slabs(fixed_shape)])


def normalised(data, intensity_map):
    """``intensity_map(data)`` (a :class:`vtn_tf.preparation.IntensityMap`), float32 numpy, in
    one XLA kernel per slab with numpy's arithmetic (the scaling in float32, ``np.interp``'s
    segment and value in float64): equal to the numpy map within a float32 rounding and faster
    on a full-resolution scan. Slabs of ``SLAB_VOXELS`` bound the kernel's float64 temporaries
    (docs/performance.md)."""
    if intensity_map.low is None:
        return intensity_map(data)
    source = target = None
    steps = ()
    if intensity_map.curve is not None:
        source, target = (tf.constant(np.asarray(a, np.float64), tf.float64) for a in intensity_map.curve)
        segments = int(source.shape[0]) - 1
        steps = tuple(1 << i for i in range(int(np.ceil(np.log2(max(segments, 1)))) - 1, -1, -1))
    data = np.asarray(data)
    data = data if data.dtype.kind in "fiu" and data.dtype.itemsize <= 4 else data.astype(np.float32)
    low = tf.constant(np.float32(intensity_map.low))
    scale = tf.constant(np.float32(intensity_map.high - intensity_map.low))
    out = np.empty(data.shape, np.float32)
    for rows in kernels.slabs(data.shape):
        part = tf.convert_to_tensor(data[rows.start:rows.stop])
        out[rows.start:rows.stop] = kernels.compiled()["intensity"](part, low, scale, source, target, steps)
    return out


def displacement_lengths(flow_voxels, spacing):
    """Mean and largest length (mm) of a displacement ``[X, Y, Z, 3]`` in voxels of ``spacing`` mm."""
    mean, largest = kernels.compiled()["length_stats"](tf.convert_to_tensor(flow_voxels, tf.float32),
                                               tf.constant(np.asarray(spacing, np.float32)))
    return float(mean), float(largest)
