"""Dense displacement fields: composition (eq. 3), affine flows (eq. 11), derivatives and Jacobians.

Pure TensorFlow maths (no Keras, no files); the conventions are `vtn_tf.core.sampling`'s.
"""

from collections.abc import Sequence

import tensorflow as tf

from vtn_tf.core.grids import TensorLike, centred_grid
from vtn_tf.core.sampling import check_flow, check_same_grid, warp


def compose(g1: TensorLike, g2: TensorLike) -> tf.Tensor:
    """Compose two flows (paper eq. 3): ``g1 ⋆ g2 = g2 + warp(g1, g2)``.

    Warping with ``g1`` then with ``g2`` equals warping once with ``g1 ⋆ g2``:
    ``warp(warp(I, g1), g2) = warp(I, compose(g1, g2))``.

    Args:
      g1: ``[B, X, Y, Z, 3]`` float flow in voxels, applied first.
      g2: ``[B, X, Y, Z, 3]`` float flow in voxels on the same grid, applied second.
    Returns:
      ``[B, X, Y, Z, 3]`` flow in voxels, pulling, on the same grid.
    """
    g1 = tf.convert_to_tensor(g1)
    g2 = tf.convert_to_tensor(g2)
    check_flow(g1, "g1")
    check_flow(g2, "g2")
    check_same_grid(g1, g2, "g1")
    return g2 + warp(g1, g2)


def affine_flow(W: TensorLike, b: TensorLike, spatial_shape: Sequence[int]) -> tf.Tensor:
    """The flow of the affine transform ``A = I + W`` on centred voxel coordinates.

    ``flow(x) = W x + b`` with ``x_j = index_j - (size_j - 1) / 2`` so that the
    sampled position is ``A x + b`` (paper eq. 11).

    Args:
      W: ``[B, 3, 3]`` float; ``A = I + W`` (W = 0 is the identity). Row i gives
        the displacement along axis i.
      b: ``[B, 3]`` float translation, in voxels.
      spatial_shape: ``(X, Y, Z)`` of the fixed grid.
    Returns:
      ``[B, X, Y, Z, 3]`` flow in voxels, pulling (fixed grid → moving image).
    """
    W = tf.convert_to_tensor(W)
    b = tf.convert_to_tensor(b, dtype=W.dtype)
    if W.shape.rank != 3 or tuple(W.shape[1:]) != (3, 3):
        raise ValueError(f"W must have shape [B, 3, 3]; got {W.shape}.")
    if b.shape.rank != 2 or b.shape[1] != 3:
        raise ValueError(f"b must have shape [B, 3]; got {b.shape}.")
    spatial_shape = tuple(int(n) for n in spatial_shape)
    if len(spatial_shape) != 3:
        raise ValueError(f"spatial_shape must be (X, Y, Z); got {spatial_shape}.")
    grid = centred_grid(spatial_shape, W.dtype)
    return tf.einsum("xyzj,bij->bxyzi", grid, W) + b[:, None, None, None, :]


def spatial_gradient(flow: tf.Tensor) -> tf.Tensor:
    """Derivatives of a field along each axis (central differences, one-sided at edges).

    Args:
      flow: ``[B, X, Y, Z, C]`` float, each spatial size ≥ 2.
    Returns:
      ``[B, X, Y, Z, C, 3]``: ``out[..., c, a] = d flow_c / d x_a`` per voxel.
    """
    grads = []
    for axis in (1, 2, 3):
        n = flow.shape[axis]
        if n is not None and n < 2:
            raise ValueError(f"every spatial size must be ≥ 2 for derivatives; got {flow.shape}.")
        first = tf.gather(flow, [1], axis=axis) - tf.gather(flow, [0], axis=axis)
        last = tf.gather(flow, [n - 1], axis=axis) - tf.gather(flow, [n - 2], axis=axis)
        ahead = tf.gather(flow, tf.range(2, n), axis=axis)
        behind = tf.gather(flow, tf.range(0, n - 2), axis=axis)
        middle = (ahead - behind) / 2.0
        grads.append(tf.concat([first, middle, last], axis=axis))
    return tf.stack(grads, axis=-1)


def jacobian_determinant(flow: TensorLike) -> tf.Tensor:
    """Jacobian determinant of the map ``x ↦ x + flow(x)`` at every voxel.

    Args:
      flow: ``[B, X, Y, Z, 3]`` (or ``[X, Y, Z, 3]``) float, voxels, pulling.
    Returns:
      ``[B, X, Y, Z]`` (or ``[X, Y, Z]``) float: ``det(I + ∇flow)``; 1 means no
      volume change, ≤ 0 means folding. Derivatives are central differences.
    """
    flow = tf.convert_to_tensor(flow)
    single = flow.shape.rank == 4
    if single:
        flow = flow[None]
    check_flow(flow)
    jac = spatial_gradient(flow) + tf.eye(3, dtype=flow.dtype)
    det = tf.linalg.det(jac)
    return det[0] if single else det


def forward_jacobian_determinant(flow: TensorLike) -> TensorLike:
    """``det(I + D flow)`` with **forward** differences ``D``, as the authors' code counts folding.

    Central differences skip the voxel itself, so a field that folds in a checkerboard
    (alternating voxels) looks smooth to them; forward differences see it. The folding
    measure of the results and the folding penalty of refinement.

    Args:
      flow: ``[..., X, Y, Z, 3]`` float (numpy or tf; e.g. a batch ``[B, X, Y, Z, 3]``), voxels,
        pulling (channel c along axis c).
    Returns:
      ``[..., X-1, Y-1, Z-1]`` determinants of the same kind and dtype (the last slice of each
      axis has no forward neighbour).
    """
    u = flow
    base = u[..., :-1, :-1, :-1, :]
    return cofactors([u[..., 1:, :-1, :-1, :] - base, u[..., :-1, 1:, :-1, :] - base,
                      u[..., :-1, :-1, 1:, :] - base])[1]


def cofactors(columns: Sequence[TensorLike]) -> tuple[list[list[TensorLike]], TensorLike]:
    """``(C, det)`` of ``J = I + [columns]``: ``columns[a]`` ``[..., 3]`` the derivative of the
    displacement along axis ``a``, so ``J[k][a] = δ_ka + columns[a][..., k]``; ``C[k][a]`` the
    cofactor of ``J[k][a]`` (``d det / d J[k][a]``), ``det = Σ_a J[0][a] C[0][a]``."""
    J = [[columns[a][..., k] + (1.0 if a == k else 0.0) for a in range(3)] for k in range(3)]
    C = [[J[(k + 1) % 3][(a + 1) % 3] * J[(k + 2) % 3][(a + 2) % 3]
          - J[(k + 1) % 3][(a + 2) % 3] * J[(k + 2) % 3][(a + 1) % 3] for a in range(3)] for k in range(3)]
    return C, J[0][0] * C[0][0] + J[0][1] * C[0][1] + J[0][2] * C[0][2]
