"""Spatial augmentation: random cubic B-spline fields applied to the moving image.

The paper (§V) augments training pairs with random B-spline fields on 5x5x5 control
points, "within a maximum displacement of 12" voxels. Only the moving image and its
labels are deformed; the fixed image is never touched.

Field conventions (as in :mod:`vtn_tf.spatial`): a flow is ``[B, X, Y, Z, 3]`` float32,
a displacement in voxels of the grid it lives on, channel c along axis c, pulling:
``warp(m, f)(x) = m(x + f(x))``.

Control lattice. Along an axis of ``size`` voxels with ``n`` control points, control j
sits at voxel coordinate ``j * size / (n - 1) - 0.5``: the first on the outer face of the
first voxel, the last on the outer face of the last voxel (the authors' placement, which
gives 4 spline segments across the volume for n = 5). The cubic B-spline needs one more
knot beyond each end; it repeats the edge control (the authors pad with zeros instead,
which pulls the field towards zero at the border). Repeating keeps the weights of every
voxel a convex combination of the given controls, so

* zero controls give exactly zero flow;
* a constant lattice gives a constant flow (partition of unity);
* ``|flow_c| <= max_j |control_j,c|`` for every channel c.

The dense field is a separable product of three per-axis ``[size, n]`` weight matrices
(computed once in numpy) with the control lattice: exact, cheap and differentiable.

This module is the bottom floor: pure tensor maths, no Keras, no I/O.
"""

import numpy as np
import tensorflow as tf

from vtn_tf import spatial


def bspline_weights(size, control_points):
    """Cubic B-spline weights of ``control_points`` lattice points at each of ``size`` voxels.

    Args:
      size: number of voxels along the axis.
      control_points: lattice points along the axis (≥ 2), placed as in the module notes.
    Returns:
      ``[size, control_points]`` float64 numpy array; every row is non-negative and
      sums to 1.
    """
    size, n = int(size), int(control_points)
    if size < 1 or n < 2:
        raise ValueError(f"need size ≥ 1 and control_points ≥ 2; got {size}, {n}.")
    t = (np.arange(size) + 0.5) * (n - 1) / size  # lattice coordinate, in (0, n - 1)
    segment = np.minimum(np.floor(t).astype(int), n - 2)
    u = t - segment
    basis = np.stack([(1 - u) ** 3, 3 * u**3 - 6 * u**2 + 4,
                      -3 * u**3 + 3 * u**2 + 3 * u + 1, u**3], axis=1) / 6.0
    weights = np.zeros((size, n))
    rows = np.arange(size)
    for offset in range(4):  # segment i uses controls i-1 .. i+2; outside ones repeat the edge
        column = np.clip(segment - 1 + offset, 0, n - 1)
        np.add.at(weights, (rows, column), basis[:, offset])
    return weights


def bspline_flow(control_displacements, spatial_shape):
    """Dense flow of a cubic B-spline control lattice spanning the volume.

    Args:
      control_displacements: ``[B, nx, ny, nz, 3]`` float, displacement (voxels) at each
        control point, channel c along axis c; each n ≥ 2. Lattice placement and edge
        handling as in the module notes.
      spatial_shape: ``(X, Y, Z)`` of the output grid.
    Returns:
      ``[B, X, Y, Z, 3]`` flow of the controls' dtype, in voxels, pulling. Zero controls
      give exactly zero; a constant lattice gives that constant; each channel is bounded
      by the largest control magnitude in that channel. Differentiable in the controls.
    Example:
      >>> flow = bspline_flow(tf.zeros([2, 5, 5, 5, 3]), (64, 64, 64))  # all zeros
    """
    controls = tf.convert_to_tensor(control_displacements)
    if controls.shape.rank != 5 or controls.shape[-1] != 3:
        raise ValueError(f"control_displacements must be [B, nx, ny, nz, 3]; got {controls.shape}.")
    if not controls.dtype.is_floating:
        raise ValueError(f"control_displacements must be floating point; got {controls.dtype.name}.")
    spatial_shape = tuple(int(n) for n in spatial_shape)
    if len(spatial_shape) != 3:
        raise ValueError(f"spatial_shape must be (X, Y, Z); got {spatial_shape}.")
    if not controls.shape[1:4].is_fully_defined():
        raise ValueError(f"the control lattice size must be static; got {controls.shape}.")
    wx, wy, wz = (tf.constant(bspline_weights(size, n), controls.dtype)
                  for size, n in zip(spatial_shape, controls.shape[1:4]))
    # Smallest axis first keeps the intermediate tensors small.
    flow = tf.einsum("bijkc,zk->bijzc", controls, wz)
    flow = tf.einsum("bijzc,yj->biyzc", flow, wy)
    return tf.einsum("biyzc,xi->bxyzc", flow, wx)


def random_control_displacements(batch, seed, control_points=5, max_displacement=12.0,
                                 dtype=tf.float32):
    """Random control values drawn like the authors: ``max_displacement · sign(u)·|u|^3``.

    ``u`` is uniform on [-1, 1] per control point and channel, so small displacements are
    more likely than large ones and each component stays within ``max_displacement``.

    Args:
      batch: number of fields (int or scalar int tensor).
      seed: ``[2]`` int32/int64 tensor, for ``tf.random.stateless_uniform``.
      control_points: lattice points per axis.
      max_displacement: bound on every component, in voxels.
    Returns:
      ``[batch, n, n, n, 3]`` control displacements in voxels.
    """
    n = int(control_points)
    u = tf.random.stateless_uniform(tf.stack([batch, n, n, n, 3]), seed=seed,
                                    minval=-1.0, maxval=1.0, dtype=dtype)
    return tf.cast(max_displacement, dtype) * tf.sign(u) * tf.abs(u) ** 3


def random_bspline_flow(batch, spatial_shape, seed, control_points=5, max_displacement=12.0):
    """A random cubic B-spline flow (stateless: the same seed gives the same field).

    Args:
      batch: number of fields.
      spatial_shape: ``(X, Y, Z)``.
      seed: ``[2]`` int tensor for the stateless generator.
      control_points: lattice points per axis (paper: 5).
      max_displacement: bound in voxels on every component of the flow (paper: 12).
        As in the authors' code the bound is per component; the vector length can reach
        √3 times it.
    Returns:
      ``[batch, X, Y, Z, 3]`` float32 flow in voxels, pulling, with
      ``|flow_c| <= max_displacement`` everywhere.
    """
    controls = random_control_displacements(batch, seed, control_points, max_displacement)
    return bspline_flow(controls, spatial_shape)


def augment_moving(moving, moving_labels, seed, control_points=5, max_displacement=12.0):
    """Deform the moving image (trilinear) and its labels (nearest) with one random field.

    The fixed image is not an argument: augmentation never touches it.

    Args:
      moving: ``[B, X, Y, Z, C]`` float image; the spatial shape must be static.
      moving_labels: ``[B, X, Y, Z, 1]`` integer label map on the same grid, or None.
      seed: ``[2]`` int tensor for the stateless generator.
      control_points, max_displacement: as in :func:`random_bspline_flow`.
    Returns:
      ``(moving, moving_labels)`` warped by the same random flow (labels keep their ids
      and dtype; None stays None).
    """
    moving = tf.convert_to_tensor(moving)
    spatial_shape = moving.shape[1:4]
    if moving.shape.rank != 5 or not spatial_shape.is_fully_defined():
        raise ValueError(f"moving must be [B, X, Y, Z, C] with a static grid; got {moving.shape}.")
    flow = random_bspline_flow(tf.shape(moving)[0], spatial_shape, seed,
                               control_points, max_displacement)
    warped = spatial.warp(moving, tf.cast(flow, moving.dtype), "linear")
    if moving_labels is None:
        return warped, None
    return warped, spatial.warp(moving_labels, flow, "nearest")
