"""Training losses of VTN (paper §III-C and eq. 12).

Every loss returns one value per batch element (shape ``[B]``); the model
averages over the batch (see `vtn_tf.nn.model.VTN`). Inputs follow the field
conventions of `vtn_tf.core`: flows ``[B, X, Y, Z, 3]`` in voxels, pulling.
Losses compute in float32 even under mixed precision.
"""

import numpy as np
import tensorflow as tf

from vtn_tf.core import fields
from vtn_tf.nn.spec import check_ncc_window

VARIANCE_EPSILON = 1e-6
ORTHOGONALITY_EPSILON = 1e-5
# On the product of two local variances (intensities in [0, 1]): brain tissue
# windows have variances around 1e-2, flat background 0.
NCC_EPSILON = 1e-5


def _float32(x):
    return tf.cast(tf.convert_to_tensor(x), tf.float32)


def correlation_coefficient_loss(fixed, warped):
    """``1 - r`` with ``r`` the global Pearson correlation over all voxels (eq. 5-7).

    Args:
      fixed, warped: ``[B, X, Y, Z, C]`` images on the same grid.
    Returns:
      ``[B]`` float32 in ``[0, 2]``. A small epsilon on the variances keeps it
      finite (value 1, finite gradients) on constant images.
    """
    fixed, warped = _float32(fixed), _float32(warped)
    if fixed.shape.rank != 5 or fixed.shape[1:] != warped.shape[1:]:
        raise ValueError(f"fixed {fixed.shape} and warped {warped.shape} must both be [B, X, Y, Z, C] alike.")
    axes = [1, 2, 3, 4]
    fixed = fixed - tf.reduce_mean(fixed, axes, keepdims=True)
    warped = warped - tf.reduce_mean(warped, axes, keepdims=True)
    covariance = tf.reduce_mean(fixed * warped, axes)
    variance_fixed = tf.reduce_mean(tf.square(fixed), axes) + VARIANCE_EPSILON
    variance_warped = tf.reduce_mean(tf.square(warped), axes) + VARIANCE_EPSILON
    return 1.0 - covariance * tf.math.rsqrt(variance_fixed * variance_warped)


def _separable_box_mean(x, window):
    """Mean over the ``window``³ cube around each voxel, counting only voxels inside the image.

    Args:
      x: ``[B, X, Y, Z, C]`` float32.
    Returns:
      ``[B, X, Y, Z, C]``. Three 1-D average pools (SAME padding, which leaves the
      padding out of the count), equal to the cube mean because the count factorises.
    """
    for axis in range(3):
        size = [1, 1, 1]
        size[axis] = window
        x = tf.nn.avg_pool3d(x, ksize=[1, *size, 1], strides=[1, 1, 1, 1, 1], padding="SAME")
    return x


def local_ncc_loss(fixed, warped, window):
    """``1 - mean_x ncc²(x)``, the squared normalised cross-correlation in a cube
    of ``window``³ voxels around every voxel (VoxelMorph's "NCC" loss).

    Not in the VTN paper, which uses the global coefficient
    (`correlation_coefficient_loss`); offered for scans whose intensities do not
    relate by one global linear map (bias fields, brain MRI).

    Args:
      fixed, warped: ``[B, X, Y, Z, C]`` images on the same grid.
      window: odd cube side in voxels. Near the border the cube is cut to the
        voxels inside the image.
    Returns:
      ``[B]`` float32 in ``[0, 1]``: 0 when every window of ``warped`` is an
      increasing or decreasing linear function of ``fixed``'s, 1 where windows are
      uncorrelated or constant (flat backgrounds count as uncorrelated: their
      local variance is below the epsilon).
    """
    fixed, warped = _float32(fixed), _float32(warped)
    if fixed.shape.rank != 5 or fixed.shape[1:] != warped.shape[1:]:
        raise ValueError(f"fixed {fixed.shape} and warped {warped.shape} must both be [B, X, Y, Z, C] alike.")
    check_ncc_window(window)
    stacked = tf.concat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], axis=-1)
    mean_f, mean_w, mean_ff, mean_ww, mean_fw = tf.split(_separable_box_mean(stacked, window), 5, axis=-1)
    return _ncc_from_means(mean_f, tf.nn.relu(mean_ff - tf.square(mean_f)), mean_w, mean_ww, mean_fw)


def _ncc_from_means(mean_f, variance_fixed, mean_w, mean_ww, mean_fw):
    covariance = mean_fw - mean_f * mean_w
    variance_warped = tf.nn.relu(mean_ww - tf.square(mean_w))
    ncc_squared = tf.square(covariance) / (variance_fixed * variance_warped + NCC_EPSILON)
    return 1.0 - tf.reduce_mean(ncc_squared, [1, 2, 3, 4])


def _window_sum(x, axis, window):
    """Sum over the ``window`` voxels centred on each voxel along ``axis`` (zero outside):
    shifted slices of the padded tensor, a symmetric linear map."""
    radius, n = window // 2, x.shape[axis]
    pad = [[0, 0]] * x.shape.rank
    pad[axis] = [radius, radius]
    padded = tf.pad(x, pad)
    return tf.add_n([padded[(slice(None),) * axis + (slice(k, k + n),)] for k in range(window)])


def _inverse_counts(shape, axis, window):
    """``1 / (voxels of the window inside the image)`` along ``axis``, shaped to broadcast."""
    radius, index = window // 2, np.arange(shape[axis])
    count = np.minimum(index + radius, shape[axis] - 1) - np.maximum(index - radius, 0) + 1
    broadcast = [1] * len(shape)
    broadcast[axis] = shape[axis]
    return tf.constant((1.0 / count).astype(np.float32).reshape(broadcast))


def _shifted_box_mean(x, window):
    """`_separable_box_mean` as sums of shifted slices, with its transpose as the gradient:
    the same numbers, and under XLA a few fused passes (no pools, whose divisor volumes XLA
    constant-folds for seconds, nor dense products). ``x``: ``[B, X, Y, Z, C]``."""
    scales = [_inverse_counts(x.shape, axis, window) for axis in (1, 2, 3)]

    @tf.custom_gradient
    def mean(x):
        for axis, scale in zip((1, 2, 3), scales):
            x = _window_sum(x, axis, window) * scale

        def gradient(upstream):  # the transpose: (D3 S3 D2 S2 D1 S1)^T = S1 D1 S2 D2 S3 D3
            for axis, scale in zip((3, 2, 1), scales[::-1]):
                upstream = _window_sum(upstream * scale, axis, window)
            return upstream

        return x, gradient

    return mean(x)


def local_ncc_fixed_statistics(fixed, window):
    """The fixed image's share of :func:`local_ncc_loss`, for a fixed image that many
    warped images are compared with (instance optimisation): ``(fixed, window mean,
    window variance)``, each ``[B, X, Y, Z, C]`` float32."""
    fixed = _float32(fixed)
    check_ncc_window(window)
    mean_f, mean_ff = tf.split(_shifted_box_mean(tf.concat([fixed, fixed * fixed], -1), window), 2, axis=-1)
    return fixed, mean_f, tf.nn.relu(mean_ff - tf.square(mean_f))


def local_ncc_loss_to_fixed(statistics, warped, window):
    """:func:`local_ncc_loss` of ``warped`` against the fixed image whose
    :func:`local_ncc_fixed_statistics` are ``statistics`` (the same values, three box
    means per call instead of five)."""
    fixed, mean_f, variance_fixed = statistics
    warped = _float32(warped)
    mean_w, mean_ww, mean_fw = tf.split(
        _shifted_box_mean(tf.concat([warped, warped * warped, fixed * warped], -1), window), 3, axis=-1)
    return _ncc_from_means(mean_f, variance_fixed, mean_w, mean_ww, mean_fw)


def total_variation_loss(flow):
    """Smoothness (eq. 8): squared forward differences, mean over voxels and axes.

    Args:
      flow: ``[B, X, Y, Z, 3]`` a stage's own flow, voxels.
    Returns:
      ``[B]`` float32: ``(1/3) Σ_axes mean_x ‖f(x + e_axis) − f(x)‖²`` (the squared
      norm sums the 3 displacement components), in voxels².
    """
    flow = _float32(flow)
    terms = []
    for axis in (1, 2, 3):
        n = flow.shape[axis]
        inside = [1] * 5
        inside[axis] = n
        inside = tf.constant((np.arange(n) < n - 1).astype(np.float32).reshape(inside))  # no forward neighbour
        # A roll and a mask: its gradient is a roll back, cheaper than gathers or slices in graph
        # mode (training) and close to slices under XLA (docs/performance.md).
        diff = (tf.roll(flow, -1, axis) - flow) * inside
        count = float(np.prod(flow.shape[1:4]) // n * (n - 1))
        terms.append(tf.reduce_sum(tf.square(diff), [1, 2, 3, 4]) / count)
    return tf.add_n(terms) / 3.0


def folding_loss(flow):
    """Folding penalty: the mean over cells of ``relu(-det(I + D flow))``, ``D`` forward differences.

    Args:
      flow: ``[B, X, Y, Z, 3]`` voxels, pulling (channel c along axis c): the map is ``x + flow(x)``.
    Returns:
      ``[B]`` float32, 0 where the map keeps orientation everywhere; each cell of
      ``[X-1, Y-1, Z-1]`` where ``det(I + D flow) < 0`` adds its ``-det`` (the folding measure of
      `vtn_tf.core.fields.forward_jacobian_determinant`, here with a gradient).
    """
    return tf.reduce_mean(tf.nn.relu(-fields.forward_jacobian_determinant(_float32(flow))), [1, 2, 3])


def _determinant_3x3(m):
    """Closed-form determinant of ``[..., 3, 3]`` (no LU: smooth gradients everywhere)."""
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))


def _cofactors_3x3(m):
    """The nine 2x2 minors of ``[..., 3, 3]`` (signs irrelevant: only their squares are used)."""
    rows = [(1, 2), (0, 2), (0, 1)]
    return tf.stack([tf.stack([m[..., r0, c0] * m[..., r1, c1] - m[..., r0, c1] * m[..., r1, c0]
                               for c0, c1 in rows], -1) for r0, r1 in rows], -2)


def _check_matrix(A):
    A = _float32(A)
    if A.shape.rank != 3 or tuple(A.shape[1:]) != (3, 3):
        raise ValueError(f"A must have shape [B, 3, 3]; got {A.shape}.")
    return A


def orthogonality_loss(A):
    """How far ``A`` is from orthogonal (eq. 9): ``Σ_i (λ_i² + λ_i⁻²) − 6``.

    λ_i are the singular values of ``A``. Computed without SVD (Viète, paper
    §III-C) from ``C = AᵀA + εI`` whose eigenvalues are ``λ_i² + ε``: with
    ``s1 = tr C``, ``s2`` the sum of its principal 2x2 minors and ``s3 = det C``,
    the loss is ``s1 + (1+ε)² s2 / s3 − 6(1+ε)`` (0 for any rotation).

    Args:
      A: ``[B, 3, 3]`` the full affine matrix ``I + W``.
    Returns:
      ``[B]`` float32, ≥ 0 up to O(ε); finite, with finite gradients, even for
      singular ``A`` (ε bounds ``1/s3``).
    """
    A = _check_matrix(A)
    eps = ORTHOGONALITY_EPSILON
    # The invariants of M = AᵀA as sums of squares (no cancellation: the closed-form
    # det of C in float32 loses every digit for near-singular A and can turn negative):
    # tr M = ‖A‖², s2(M) = ‖adj A‖² (Cauchy–Binet), det M = det(A)². Then C = M + εI.
    trace_m = tf.reduce_sum(tf.square(A), [1, 2])
    minors_m = tf.reduce_sum(tf.square(_cofactors_3x3(A)), [1, 2])
    det_m = tf.square(_determinant_3x3(A))
    s1 = trace_m + 3 * eps
    s2 = minors_m + 2 * eps * trace_m + 3 * eps ** 2
    s3 = det_m + eps * minors_m + eps ** 2 * trace_m + eps ** 3
    return s1 + (1 + eps) ** 2 * s2 / s3 - 6 * (1 + eps)


def determinant_loss(A):
    """Penalise volume change and reflection (eq. 10): ``(det A − 1)²``.

    Args:
      A: ``[B, 3, 3]`` the full affine matrix ``I + W``.
    Returns:
      ``[B]`` float32.
    """
    A = _check_matrix(A)
    return tf.square(_determinant_3x3(A) - 1.0)


def central_region(tensor, central_fraction):
    """Crop ``[B, X, Y, Z, C]`` to its central ``central_fraction`` along each axis."""
    if not 0.0 < central_fraction <= 1.0:
        raise ValueError(f"central_fraction must be in (0, 1]; got {central_fraction}.")
    slices = [slice(None)]
    for n in tensor.shape[1:4]:
        margin = int(round(n * (1.0 - central_fraction) / 2.0))
        slices.append(slice(margin, n - margin))
    return tensor[tuple(slices) + (slice(None),)]


def invertibility_loss(f12, f21, central_fraction):
    """Round-trip error (eq. 12): ``‖f12 ⋆ f21‖² + ‖f21 ⋆ f12‖²``.

    ``f21 ⋆ f12 = f12 + warp(f21, f12)`` is the displacement of going from image
    1 into image 2 and back (zero when the two flows invert each other).

    Args:
      f12: ``[B, X, Y, Z, 3]`` flow on image 1's grid pointing into image 2 (voxels).
      f21: ``[B, X, Y, Z, 3]`` flow on image 2's grid pointing into image 1.
      central_fraction: the share of each axis kept (0.5 drops the first and last
        quarter, as the paper does for the liver, where borders are cropped anatomy).
    Returns:
      ``[B]`` float32: the mean over central voxels of the squared round-trip
      displacement (voxels²), summed over the two directions.
    """
    f12, f21 = _float32(f12), _float32(f21)
    there_and_back = fields.compose(f21, f12)
    back_and_there = fields.compose(f12, f21)
    total = 0.0
    for loop in (there_and_back, back_and_there):
        loop = central_region(loop, central_fraction)
        total += tf.reduce_mean(tf.reduce_sum(tf.square(loop), -1), [1, 2, 3])
    return total


def label_dice_loss(fixed_labels, warped_labels):
    """``1 -`` the mean soft Dice over structures, for anatomy-aware training.

    Args:
      fixed_labels: ``[B, X, Y, Z, K]`` one-hot (0/1) fixed label maps, one channel per
        foreground structure (background has no channel).
      warped_labels: ``[B, X, Y, Z, K]`` the moving one-hot maps warped trilinearly onto
        the fixed grid (values in [0, 1]).
    Returns:
      ``[B]`` float32 in [0, 1]: ``1 - mean_k 2 Σ f_k w_k / (Σ f_k + Σ w_k)`` over the
      structures present in either map of the pair (a structure absent from both neither
      helps nor hurts); 0 for a pair with no structure at all.
    """
    fixed, warped = _float32(fixed_labels), _float32(warped_labels)
    if fixed.shape.rank != 5 or fixed.shape[1:] != warped.shape[1:]:
        raise ValueError(f"fixed {fixed.shape} and warped {warped.shape} labels must both be "
                         "[B, X, Y, Z, K] alike.")
    axes = [1, 2, 3]
    overlap = tf.reduce_sum(fixed * warped, axes)
    volume = tf.reduce_sum(fixed, axes) + tf.reduce_sum(warped, axes)
    present = tf.cast(volume > 0, tf.float32)
    dice = 2.0 * overlap / tf.maximum(volume, 1e-6)
    count = tf.reduce_sum(present, -1)
    return tf.where(count > 0, 1.0 - tf.reduce_sum(dice * present, -1) / tf.maximum(count, 1.0), 0.0)
