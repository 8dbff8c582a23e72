import numpy as np
import pytest
import tensorflow as tf
from scipy.interpolate import BSpline, NdBSpline

from vtn_tf import augment

SHAPE = (16, 12, 20)


def _seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def test_weights_are_a_partition_of_unity():
    for size, n in ((16, 5), (13, 5), (64, 5), (7, 4), (20, 2)):
        weights = augment.bspline_weights(size, n)
        assert weights.shape == (size, n)
        assert np.all(weights >= 0)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)


def test_weights_match_scipy_bspline():
    # Independent reference: scipy's cubic B-spline with unit knots, control j centred at
    # lattice coordinate j, edge controls repeated once beyond each end.
    size, n = 24, 5
    coefficients = np.random.default_rng(0).normal(size=n)
    padded = np.concatenate([coefficients[:1], coefficients, coefficients[-1:]])
    spline = BSpline(np.arange(-3, n + 3, dtype=float), padded, 3)
    t = (np.arange(size) + 0.5) * (n - 1) / size
    expected = spline(t)
    got = augment.bspline_weights(size, n) @ coefficients
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_flow_matches_scipy_tensor_product_spline():
    # Independent reference: scipy's tensor-product cubic spline (NdBSpline) with unit knots,
    # control j centred at lattice coordinate j, edge controls repeated once beyond each end,
    # evaluated at each voxel's lattice coordinate (index + 0.5) * (n - 1) / size.
    rng = np.random.default_rng(1)
    controls = rng.normal(size=(2, 5, 4, 6, 3)).astype(np.float32)
    flow = augment.bspline_flow(controls, SHAPE).numpy()
    assert flow.shape == (2,) + SHAPE + (3,)
    lattice = controls.shape[1:4]
    knots = tuple(np.arange(-3, n + 3, dtype=float) for n in lattice)
    axes = [(np.arange(size) + 0.5) * (n - 1) / size for size, n in zip(SHAPE, lattice)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    for element in range(2):
        padded = np.pad(controls[element].astype(np.float64), [(1, 1)] * 3 + [(0, 0)], mode="edge")
        expected = NdBSpline(knots, padded, 3)(points).reshape(SHAPE + (3,))
        np.testing.assert_allclose(flow[element], expected, atol=1e-5)


def test_zero_controls_give_exactly_zero_flow():
    flow = augment.bspline_flow(tf.zeros([2, 5, 5, 5, 3]), SHAPE)
    assert flow.shape == (2,) + SHAPE + (3,)
    assert np.all(flow.numpy() == 0.0)


def test_constant_controls_give_constant_flow():
    value = np.array([1.5, -2.0, 0.25], np.float32)
    controls = np.broadcast_to(value, (1, 5, 5, 5, 3))
    flow = augment.bspline_flow(controls, SHAPE).numpy()
    np.testing.assert_allclose(flow, np.broadcast_to(value, flow.shape), atol=1e-5)


def test_random_flow_bounded_by_max_displacement():
    largest = 0.0
    for seed in range(20):
        flow = augment.random_bspline_flow(2, SHAPE, _seed(seed), max_displacement=12.0)
        largest = max(largest, float(tf.reduce_max(tf.abs(flow))))
    assert largest <= 12.0
    assert largest > 3.0  # not trivially small either


def test_random_flow_is_smooth():
    flow = augment.random_bspline_flow(2, (32, 32, 32), _seed(3), max_displacement=12.0).numpy()
    # 4 spline segments of h = 8 voxels. The spline's second derivative interpolates the
    # controls' second differences (≤ 4 · 12 voxels), divided by h^2 per voxel; the discrete
    # second difference of a C2 piecewise cubic is an average of it.
    for axis in (1, 2, 3):
        second = np.diff(flow, n=2, axis=axis)
        assert np.abs(second).max() <= 4 * 12.0 / 8**2 + 1e-4
    assert np.abs(flow).max() > 1.0


def test_same_seed_same_field_different_seed_different_field():
    a = augment.random_bspline_flow(1, SHAPE, _seed(7, 1))
    b = augment.random_bspline_flow(1, SHAPE, _seed(7, 1))
    c = augment.random_bspline_flow(1, SHAPE, _seed(7, 2))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert np.abs(a.numpy() - c.numpy()).max() > 0.1


def test_bspline_flow_is_differentiable():
    controls = tf.Variable(tf.ones([1, 5, 5, 5, 3]))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(augment.bspline_flow(controls, (8, 8, 8)))
    gradient = tape.gradient(loss, controls).numpy()
    # Each voxel's weights sum to 1, so the gradients sum to the number of voxels per channel.
    np.testing.assert_allclose(gradient.sum(axis=(0, 1, 2, 3)), [512.0] * 3, rtol=1e-5)


def test_augment_moving_keeps_label_ids_and_grid():
    rng = np.random.default_rng(2)
    moving = tf.constant(rng.random((2,) + SHAPE + (1,)), tf.float32)
    labels = tf.constant(rng.choice([0, 3, 7, 42], size=(2,) + SHAPE + (1,)), tf.int32)
    warped, warped_labels = augment.augment_moving(moving, labels, _seed(5))
    assert warped.shape == moving.shape and warped.dtype == tf.float32
    assert warped_labels.shape == labels.shape and warped_labels.dtype == tf.int32
    assert set(np.unique(warped_labels.numpy())) <= {0, 3, 7, 42}
    assert np.abs(warped.numpy() - moving.numpy()).max() > 0.1  # it did deform
    # Trilinear sampling stays within the image's range.
    assert warped.numpy().min() >= 0.0 and warped.numpy().max() <= 1.0


def test_augment_moving_same_field_for_image_and_labels():
    # A label map equal to a piecewise-constant image must move exactly like it.
    blocks = np.zeros((1,) + SHAPE + (1,), np.int32)
    blocks[:, 8:, :, :] = 1
    blocks[:, :, 6:, :] += 2
    image = tf.constant(blocks, tf.float32)
    warped, warped_labels = augment.augment_moving(image, tf.constant(blocks), _seed(9))
    inside = np.abs(warped.numpy() - np.round(warped.numpy())) < 1e-6  # untouched by blending
    np.testing.assert_array_equal(warped_labels.numpy()[inside],
                                  np.round(warped.numpy()[inside]).astype(np.int32))


def test_augment_moving_without_labels_and_fixed_untouched():
    fixed = tf.constant(np.random.default_rng(3).random((1,) + SHAPE + (1,)), tf.float32)
    before = fixed.numpy().copy()
    warped, labels = augment.augment_moving(tf.identity(fixed), None, _seed(1))
    assert labels is None
    np.testing.assert_array_equal(fixed.numpy(), before)
    assert not np.array_equal(warped.numpy(), before)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        augment.bspline_flow(tf.zeros([1, 5, 5, 3]), SHAPE)
    with pytest.raises(ValueError):
        augment.bspline_flow(tf.zeros([1, 5, 5, 5, 3]), (8, 8))
