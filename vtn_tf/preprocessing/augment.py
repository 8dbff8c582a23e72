"""Spatial augmentation: random cubic B-spline fields applied to the moving image.

The paper (§V) augments training pairs with random B-spline fields on 5x5x5 control
points, "within a maximum displacement of 12" voxels. Only the moving image and its
labels are deformed; the fixed image is never touched.

Field conventions (as in :mod:`vtn_tf.core`): a flow is ``[B, X, Y, Z, 3]`` float32,
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

Random affine transforms (not in the paper; ``data.affine_augment`` in the configs) move
the whole moving image, so that the affine subnetwork sees misaligned scans to correct.
They are drawn in physical millimetres about the volume centre and converted to voxels with
the grid's per-axis spacing, so a rotation stays a true rotation on an anisotropic grid:

* centred voxel coordinates ``c_j = index_j - (size_j - 1) / 2`` (as in
  :func:`vtn_tf.core.fields.affine_flow`), millimetres ``p = S c`` with ``S = diag(spacing)``;
* in millimetres the fixed point ``p`` samples the moving image at ``M p + t`` with
  ``M = R · H · K`` (scale ``K``, then shear ``H``, then rotation ``R``) and ``t`` in mm;
* in voxels that is ``A c + b`` with ``A = S⁻¹ M S`` and ``b = S⁻¹ t``, i.e. the
  ``W = A - I`` and ``b`` that :func:`vtn_tf.core.fields.affine_flow` takes (pull direction:
  the flow at ``c`` is ``W c + b``, the sampled moving position ``A c + b``).

All axes are the array axes of the grid (0, 1, 2), not world (RAS/LPS) axes.

This module is the bottom floor: pure tensor maths, no Keras, no I/O.
"""

import numbers

import numpy as np
import tensorflow as tf

from vtn_tf.core import fields, sampling


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


AFFINE_RANGES = ("rotation_degrees", "scale", "shear", "translation_mm")


def check_affine_ranges(rotation_degrees=0.0, scale=0.0, shear=0.0, translation_mm=0.0):
    """Raise ValueError, naming the argument, unless every affine range can be drawn from.

    Each must be a finite non-negative number; ``scale < 1`` (a factor 1 ± scale must stay
    positive) and ``rotation_degrees ≤ 180``.
    """
    ranges = dict(rotation_degrees=rotation_degrees, scale=scale, shear=shear,
                  translation_mm=translation_mm)
    for name, value in ranges.items():
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not np.isfinite(value) or value < 0):
            raise ValueError(f"{name} must be a non-negative number; got {value!r}.")
    if scale >= 1:
        raise ValueError(f"scale must be below 1 (a fraction: 0.1 is ±10 %); got {scale!r}.")
    if rotation_degrees > 180:
        raise ValueError(f"rotation_degrees must be at most 180; got {rotation_degrees!r}.")


def random_affine_parameters(batch, seed, rotation_degrees=0.0, scale=0.0, shear=0.0,
                             translation_mm=0.0):
    """Per-element affine parameters, each uniform in its range (stateless: seed → draw).

    Args:
      batch: number of transforms (int or scalar int tensor).
      seed: ``[2]`` int tensor for ``tf.random.stateless_uniform``.
      rotation_degrees: bound of the rotation angle about each array axis, degrees (≤ 180).
      scale: bound of the relative scale change per axis (0.1: factors in [0.9, 1.1]; < 1).
      shear: bound of the three shear coefficients (mm per mm).
      translation_mm: bound of the translation along each axis, millimetres.
    Returns:
      dict of ``[batch, 3]`` float64 tensors: ``"rotation_degrees"`` (angles about axes 0,
      1, 2), ``"scale"`` (the factors ``1 + u · scale``, u uniform on [-1, 1]), ``"shear"``
      (``h01, h02, h12`` of the unit upper-triangular shear) and ``"translation_mm"``.
      The meaning of each is in :func:`affine_from_parameters`.
    """
    check_affine_ranges(rotation_degrees, scale, shear, translation_mm)
    u = tf.random.stateless_uniform(tf.stack([batch, 4, 3]), seed=seed, minval=-1.0,
                                    maxval=1.0, dtype=tf.float64)
    return {"rotation_degrees": float(rotation_degrees) * u[:, 0],
            "scale": 1.0 + float(scale) * u[:, 1],
            "shear": float(shear) * u[:, 2],
            "translation_mm": float(translation_mm) * u[:, 3]}


def _rotation_about(axis, angle):
    """``[B, 3, 3]`` rotation by ``angle`` (radians, ``[B]``) about array axis ``axis``.

    Right-handed: about axis 0 it takes axis 1 towards axis 2 (and cyclically).
    """
    i, j = (axis + 1) % 3, (axis + 2) % 3
    cos, sin = tf.cos(angle), tf.sin(angle)
    one, zero = tf.ones_like(angle), tf.zeros_like(angle)
    entries = [[one if r == c else zero for c in range(3)] for r in range(3)]
    entries[i][i], entries[j][j], entries[i][j], entries[j][i] = cos, cos, -sin, sin
    return tf.stack([tf.stack(row, axis=-1) for row in entries], axis=-2)


def affine_from_parameters(parameters, spacing=None, dtype=tf.float32):
    """The ``(W, b)`` of :func:`vtn_tf.core.fields.affine_flow` for transforms given in millimetres.

    In millimetres about the volume centre, fixed point ``p`` samples the moving image at
    ``M p + t``, ``M = R · H · K``: ``K = diag(scale)``, ``H`` unit upper triangular with
    ``H[0, 1], H[0, 2], H[1, 2] = shear``, ``R = R_2(θ_2) · R_1(θ_1) · R_0(θ_0)`` (rotate
    about axis 0 first; ``R_a`` as in scipy's extrinsic ``"xyz"`` Euler angles with x, y, z
    the array axes 0, 1, 2). On the grid with ``p = S c``, ``S = diag(spacing)``, this is
    ``A c + b`` with ``A = S⁻¹ M S``, ``b = S⁻¹ t``.

    Args:
      parameters: dict as returned by :func:`random_affine_parameters` (``[B, 3]`` each).
      spacing: voxel size in mm along array axes 0, 1, 2: ``[3]`` (shared) or ``[B, 3]``
        (per element); None is 1 mm (then translations are in voxels).
      dtype: of the outputs.
    Returns:
      ``W``: ``[B, 3, 3]`` ``A - I`` (dimensionless, row i the displacement along axis i),
      ``b``: ``[B, 3]`` translation in voxels; pulling: the flow at centred voxel
      coordinates ``c`` is ``W c + b`` and the sampled moving position is ``A c + b``.
    """
    angles = tf.convert_to_tensor(parameters["rotation_degrees"], tf.float64) * (np.pi / 180.0)
    scale = tf.convert_to_tensor(parameters["scale"], tf.float64)
    shear = tf.convert_to_tensor(parameters["shear"], tf.float64)
    translation = tf.convert_to_tensor(parameters["translation_mm"], tf.float64)
    rotation = (_rotation_about(2, angles[:, 2]) @ _rotation_about(1, angles[:, 1])
                @ _rotation_about(0, angles[:, 0]))
    one, zero = tf.ones_like(shear[:, 0]), tf.zeros_like(shear[:, 0])
    shearing = tf.stack([tf.stack([one, shear[:, 0], shear[:, 1]], -1),
                         tf.stack([zero, one, shear[:, 2]], -1),
                         tf.stack([zero, zero, one], -1)], axis=-2)
    millimetres = rotation @ shearing @ tf.linalg.diag(scale)
    spacing = tf.ones([3], tf.float64) if spacing is None else tf.cast(spacing, tf.float64)
    spacing = tf.broadcast_to(spacing, tf.shape(translation))
    # (S⁻¹ M S)_ij = M_ij · s_j / s_i
    voxels = millimetres * spacing[:, None, :] / spacing[:, :, None]
    W = voxels - tf.eye(3, dtype=tf.float64)
    return tf.cast(W, dtype), tf.cast(translation / spacing, dtype)


def random_affine(batch, seed, rotation_degrees=0.0, scale=0.0, shear=0.0, translation_mm=0.0,
                  spacing=None):
    """Random affine transforms in voxels, drawn in millimetres (stateless).

    :func:`random_affine_parameters` then :func:`affine_from_parameters`; arguments as
    there. Returns ``W`` ``[batch, 3, 3]`` float32 (``A - I``) and ``b`` ``[batch, 3]``
    float32 voxels for :func:`vtn_tf.core.fields.affine_flow` (pulling: the sampled moving
    position is ``A c + b`` on centred voxel coordinates ``c``).
    """
    parameters = random_affine_parameters(batch, seed, rotation_degrees, scale, shear,
                                          translation_mm)
    return affine_from_parameters(parameters, spacing)


def augmentation_flow(batch, spatial_shape, seed, control_points=5, max_displacement=12.0,
                      rotation_degrees=0.0, scale=0.0, shear=0.0, translation_mm=0.0,
                      spacing=None):
    """The one random field of :func:`augment_moving`: B-spline, then affine.

    ``compose(bspline, affine) = affine + warp(bspline, affine)``: warping with it equals
    deforming the moving image by the B-spline field (in its own frame, where the voxel bound
    holds) and then moving the result by the affine (the pose change):
    ``warp(I, flow) = warp(warp(I, bspline), affine)``. The B-spline is drawn from ``seed``
    itself, the affine from ``fold_in(seed, 1)``, so turning the affine on leaves the
    B-spline field as it was. With every affine range 0 the affine is skipped and the
    flow is the B-spline flow, bit for bit.

    Args:
      batch, spatial_shape, seed, control_points, max_displacement: as in
        :func:`random_bspline_flow`.
      rotation_degrees, scale, shear, translation_mm, spacing: as in
        :func:`random_affine_parameters` and :func:`affine_from_parameters`.
    Returns:
      ``[batch, X, Y, Z, 3]`` float32 flow in voxels of the grid, pulling.
    """
    flow = random_bspline_flow(batch, spatial_shape, seed, control_points, max_displacement)
    check_affine_ranges(rotation_degrees, scale, shear, translation_mm)
    if rotation_degrees == scale == shear == translation_mm == 0:
        return flow
    W, b = random_affine(batch, tf.random.experimental.stateless_fold_in(seed, 1),
                         rotation_degrees, scale, shear, translation_mm, spacing)
    return fields.compose(flow, fields.affine_flow(W, b, spatial_shape))


def augment_moving(moving, moving_labels, seed, control_points=5, max_displacement=12.0,
                   rotation_degrees=0.0, scale=0.0, shear=0.0, translation_mm=0.0,
                   spacing=None):
    """Deform the moving image (trilinear) and its labels (nearest) with one random field.

    The field is :func:`augmentation_flow`: a cubic B-spline field composed with a random
    affine (B-spline first, then affine; the affine only when a range is non-zero). The
    image and the labels are each resampled once. The fixed image is not an argument:
    augmentation never touches it.

    Args:
      moving: ``[B, X, Y, Z, C]`` float image; the spatial shape must be static.
      moving_labels: ``[B, X, Y, Z, 1]`` integer label map on the same grid, or None.
      seed: ``[2]`` int tensor for the stateless generator.
      control_points, max_displacement: as in :func:`random_bspline_flow`.
      rotation_degrees, scale, shear, translation_mm: affine ranges, as in
        :func:`random_affine_parameters` (all 0: no affine, the B-spline-only behaviour).
      spacing: the moving grid's voxel size in mm, ``[3]`` or ``[B, 3]`` (None: 1 mm).
    Returns:
      ``(moving, moving_labels)`` warped by the same random flow (labels keep their ids
      and dtype; None stays None).
    """
    moving = tf.convert_to_tensor(moving)
    spatial_shape = moving.shape[1:4]
    if moving.shape.rank != 5 or not spatial_shape.is_fully_defined():
        raise ValueError(f"moving must be [B, X, Y, Z, C] with a static grid; got {moving.shape}.")
    flow = augmentation_flow(tf.shape(moving)[0], spatial_shape, seed, control_points,
                             max_displacement, rotation_degrees, scale, shear, translation_mm,
                             spacing)
    warped = sampling.warp(moving, tf.cast(flow, moving.dtype), "linear")
    if moving_labels is None:
        return warped, None
    return warped, sampling.warp(moving_labels, flow, "nearest")
