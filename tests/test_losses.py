"""Tests of vtn_tf.nn.losses against numpy references and the paper's equations (5-12)."""

import numpy as np
import pytest
import tensorflow as tf

from vtn_tf.nn import losses

EPS = losses.ORTHOGONALITY_EPSILON


def finite_value_and_gradient(fn, *args):
    tensors = [tf.constant(a, tf.float32) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        value = fn(*tensors)
        total = tf.reduce_sum(value)
    grads = tape.gradient(total, tensors)
    assert np.all(np.isfinite(value.numpy())), value
    for g in grads:
        assert g is not None and np.all(np.isfinite(g.numpy())), g
    return value.numpy(), [g.numpy() for g in grads]


# ----- correlation coefficient (eq. 5-7) ---------------------------------------------------
def test_correlation_coefficient_loss_matches_numpy_corrcoef():
    rng = np.random.default_rng(0)
    fixed = rng.normal(size=(3, 6, 7, 5, 1))
    warped = 0.6 * fixed + rng.normal(size=fixed.shape) * np.array([0.2, 1.0, 5.0])[:, None, None, None, None]
    value = losses.correlation_coefficient_loss(fixed.astype(np.float32), warped.astype(np.float32)).numpy()
    assert value.shape == (3,)
    expected = [1 - np.corrcoef(fixed[b].ravel(), warped[b].ravel())[0, 1] for b in range(3)]
    np.testing.assert_allclose(value, expected, atol=1e-5)
    assert value[0] < value[1] < value[2]  # more noise, larger loss


def test_correlation_coefficient_loss_invariant_to_affine_intensity_rescale():
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(2, 8, 8, 8, 1)).astype(np.float32)
    value = losses.correlation_coefficient_loss(image, 3.5 * image - 7.0).numpy()
    np.testing.assert_allclose(value, 0.0, atol=1e-5)
    anti = losses.correlation_coefficient_loss(image, -image).numpy()
    # The 1e-6 variance epsilon over a variance of 1/12 shifts r by ≈ 1.2e-5.
    np.testing.assert_allclose(anti, 2.0, atol=5e-5)


@pytest.mark.parametrize("loss", [losses.correlation_coefficient_loss,
                                  lambda f, w: losses.local_ncc_loss(f, w, 3)], ids=["global", "local"])
@pytest.mark.parametrize("constant", [0.0, 3.0])
def test_similarity_losses_finite_on_constant_images(loss, constant):
    """No signal either way: the value is 1 ("uncorrelated") with finite gradients."""
    rng = np.random.default_rng(2)
    flat = np.full((1, 6, 6, 6, 1), constant, np.float32)
    other = rng.normal(size=flat.shape).astype(np.float32)
    for a, b in ((flat, flat), (flat, other), (other, flat)):
        value, _ = finite_value_and_gradient(loss, a, b)
        np.testing.assert_allclose(value, 1.0, atol=1e-3)


# ----- local normalised cross-correlation (not in the paper) --------------------------------
def numpy_local_ncc_loss(fixed, warped, window):
    """1 - mean over voxels of the squared correlation in the window cube cut to the image."""
    r, out = window // 2, []
    for b in range(fixed.shape[0]):
        values = []
        for index in np.ndindex(*fixed.shape[1:4]):
            box = tuple(slice(max(0, i - r), i + r + 1) for i in index)
            f = np.asarray(fixed[b][box], np.float64).ravel()
            w = np.asarray(warped[b][box], np.float64).ravel()
            covariance = np.mean(f * w) - f.mean() * w.mean()
            values.append(covariance ** 2 / (f.var() * w.var() + losses.NCC_EPSILON))
        out.append(1.0 - np.mean(values))
    return np.array(out)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_local_ncc_loss_matches_numpy_windows(window):
    rng = np.random.default_rng(10)
    fixed = rng.uniform(size=(2, 6, 7, 5, 1))
    warped = 0.5 * fixed + rng.uniform(size=fixed.shape) * np.array([0.1, 1.0])[:, None, None, None, None]
    value = losses.local_ncc_loss(fixed.astype(np.float32), warped.astype(np.float32), window).numpy()
    assert value.shape == (2,)
    np.testing.assert_allclose(value, numpy_local_ncc_loss(fixed, warped, window), atol=2e-5)
    if window > 1:
        assert value[0] < value[1]  # more noise, larger loss


@pytest.mark.parametrize("window", [1, 3, 5])
def test_local_ncc_against_precomputed_fixed_statistics_matches_numpy_windows(window):
    """The instance optimisation's form (fixed side computed once), compiled as it runs."""
    rng = np.random.default_rng(13)
    fixed = rng.uniform(size=(2, 7, 6, 5, 1))
    warped = 0.5 * fixed + rng.uniform(size=fixed.shape) * np.array([0.1, 1.0])[:, None, None, None, None]
    statistics = losses.local_ncc_fixed_statistics(fixed.astype(np.float32), window)
    compiled = tf.function(lambda w: losses.local_ncc_loss_to_fixed(statistics, w, window), jit_compile=True)
    value = compiled(tf.constant(warped, tf.float32)).numpy()
    np.testing.assert_allclose(value, numpy_local_ncc_loss(fixed, warped, window), atol=2e-5)


def test_local_ncc_against_precomputed_fixed_statistics_has_the_pooled_losss_gradient():
    """Its hand-written box-mean gradient against TensorFlow's own through average pools."""
    rng = np.random.default_rng(14)
    fixed = rng.uniform(size=(1, 9, 8, 7, 1)).astype(np.float32)
    warped = tf.constant(0.5 * fixed + 0.3 * rng.uniform(size=fixed.shape), tf.float32)
    statistics = losses.local_ncc_fixed_statistics(fixed, 5)
    gradients = []
    for loss in (lambda w: losses.local_ncc_loss_to_fixed(statistics, w, 5),
                 lambda w: losses.local_ncc_loss(fixed, w, 5)):
        with tf.GradientTape() as tape:
            tape.watch(warped)
            value = loss(warped)
        gradients.append(tape.gradient(value, warped).numpy())
    assert np.abs(gradients[1]).max() > 1e-4
    np.testing.assert_allclose(gradients[0], gradients[1], atol=1e-6 + 1e-4 * np.abs(gradients[1]).max())


def test_local_ncc_loss_ignores_a_smooth_bias_field_that_global_correlation_sees():
    """A multiplicative bias field (as in MRI) barely changes any 5³ window, but the global
    correlation drops: the reason to offer the local loss."""
    rng = np.random.default_rng(11)
    fixed = rng.uniform(0.2, 1.0, size=(1, 24, 24, 24, 1))
    x = np.linspace(0.0, 1.0, 24)[:, None, None, None]
    bias = np.exp(1.5 * x)  # a factor of 4.5 across the image, 1.07 per voxel
    warped = (fixed * bias).astype(np.float32)
    local = float(losses.local_ncc_loss(fixed.astype(np.float32), warped, 5)[0])
    global_ = float(losses.correlation_coefficient_loss(fixed.astype(np.float32), warped)[0])
    assert local < 0.1 and global_ > 0.3 and global_ > 5 * local, (local, global_)


def test_local_ncc_loss_zero_for_local_linear_maps_of_either_sign():
    rng = np.random.default_rng(12)
    image = rng.uniform(size=(2, 8, 8, 8, 1)).astype(np.float32)
    for mapped in (3.5 * image - 7.0, -2.0 * image + 1.0):
        np.testing.assert_allclose(losses.local_ncc_loss(image, mapped, 3).numpy(), 0.0, atol=2e-3)


@pytest.mark.parametrize("window", [0, 2, -3, 4.0])
def test_local_ncc_loss_rejects_bad_windows(window):
    image = np.zeros((1, 4, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="odd"):
        losses.local_ncc_loss(image, image, window)


# ----- total variation (eq. 8) -------------------------------------------------------------
def numpy_total_variation(flow):
    """Eq. 8 per batch element: (1/3) Σ_i mean_x ‖f(x + e_i) − f(x)‖² over valid x."""
    terms = [np.mean(np.sum(np.diff(flow, axis=axis) ** 2, -1), axis=(1, 2, 3)) for axis in (1, 2, 3)]
    return np.sum(terms, 0) / 3.0


def test_total_variation_matches_numpy():
    flow = np.random.default_rng(3).normal(size=(2, 5, 7, 4, 3))
    value = losses.total_variation_loss(flow.astype(np.float32)).numpy()
    np.testing.assert_allclose(value, numpy_total_variation(flow), rtol=1e-5)


def test_total_variation_of_linear_ramp():
    """f = (x, 0, 0): forward differences are 1 along axis 0 only → (1/3)·1."""
    x = np.arange(6, dtype=np.float32)
    flow = np.zeros((1, 6, 5, 4, 3), np.float32)
    flow[..., 0] = x[:, None, None]
    np.testing.assert_allclose(losses.total_variation_loss(flow).numpy(), [1 / 3], rtol=1e-6)


def test_total_variation_zero_for_constant_field():
    flow = np.broadcast_to(np.array([1.0, -2.0, 3.0], np.float32), (2, 4, 5, 6, 3))
    np.testing.assert_array_equal(losses.total_variation_loss(flow).numpy(), [0.0, 0.0])


# ----- folding penalty (not in the paper) ---------------------------------------------------
def numpy_folding(flow):
    """Mean of relu(-det J) over the cells, J = I + forward differences, by np.linalg.det."""
    f = flow.astype(np.float64)
    base = f[:, :-1, :-1, :-1]
    columns = [f[:, 1:, :-1, :-1] - base, f[:, :-1, 1:, :-1] - base, f[:, :-1, :-1, 1:] - base]
    J = np.stack(columns, -1) + np.eye(3)  # J[..., k, a] = d(x + u)_k / d x_a
    return np.maximum(-np.linalg.det(J), 0.0).mean(axis=(1, 2, 3))


def test_folding_loss_matches_numpy_determinants():
    flow = np.random.default_rng(5).normal(scale=0.6, size=(2, 5, 6, 4, 3)).astype(np.float32)
    expected = numpy_folding(flow)
    assert expected.min() > 0  # a field that folds somewhere, or the comparison proves little
    value, (gradient,) = finite_value_and_gradient(losses.folding_loss, flow)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert np.abs(gradient).max() > 0


def test_folding_loss_of_a_mirror_and_of_smooth_maps():
    """u = (-2x, 0, 0) maps x to -x (a mirror): det = -1 in every cell → 1; a rotation and a
    stretch keep orientation → 0."""
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (6, 5, 4)), indexing="ij")
    mirror = np.stack([-2 * x, 0 * y, 0 * z], -1)[None]
    np.testing.assert_allclose(losses.folding_loss(mirror).numpy(), [1.0], rtol=1e-6)
    c, s = np.cos(0.4), np.sin(0.4)
    rotation = np.stack([(c - 1) * x - s * y, s * x + (c - 1) * y, 0 * z], -1)[None]
    stretch = np.stack([0.5 * x, 0 * y, -0.3 * z], -1)[None]
    np.testing.assert_allclose(losses.folding_loss(np.concatenate([rotation, stretch])).numpy(), [0, 0], atol=1e-7)


# ----- orthogonality (eq. 9) and determinant (eq. 10) --------------------------------------
def numpy_orthogonality(A):
    s = np.linalg.svd(A, compute_uv=False)
    return np.sum(s ** 2 + s ** -2, -1) - 6


def random_rotations(n, rng):
    out = []
    for _ in range(n):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        out.append(q)
    return np.stack(out)


def test_orthogonality_loss_matches_svd_formula():
    rng = np.random.default_rng(4)
    rotations = random_rotations(8, rng)
    # Well-conditioned: singular values in [0.6, 1.7].
    A = np.einsum("bij,bj,bjk->bik", rotations, rng.uniform(0.6, 1.7, (8, 3)), random_rotations(8, rng))
    value = losses.orthogonality_loss(A.astype(np.float32)).numpy()
    # ε shifts λ² → λ² + ε: the loss moves by ≈ ε·Σ(1 − 1/λ⁴ ... ) ≤ 3ε·(1 + 1/0.6⁴) ≈ 3e-4.
    np.testing.assert_allclose(value, numpy_orthogonality(A), rtol=1e-4, atol=5e-4)
    assert value.min() > 0.05


def test_orthogonality_loss_zero_for_rotations():
    A = random_rotations(6, np.random.default_rng(5)).astype(np.float32)
    np.testing.assert_allclose(losses.orthogonality_loss(A).numpy(), 0.0, atol=1e-4)
    np.testing.assert_allclose(losses.orthogonality_loss(np.eye(3, dtype=np.float32)[None]).numpy(),
                               [0.0], atol=1e-5)


def test_orthogonality_loss_finite_at_identity_and_singular_matrices():
    near_singular = np.diag([1.0, 1.0, 1e-3])
    singular = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]])
    zero = np.zeros((3, 3))
    A = np.stack([np.eye(3), near_singular, singular, zero])
    value, (grad,) = finite_value_and_gradient(losses.orthogonality_loss, A)
    np.testing.assert_allclose(grad[0], 0.0, atol=1e-3)  # the identity is a minimum
    np.testing.assert_allclose(value[0], 0.0, atol=1e-5)
    # Near-singular: λ = 1e-3 → λ⁻² = 1e6 without ε, capped at about 1/(λ² + ε) ≈ 9.1e4 with it.
    assert 5e4 < value[1] < 1.1e6
    assert value[2] > 1e3 and value[3] > 1e3  # singular: large but bounded by 1/ε
    np.testing.assert_allclose(value, numpy_orthogonality_with_epsilon(A), rtol=1e-3)


def numpy_orthogonality_with_epsilon(A):
    """The documented ε-regularised loss from float64 eigenvalues μ of AᵀA + εI:
    Σμ + (1+ε)² Σ1/μ − 6(1+ε)."""
    mu = np.linalg.eigvalsh(np.swapaxes(A, -1, -2) @ A + EPS * np.eye(3))
    return mu.sum(-1) + (1 + EPS) ** 2 * (1 / mu).sum(-1) - 6 * (1 + EPS)


def test_orthogonality_loss_large_and_positive_for_rank_deficient_matrices():
    """Regression: the closed-form det(AᵀA + εI) in float32 cancelled catastrophically for
    singular A (a rank-2 matrix scored −1.4e5, rewarding collapse)."""
    rng = np.random.default_rng(10)
    rank2 = np.einsum("bij,bjk->bik", rng.normal(size=(6, 3, 2)) * 3, rng.normal(size=(6, 2, 3)))
    rank1 = np.einsum("bi,bj->bij", rng.normal(size=(4, 3)) * 3, rng.normal(size=(4, 3)))
    A = np.concatenate([rank2, rank1])
    value, (grad,) = finite_value_and_gradient(losses.orthogonality_loss, A)
    assert np.all(value > 1e4)
    np.testing.assert_allclose(value, numpy_orthogonality_with_epsilon(A), rtol=1e-3)


def test_determinant_loss_matches_numpy():
    A = np.random.default_rng(6).normal(size=(5, 3, 3))
    A[0] = np.diag([1.0, -1.0, 1.0])  # a reflection: (−1 − 1)² = 4
    value = losses.determinant_loss(A.astype(np.float32)).numpy()
    np.testing.assert_allclose(value, (np.linalg.det(A) - 1) ** 2, rtol=1e-4, atol=1e-5)
    assert value[0] == pytest.approx(4.0)
    rotations = random_rotations(3, np.random.default_rng(7)).astype(np.float32)
    np.testing.assert_allclose(losses.determinant_loss(rotations).numpy(), 0.0, atol=1e-6)
    finite_value_and_gradient(losses.determinant_loss, np.zeros((1, 3, 3)))


def test_matrix_losses_reject_bad_shapes():
    with pytest.raises(ValueError):
        losses.orthogonality_loss(np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError):
        losses.determinant_loss(np.zeros((1, 3, 4), np.float32))


# ----- invertibility (eq. 12) --------------------------------------------------------------
SHAPE = (16, 16, 12)


def constant_field(t):
    return np.broadcast_to(np.asarray(t, np.float32), (1, *SHAPE, 3)).copy()


def test_invertibility_zero_for_opposite_translations():
    t = [1.5, -2.0, 0.7]
    value = losses.invertibility_loss(constant_field(t), -constant_field(t), 0.5).numpy()
    np.testing.assert_allclose(value, [0.0], atol=1e-10)


def test_invertibility_for_same_translation_twice():
    """Going +t and +t again ends 2t away in both directions: 2·‖2t‖² = 8‖t‖²."""
    t = np.array([1.5, -2.0, 0.7])
    value = losses.invertibility_loss(constant_field(t), constant_field(t), 0.5).numpy()
    np.testing.assert_allclose(value, [8 * np.sum(t ** 2)], rtol=1e-5)


def test_invertibility_zero_for_affine_and_its_inverse():
    """f12(x) = (A − I)x + b and f21(y) = A⁻¹(y − b) − y on centred coordinates; both are
    linear so trilinear sampling is exact while the round trip stays in the volume."""
    A = np.array([[1.05, 0.08, 0.0], [-0.06, 0.97, 0.04], [0.02, 0.0, 1.03]])
    b = np.array([0.8, -0.5, 0.3])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1) - (np.array(SHAPE) - 1) / 2
    f12 = grid @ (A - np.eye(3)).T + b
    f21 = (grid - b) @ np.linalg.inv(A).T - grid
    value = losses.invertibility_loss(f12[None].astype(np.float32), f21[None].astype(np.float32), 0.5).numpy()
    np.testing.assert_allclose(value, [0.0], atol=1e-8)
    wrong = losses.invertibility_loss(f12[None].astype(np.float32), f12[None].astype(np.float32), 0.5).numpy()
    assert wrong[0] > 0.1


def test_invertibility_crops_to_the_central_region():
    """Fields non-zero only outside the central half of each axis cost nothing there."""
    rng = np.random.default_rng(8)
    border = np.ones(SHAPE, bool)
    border[4:12, 4:12, 3:9] = False  # central half: drop a quarter (16 → 4, 12 → 3) each side
    f12 = (rng.normal(size=(1, *SHAPE, 3)) * border[None, ..., None]).astype(np.float32)
    f21 = (rng.normal(size=(1, *SHAPE, 3)) * border[None, ..., None]).astype(np.float32)
    np.testing.assert_array_equal(losses.invertibility_loss(f12, f21, central_fraction=0.5).numpy(), [0.0])
    assert losses.invertibility_loss(f12, f21, central_fraction=1.0).numpy()[0] > 0.1
    with pytest.raises(ValueError):
        losses.invertibility_loss(f12, f21, central_fraction=0.0)


def test_invertibility_gradients_finite():
    rng = np.random.default_rng(9)
    f12 = rng.normal(size=(2, 8, 8, 8, 3))
    f21 = rng.normal(size=(2, 8, 8, 8, 3))
    value, grads = finite_value_and_gradient(lambda a, b: losses.invertibility_loss(a, b, 0.5), f12, f21)
    assert value.shape == (2,) and np.all(value > 0)
    assert all(np.abs(g).max() > 0 for g in grads)
