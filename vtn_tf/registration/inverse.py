"""The inverse of a registration: the moving -> fixed field on the moving grid (fixed-point
iteration on the deformable part, the affine part inverted exactly) and its consistency."""

import dataclasses
import time

import numpy as np
import tensorflow as tf

from vtn_tf.core import geometry, sampling
from vtn_tf.registration import kernels
from vtn_tf.registration.resampling import resample_through


def inverse_field(flow_voxels, fixed_affine, moving_affine, initial, moving_shape, iterations=30):
    """The moving -> fixed displacement on the moving grid (the inverse of ``flow_voxels``).

    The forward map takes fixed voxel ``x`` to moving voxel ``P (x + u(x))``,
    ``P = A_m^-1 A_f``, and ``x + u(x) = K (x + d(x))`` with ``K = A_f^-1 T A_f`` the initial
    alignment and ``d`` the deformable remainder (the network's field, refinement included).
    For each moving voxel ``m`` the fixed point is found by fixed-point iteration on the
    remainder alone, ``x <- z - d(x)`` with ``z = K^-1 P^-1 m`` (``d`` trilinear, edge-clamped),
    which converges wherever ``d`` is a contraction (no folding); the affine part is inverted
    exactly.

    Args:
      flow_voxels: ``[X, Y, Z, 3]`` forward field (voxels of the fixed grid, pulling).
      fixed_affine, moving_affine: 4x4 voxel -> RAS mm. initial: ``T`` (4x4 RAS).
      moving_shape: ``(X', Y', Z')`` of the moving grid.
    Returns:
      ``(inverse, residual)``: ``[X', Y', Z', 3]`` float32 tf, **voxels of the moving grid**,
      pulling: moving voxel ``m`` corresponds to the world point ``A_m (m + v(m))``, i.e. to
      fixed voxel ``A_f^-1 A_m (m + v(m))``; and ``[X', Y', Z']`` the last iteration's step in
      fixed voxels (0 where converged).
    """
    K = np.linalg.inv(fixed_affine) @ initial @ fixed_affine
    P = geometry.voxel_map(fixed_affine, moving_affine)
    fixed_shape = flow_voxels.shape[:3]
    remainder = []  # d(x) = K^-1 (x + u(x)) - x
    for rows in kernels.slabs(fixed_shape):
        x = kernels.grid_rows(fixed_shape, rows)
        u = tf.convert_to_tensor(flow_voxels[rows.start:rows.stop], tf.float32)
        remainder.append(kernels.affine_points(np.linalg.inv(K), x + u) - x)
    remainder = tf.concat(remainder, 0)[None]
    start = np.linalg.inv(K) @ np.linalg.inv(P)  # moving voxel -> z (fixed voxels)
    parts, residuals = [], []
    for rows in kernels.slabs(moving_shape):
        m = kernels.grid_rows(moving_shape, rows)
        z = kernels.affine_points(start, m)
        x = z
        for _ in range(int(iterations)):
            previous = x
            x = z - sampling.sample(remainder, x[None], "linear", "clamp")[0]
        residuals.append(tf.norm(x - previous, axis=-1))
        parts.append(kernels.affine_points(P, x) - m)
    return tf.concat(parts, 0), tf.concat(residuals, 0)


def inverse_consistency(flow_voxels, inverse, fixed_affine, moving_affine, mask):
    """RMS and 95th percentile (mm) of ``|inverse(forward(x)) - x|`` over the fixed ``mask``.

    ``forward``: ``flow_voxels`` (fixed grid); ``inverse``: :func:`inverse_field`'s field
    (moving grid), sampled trilinearly at the forward image of each fixed voxel.
    """
    P = geometry.voxel_map(fixed_affine, moving_affine)
    index = np.argwhere(np.asarray(mask))
    if len(index) > 400000:  # a deterministic subsample keeps it cheap on large masks
        index = index[:: len(index) // 400000 + 1]
    x = tf.constant(index, tf.float32)
    u = tf.gather_nd(tf.convert_to_tensor(flow_voxels, tf.float32), index)
    m = kernels.affine_points(P, x + u)
    v = sampling.sample(tf.convert_to_tensor(inverse, tf.float32)[None], m[None, :, None, None], "linear",
                       "clamp")[0, :, 0, 0]
    back = kernels.affine_points(np.linalg.inv(P), m + v)
    error = tf.norm(tf.tensordot(back - x, tf.constant(np.asarray(fixed_affine)[:3, :3].T, tf.float32), 1),
                    axis=-1).numpy()
    return float(np.sqrt(np.mean(error ** 2))), float(np.percentile(error, 95))


@dataclasses.dataclass
class Inverse:
    """The moving-space outputs (``--inverse``), all on the moving image's grid.

    ``flow``: ``[X', Y', Z', 3]`` float32, voxels of the moving grid, pulling (moving voxel
    ``m`` corresponds to the world point ``A_m (m + v(m))`` of the fixed image);
    ``warped_fixed``: the fixed image resampled into the moving space; ``warped_fixed_labels``:
    fixed label maps carried there (nearest); ``residual_max``: the largest last fixed-point
    step (fixed voxels).
    """

    flow: np.ndarray
    warped_fixed: np.ndarray
    warped_fixed_labels: list
    residual_max: float


@kernels.quiet_retracing
def invert(result, fixed, moving, fixed_labels=(), log=print):
    """Fill ``result.inverse`` (see :class:`Inverse` and :func:`inverse_field`)."""
    begin = time.perf_counter()
    T = np.asarray(result.affine["initial_alignment_ras"], float)
    flow, residual = inverse_field(result.flow_voxels, fixed.affine, moving.affine, T, moving.data.shape)
    moving_to_fixed = geometry.voxel_map(moving.affine, fixed.affine)
    shape = moving.data.shape
    warped = resample_through(fixed.data, moving_to_fixed, shape, "linear", "zero", flow)
    labels = [resample_through(v.data, moving_to_fixed, shape, "nearest", "zero", flow) for v in fixed_labels]
    residual_max = float(tf.reduce_max(residual))
    result.inverse = Inverse(flow.numpy(), warped, labels, residual_max)
    result.seconds["inverse"] = time.perf_counter() - begin
    log(f"inverse on the moving grid: fixed-point iteration, largest last step {residual_max:.3g} fixed voxels")
    return result
