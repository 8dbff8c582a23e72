"""Tests of vtn_tf.core against independent references (scipy, numpy, analytic fields).

Conventions under test: images [B, X, Y, Z, C], flows [B, X, Y, Z, 3] in voxels of the
fixed grid, channel c along axis c, pulling: warp(I, f)(x) = I(x + f(x)), edges clamped.
"""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from vtn_tf.core import fields, sampling

RNG_SEED = 1234


def reference_warp(image, flow, order=1):
    """scipy reference of `sampling.warp`: per batch element and channel, edge-clamped."""
    image, flow = np.asarray(image), np.asarray(flow, dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape[1:4]], indexing="ij"), -1)
    out = np.empty_like(image)
    for b in range(image.shape[0]):
        coords = np.moveaxis(grid + flow[b], -1, 0)
        for c in range(image.shape[4]):
            out[b, ..., c] = ndimage.map_coordinates(image[b, ..., c], coords, order=order, mode="nearest")
    return out


def voxel_grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


# ----- warp --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, batch, channels, scale", [
    ((9, 12, 7), 2, 3, 2.0),     # moderate displacements, non-cubic grid, B > 1, C > 1
    ((8, 6, 10), 3, 1, 15.0),    # displacements far outside the volume: edge clamping
    ((1, 5, 4), 2, 2, 3.0),      # an axis of length 1 (a single slice)
    ((6, 2, 1), 1, 1, 2.0),      # lengths 2 and 1: every sample touches an edge
])
def test_warp_linear_matches_scipy(shape, batch, channels, scale):
    rng = np.random.default_rng(RNG_SEED)
    image = rng.normal(size=(batch, *shape, channels)).astype(np.float32)
    flow = (rng.uniform(-1, 1, size=(batch, *shape, 3)) * scale).astype(np.float32)
    out = sampling.warp(image, flow).numpy()
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_warp(image, flow), atol=2e-5)
    if scale > 10:  # many sample positions really were out of range
        assert np.mean(np.abs(flow) > np.array(shape)) > 0.05


def test_warp_nearest_matches_scipy_on_labels():
    rng = np.random.default_rng(RNG_SEED)
    shape = (9, 12, 7)
    labels = rng.integers(0, 40, size=(2, *shape, 2)).astype(np.int32) * 7 - 50  # ids ≠ indices
    # Integer part anywhere (also far outside), fractional part away from the .5 ties.
    frac = rng.uniform(-0.4, 0.4, size=(2, *shape, 3))
    flow = (rng.integers(-12, 13, size=(2, *shape, 3)) + frac).astype(np.float32)
    out = sampling.warp(labels, flow, "nearest").numpy()
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, reference_warp(labels, flow, order=0))
    assert set(np.unique(out)) <= set(np.unique(labels))


def test_warp_nearest_keeps_uint8_dtype():
    labels = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(1, 4, 5, 6, 1)
    out = sampling.warp(labels, np.full((1, 4, 5, 6, 3), 0.3, np.float32), "nearest")
    assert out.dtype == tf.uint8
    np.testing.assert_array_equal(out.numpy(), labels)


def test_zero_flow_is_identity():
    rng = np.random.default_rng(RNG_SEED)
    image = rng.normal(size=(2, 9, 12, 7, 2)).astype(np.float32)
    zero = np.zeros((2, 9, 12, 7, 3), np.float32)
    np.testing.assert_array_equal(sampling.warp(image, zero).numpy(), image)
    np.testing.assert_array_equal(sampling.warp(image, zero, "nearest").numpy(), image)


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_constant_integer_flow_pulls_along_its_channel_axis(interpolation):
    """A flow of +2 in channel 1 pulls from 2 voxels further along axis 1: out[x] = I[x + 2 e1]."""
    shape = (5, 9, 4)
    image = np.random.default_rng(0).normal(size=(1, *shape, 1)).astype(np.float32)
    flow = np.zeros((1, *shape, 3), np.float32)
    flow[..., 1] = 2.0
    out = sampling.warp(image, flow, interpolation).numpy()
    np.testing.assert_allclose(out[:, :, :-2], image[:, :, 2:], atol=1e-6)
    # The last two planes along axis 1 are clamped to the edge plane.
    np.testing.assert_allclose(out[:, :, -2:], np.repeat(image[:, :, -1:], 2, axis=2), atol=1e-6)


def test_warp_rejects_bad_inputs():
    image = np.zeros((1, 4, 4, 4, 1), np.float32)
    flow = np.zeros((1, 4, 4, 4, 3), np.float32)
    with pytest.raises(ValueError):
        sampling.warp(image[0], flow)
    with pytest.raises(ValueError):
        sampling.warp(image, flow[..., :2])
    with pytest.raises(ValueError):
        sampling.warp(image, np.zeros((1, 4, 4, 5, 3), np.float32))
    with pytest.raises(ValueError):
        sampling.warp(image.astype(np.int32), flow)  # linear warp of integers
    with pytest.raises(ValueError):
        sampling.warp(image, flow, "cubic")


def _central_difference_jacobian(fn, x, delta=1e-4):
    """d fn(x) / d x by central differences; x float64 array, fn returns a float64 array."""
    x = x.copy()
    base = fn(x)
    jac = np.zeros((base.size, x.size))
    flat = x.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + delta
        plus = fn(x).reshape(-1)
        flat[i] = old - delta
        minus = fn(x).reshape(-1)
        flat[i] = old
        jac[:, i] = (plus - minus) / (2 * delta)
    return jac


@pytest.mark.parametrize("batch, shape", [(1, (4, 5, 3)), (2, (3, 4, 2)), (1, (1, 5, 4)), (1, (6, 2, 1))])
def test_warp_gradients_match_finite_differences(batch, shape):
    """The warp's hand-written gradients against central differences of its own output.

    Positions are spread over [-2, size + 1) with fractional parts in [0.2, 0.8], so the
    map is smooth at each one: some fall outside the volume (clamped: no flow gradient
    along that axis, the edge voxel takes the image gradient), some inside. Grids with axes
    of length 1 and 2 exercise the clamped lower corner."""
    rng = np.random.default_rng(7)
    image = rng.normal(size=(batch, *shape, 2))
    grid = voxel_grid(shape)
    target = rng.integers(-2, np.array(shape) + 1, size=(batch, *shape, 3)) + rng.uniform(0.2, 0.8, (batch, *shape, 3))
    flow = target - grid
    weights = rng.normal(size=image.shape)  # a random linear functional of the output

    def loss_of(image_, flow_):
        return np.array([np.sum(weights * sampling.warp(image_, flow_).numpy())])

    image_t, flow_t = tf.constant(image), tf.constant(flow)
    with tf.GradientTape() as tape:
        tape.watch([image_t, flow_t])
        loss = tf.reduce_sum(weights * sampling.warp(image_t, flow_t))
    grad_image, grad_flow = tape.gradient(loss, [image_t, flow_t])
    assert np.all(np.isfinite(grad_image.numpy())) and np.all(np.isfinite(grad_flow.numpy()))
    fd_image = _central_difference_jacobian(lambda im: loss_of(im, flow), image).reshape(image.shape)
    fd_flow = _central_difference_jacobian(lambda fl: loss_of(image, fl), flow).reshape(flow.shape)
    np.testing.assert_allclose(grad_image.numpy(), fd_image, atol=1e-6)
    np.testing.assert_allclose(grad_flow.numpy(), fd_flow, atol=1e-6)
    assert np.abs(grad_flow.numpy()).max() > 0.1  # not trivially zero
    outside = (target < 0) | (target > np.array(shape) - 1)
    assert outside.any() and np.all(grad_flow.numpy()[outside] == 0)


def test_warp_flow_gradient_alone_in_a_graph():
    """Training differentiates the warp of a constant image with respect to the flow only (the
    image gradient is then pruned); the result must equal the full tape's flow gradient."""
    rng = np.random.default_rng(3)
    image = tf.constant(rng.normal(size=(1, 6, 5, 4, 1)).astype(np.float32))
    flow = tf.Variable(rng.normal(scale=1.5, size=(1, 6, 5, 4, 3)).astype(np.float32))
    weights = tf.constant(rng.normal(size=(1, 6, 5, 4, 1)).astype(np.float32))

    @tf.function
    def flow_only():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(weights * sampling.warp(image, flow))
        return tape.gradient(loss, flow)

    with tf.GradientTape() as tape:
        tape.watch(image)
        loss = tf.reduce_sum(weights * sampling.warp(image, flow))
    _, both = tape.gradient(loss, [image, flow])
    np.testing.assert_allclose(flow_only().numpy(), both.numpy(), rtol=1e-6, atol=1e-6)


def test_warp_gradients_finite_far_outside_volume():
    image = tf.constant(np.random.default_rng(1).normal(size=(1, 4, 4, 4, 1)).astype(np.float32))
    flow = tf.constant(np.full((1, 4, 4, 4, 3), 30.0, np.float32))
    with tf.GradientTape() as tape:
        tape.watch([image, flow])
        loss = tf.reduce_sum(sampling.warp(image, flow) ** 2)
    grads = tape.gradient(loss, [image, flow])
    for g in grads:
        assert np.all(np.isfinite(g.numpy()))


# ----- compose -----------------------------------------------------------------------------
SHAPE = (24, 28, 20)
WAVE = 2 * np.pi / 24.0


def smooth_image(points):
    """A smooth analytic image (wavelengths ≥ 24 voxels) evaluated at [..., 3] points."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return np.sin(WAVE * x + 0.3) * np.cos(0.8 * WAVE * y) + 0.5 * np.sin(WAVE * z + 0.9 * WAVE * x)


def smooth_flow(points, amplitude, phase):
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return amplitude * np.stack([np.sin(WAVE * y + phase), np.cos(WAVE * z + 2 * phase),
                                 np.sin(WAVE * x - phase)], -1)


def test_compose_law_on_smooth_fields():
    grid = voxel_grid(SHAPE)
    image = smooth_image(grid)[None, ..., None].astype(np.float32)
    g1 = smooth_flow(grid, 1.5, 0.4)[None].astype(np.float32)
    g2 = smooth_flow(grid, 2.0, 1.3)[None].astype(np.float32)
    twice = sampling.warp(sampling.warp(image, g1), g2).numpy()
    composed = fields.compose(g1, g2)
    once = sampling.warp(image, composed).numpy()
    # Analytic truth: I(x + g2(x) + g1(x + g2(x))).
    y = grid + g2[0]
    exact = smooth_image(y + smooth_flow(y, 1.5, 0.4))[None, ..., None]
    inner = (slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    # Tolerance: both sides differ from the truth only by trilinear interpolation errors,
    # ≤ h²/8 · Σ_axes|∂²I| per resampling of the image (Σ|∂²I| ≲ 2.5·WAVE² ≈ 0.17, so
    # ≈ 0.02), plus the interpolated g1's error (≤ 2·WAVE²/8 ≈ 0.02 voxel) times |∇I| ≲ 0.6.
    # The two-step path resamples the image twice: ≈ 0.04 + 0.01 (measured 0.042); 0.06
    # bounds it, while the wrong compositions below are off by ≥ 0.25.
    tolerance = 0.06
    assert np.abs(once - twice)[inner].max() < tolerance
    assert np.abs(once - exact)[inner].max() < tolerance
    assert np.abs(twice - exact)[inner].max() < tolerance
    # The law is discriminating: the wrong order or plain addition is much worse.
    wrong_order = sampling.warp(image, fields.compose(g2, g1)).numpy()
    added = sampling.warp(image, g1 + g2).numpy()
    assert np.abs(wrong_order - exact)[inner].max() > 3 * tolerance
    assert np.abs(added - exact)[inner].max() > 3 * tolerance
    # And the composed field itself is g2 + g1∘(id + g2), checked against the analytic one.
    exact_field = g2[0] + smooth_flow(y, 1.5, 0.4)
    assert np.abs(composed.numpy()[0] - exact_field)[5:-5, 5:-5, 5:-5].max() < 0.03


def test_compose_with_zero_flows():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(2, 6, 7, 5, 3)).astype(np.float32) * 2
    zero = np.zeros_like(g)
    np.testing.assert_allclose(fields.compose(g, zero).numpy(), g, atol=1e-6)
    np.testing.assert_allclose(fields.compose(zero, g).numpy(), g, atol=1e-6)
    np.testing.assert_array_equal(fields.compose(zero, zero).numpy(), zero)


def test_compose_of_translations_adds_them():
    shape = (6, 7, 5)
    t1 = np.broadcast_to(np.array([1.0, -2.0, 0.5], np.float32), (1, *shape, 3))
    t2 = np.broadcast_to(np.array([-0.25, 3.0, 1.0], np.float32), (1, *shape, 3))
    np.testing.assert_allclose(fields.compose(t1, t2).numpy(), t1 + t2, atol=1e-6)


# ----- affine_flow -------------------------------------------------------------------------
def rotation_about_axis2(degrees):
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


@pytest.mark.parametrize("degrees", [90.0, 30.0])
def test_affine_flow_moves_points_where_the_matrix_says(degrees):
    shape = (9, 12, 7)
    A = rotation_about_axis2(degrees) * np.array([1.0, 1.1, 0.9])  # rotation + anisotropic scale
    b = np.array([1.5, -2.0, 0.75])
    flow = fields.affine_flow((A - np.eye(3))[None].astype(np.float32), b[None].astype(np.float32), shape)
    assert flow.shape == (1, *shape, 3)
    p = voxel_grid(shape)
    c = (np.array(shape) - 1) / 2.0
    expected = (p - c) @ A.T + c + b
    np.testing.assert_allclose(p + flow.numpy()[0], expected, atol=1e-4)


def test_affine_flow_batch_and_identity():
    shape = (4, 6, 5)
    zero = fields.affine_flow(np.zeros((2, 3, 3), np.float32), np.zeros((2, 3), np.float32), shape)
    np.testing.assert_array_equal(zero.numpy(), np.zeros((2, *shape, 3)))
    W = np.stack([np.zeros((3, 3)), 0.1 * np.eye(3)]).astype(np.float32)
    b = np.array([[1, 2, 3], [0, 0, 0]], np.float32)
    flow = fields.affine_flow(W, b, shape).numpy()
    np.testing.assert_allclose(flow[0], np.broadcast_to(b[0], (*shape, 3)), atol=1e-6)
    c = (np.array(shape) - 1) / 2.0
    np.testing.assert_allclose(flow[1], 0.1 * (voxel_grid(shape) - c), atol=1e-6)


def test_translation_moves_a_bright_voxel_the_right_way():
    """Pull convention: out(x) = I(x + b), so a bright voxel at q appears at q - b."""
    shape = (10, 11, 9)
    q = np.array([5, 4, 6])
    b = np.array([2.0, -3.0, 1.0])
    image = np.zeros((1, *shape, 1), np.float32)
    image[0, q[0], q[1], q[2], 0] = 1.0
    flow = fields.affine_flow(np.zeros((1, 3, 3), np.float32), b[None].astype(np.float32), shape)
    out = sampling.warp(image, flow).numpy()[0, ..., 0]
    assert np.isclose(out.sum(), 1.0)
    assert tuple(np.argwhere(out == 1.0)[0]) == tuple(q - b.astype(int))


def test_rotation_warp_moves_a_bright_voxel_to_inverse_rotated_position():
    shape = (9, 9, 5)
    A = rotation_about_axis2(90.0)
    q = np.array([6, 2, 3])
    image = np.zeros((1, *shape, 1), np.float32)
    image[0, q[0], q[1], q[2], 0] = 1.0
    flow = fields.affine_flow((A - np.eye(3))[None].astype(np.float32), np.zeros((1, 3), np.float32), shape)
    out = sampling.warp(image, flow).numpy()[0, ..., 0]
    c = (np.array(shape) - 1) / 2.0
    expected = np.round(np.linalg.solve(A, q - c) + c).astype(int)  # A (p - c) + c = q
    assert out[tuple(expected)] == pytest.approx(1.0, abs=1e-5)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)


# ----- Jacobian determinant ----------------------------------------------------------------
def test_jacobian_determinant_of_affine_field_is_det_of_I_plus_W():
    rng = np.random.default_rng(5)
    shape = (7, 9, 6)
    W = rng.normal(scale=0.3, size=(2, 3, 3))
    b = rng.normal(size=(2, 3))
    grid = voxel_grid(shape)
    flow = np.einsum("xyzj,bij->bxyzi", grid, W) + b[:, None, None, None]
    det = fields.jacobian_determinant(flow.astype(np.float32)).numpy()
    assert det.shape == (2, *shape)
    for k in range(2):
        np.testing.assert_allclose(det[k], np.linalg.det(np.eye(3) + W[k]), rtol=1e-4, atol=1e-4)
    single = fields.jacobian_determinant(flow[0].astype(np.float32)).numpy()
    assert single.shape == shape


def test_jacobian_determinant_of_nonlinear_field_matches_analytic():
    shape = (16, 18, 14)
    x = voxel_grid(shape)
    w, a = 0.3, 0.8
    flow = np.stack([a * np.sin(w * x[..., 1]) + 0.02 * x[..., 0] ** 2,
                     a * np.sin(w * x[..., 2]) - 0.01 * x[..., 1] ** 2,
                     a * np.cos(w * x[..., 0]) + 0.3 * np.sin(w * x[..., 2])], -1)
    jac = np.zeros((*shape, 3, 3))
    jac[..., 0, 0] = 1 + 0.04 * x[..., 0]
    jac[..., 0, 1] = a * w * np.cos(w * x[..., 1])
    jac[..., 1, 1] = 1 - 0.02 * x[..., 1]
    jac[..., 1, 2] = a * w * np.cos(w * x[..., 2])
    jac[..., 2, 0] = -a * w * np.sin(w * x[..., 0])
    jac[..., 2, 2] = 1 + 0.3 * w * np.cos(w * x[..., 2])
    exact = np.linalg.det(jac)
    det = fields.jacobian_determinant(flow[None].astype(np.float32)).numpy()[0]
    # Central differences: error a·w³/6 ≈ 0.004 per entry; quadratics are exact.
    np.testing.assert_allclose(det[1:-1, 1:-1, 1:-1], exact[1:-1, 1:-1, 1:-1], atol=0.02)
    assert exact.min() < 0.75 and exact.max() > 1.2  # the field really varies


def test_jacobian_determinant_matches_numpy_gradient():
    """np.gradient uses the same scheme (central inside, one-sided at the edges)."""
    flow = np.random.default_rng(9).normal(size=(6, 7, 5, 3))
    grads = np.stack([np.stack(np.gradient(flow[..., c]), -1) for c in range(3)], -2)
    expected = np.linalg.det(np.eye(3) + grads)
    det = fields.jacobian_determinant(flow[None].astype(np.float32)).numpy()[0]
    np.testing.assert_allclose(det, expected, rtol=1e-4, atol=1e-4)


# ---- sample: resampling at absolute positions (another grid) ------------------------------
def _positions(rng, shape, out_shape, margin=2.0):
    high = np.asarray(shape, float) - 1.0 + margin
    return rng.uniform(-margin, high, size=(1, *out_shape, 3)).astype(np.float32)


def test_sample_linear_matches_scipy_with_clamping_and_zero_outside():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(1, 7, 9, 5, 2)).astype(np.float32)
    positions = _positions(rng, (7, 9, 5), (4, 6, 3))
    clipped = np.clip(positions[0], 0, np.array([6, 8, 4], float))
    expected = np.stack([ndimage.map_coordinates(image[0, ..., c], np.moveaxis(clipped, -1, 0), order=1,
                                                 mode="nearest") for c in range(2)], -1)
    got = sampling.sample(image, positions, "linear", "clamp").numpy()[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    inside = np.all((positions[0] >= -0.5) & (positions[0] < np.array([7, 9, 5]) - 0.5), axis=-1)
    got_zero = sampling.sample(image, positions, "linear", "zero").numpy()[0]
    np.testing.assert_allclose(got_zero, np.where(inside[..., None], expected, 0.0), atol=1e-5)
    assert (~inside).any() and inside.any()


def test_sample_nearest_keeps_ids_and_rounds_half_up():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 300, size=(1, 6, 5, 4, 1)).astype(np.int32)
    positions = _positions(rng, (6, 5, 4), (5, 5, 5))
    positions[0, 0, 0, 0] = (1.5, 2.5, 0.5)  # exact halves go up
    index = np.minimum(np.floor(np.clip(positions[0], 0, [5, 4, 3]) + 0.5).astype(int), [5, 4, 3])
    expected = labels[0, index[..., 0], index[..., 1], index[..., 2]]
    got = sampling.sample(labels, positions, "nearest").numpy()[0]
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int32 and got[0, 0, 0, 0] == labels[0, 2, 3, 1, 0]


def test_sample_position_gradient_matches_central_differences():
    rng = np.random.default_rng(5)
    image = tf.constant(rng.normal(size=(2, 6, 7, 5, 1)), tf.float32)
    positions = rng.uniform(0.2, 3.8, size=(2, 3, 3, 2, 3))
    positions = np.where(np.abs(positions - np.round(positions)) < 0.05, positions + 0.1, positions)
    weights = tf.constant(rng.normal(size=(2, 3, 3, 2, 1)), tf.float32)
    p = tf.Variable(positions.astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(sampling.sample(image, p, "linear", "zero") * weights)
    grad = tape.gradient(loss, p).numpy()
    eps = 1e-2
    numeric = np.zeros_like(positions)
    for index in np.ndindex(positions.shape):
        for sign in (1, -1):
            shifted = positions.copy()
            shifted[index] += sign * eps
            value = tf.reduce_sum(sampling.sample(image, shifted.astype(np.float32), "linear") * weights)
            numeric[index] += sign * float(value) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-3)


def test_sample_on_the_identity_positions_is_warp_with_a_zero_flow():
    rng = np.random.default_rng(6)
    image = rng.normal(size=(1, 5, 6, 4, 1)).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (5, 6, 4)], indexing="ij"), -1)[None]
    np.testing.assert_array_equal(sampling.sample(image, grid.astype(np.float32)).numpy(), image)


# ---- sample_mapped: the corner-table sampler of instance optimisation ---------------------
def _mapping(rng):
    """A [3, 4] map with rotation, scaling and shift (points -> image voxels)."""
    linear = np.linalg.qr(rng.normal(size=(3, 3)))[0] * rng.uniform(0.8, 1.2, 3)
    return np.concatenate([linear, rng.normal(1.0, 0.5, (3, 1))], 1).astype(np.float32)


def test_corner_table_rows_hold_the_8_neighbours_edge_repeated():
    rng = np.random.default_rng(21)
    image = rng.normal(size=(4, 3, 1)).astype(np.float32)  # an axis of length 1 too
    table = sampling.corner_table(image).numpy()
    assert table.shape == (4, 3, 1, 8)
    padded = np.pad(image, [(0, 1)] * 3, mode="edge")
    for k, (dx, dy, dz) in enumerate((a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)):
        np.testing.assert_array_equal(table[..., k], padded[dx:dx + 4, dy:dy + 3, dz:dz + 1])


def test_sample_mapped_matches_scipy_through_the_matrix_with_zero_outside():
    rng = np.random.default_rng(22)
    image = rng.normal(size=(7, 9, 5)).astype(np.float32)
    matrix = _mapping(rng)
    points = rng.uniform(-3.0, 10.0, size=(6, 5, 4, 3)).astype(np.float32)
    raw = points @ matrix[:, :3].T.astype(np.float64) + matrix[:, 3]
    clipped = np.clip(raw, 0, np.array([6, 8, 4], float))
    expected = ndimage.map_coordinates(image, np.moveaxis(clipped, -1, 0), order=1, mode="nearest")
    inside = np.all((raw >= -0.5) & (raw < np.array([7, 9, 5]) - 0.5), axis=-1)
    assert (~inside).any() and inside.any()
    got = sampling.sample_mapped(sampling.corner_table(image), tf.constant(points), tf.constant(matrix)).numpy()
    np.testing.assert_allclose(got, np.where(inside, expected, 0.0), atol=1e-5)


def test_sample_mapped_point_gradient_matches_central_differences():
    rng = np.random.default_rng(23)
    image = rng.normal(size=(6, 7, 5)).astype(np.float32)
    matrix = _mapping(rng)
    raw = rng.uniform(0.3, np.array([4.7, 5.7, 3.7]), size=(3, 3, 2, 3))  # image voxels, the points mapped there
    points = (raw - matrix[:, 3]) @ np.linalg.inv(matrix[:, :3].astype(np.float64)).T
    keep = np.all(np.abs(raw - np.round(raw)) > 0.05, -1)  # away from cell faces
    assert keep.sum() >= 5
    weights = rng.normal(size=points.shape[:3]) * keep
    table = sampling.corner_table(image)

    def value(p):
        return tf.reduce_sum(sampling.sample_mapped(table, p, tf.constant(matrix)) * weights.astype(np.float32))

    p = tf.constant(points.astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(p)
        loss = value(p)
    grad = tape.gradient(loss, p).numpy()
    # scipy's trilinear interpolation, differentiated numerically through the same map
    eps = 1e-3

    def scipy_value(q):
        at = q @ matrix[:, :3].T.astype(np.float64) + matrix[:, 3]
        return float(np.sum(ndimage.map_coordinates(image.astype(np.float64), np.moveaxis(at, -1, 0), order=1,
                                                    mode="nearest") * weights))
    numeric = np.zeros_like(points)
    for index in np.ndindex(points.shape):
        shifted = [points.copy(), points.copy()]
        shifted[0][index] += eps
        shifted[1][index] -= eps
        numeric[index] = (scipy_value(shifted[0]) - scipy_value(shifted[1])) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-3)
    assert np.abs(numeric).max() > 0.1
