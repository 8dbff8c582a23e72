import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage
from scipy.interpolate import BSpline, NdBSpline
from scipy.spatial.transform import Rotation

from vtn_tf.core import fields, sampling
from vtn_tf.preprocessing import augment

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


# Random affine augmentation. The references below build the transform in numpy/scipy from
# the drawn millimetre parameters: M = R · H · K with R from scipy's extrinsic "xyz" Euler
# angles (array axes 0, 1, 2), H unit upper triangular (h01, h02, h12), K = diag(scale); the
# fixed point p (mm from the volume centre) samples the moving image at M p + t.

RANGES = dict(rotation_degrees=15.0, scale=0.1, shear=0.05, translation_mm=20.0)
SPACING = (1.0, 1.5, 3.0)  # mm, anisotropic


def _millimetre_transform(parameters, element):
    p = {k: np.asarray(v, np.float64)[element] for k, v in parameters.items()}
    rotation = Rotation.from_euler("xyz", p["rotation_degrees"], degrees=True).as_matrix()
    h01, h02, h12 = p["shear"]
    shearing = np.array([[1.0, h01, h02], [0.0, 1.0, h12], [0.0, 0.0, 1.0]])
    return rotation @ shearing @ np.diag(p["scale"]), p["translation_mm"]


def _voxel_matrix(parameters, element, spacing):
    """Moving voxel index = A · fixed index + offset (scipy.ndimage.affine_transform's form)."""
    matrix, translation = _millimetre_transform(parameters, element)
    s = np.asarray(spacing, np.float64)
    A = np.diag(1 / s) @ matrix @ np.diag(s)
    return A, translation / s


def test_affine_flow_matches_millimetre_transform():
    shape = (9, 8, 7)
    parameters = augment.random_affine_parameters(2, _seed(11), **RANGES)
    W, b = augment.random_affine(2, _seed(11), **RANGES, spacing=SPACING)
    flow = fields.affine_flow(W, b, shape).numpy()
    s = np.asarray(SPACING)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    centred = index - (np.asarray(shape) - 1) / 2.0
    for element in range(2):
        matrix, translation = _millimetre_transform(parameters, element)
        sampled_mm = (centred * s) @ matrix.T + translation  # M p + t, p = S c
        expected = sampled_mm / s - centred  # displacement in voxels
        np.testing.assert_allclose(flow[element], expected, atol=1e-4)
        assert np.abs(expected).max() > 1.0  # a real transform, not near the identity


def test_affine_only_augmentation_matches_scipy_affine_transform():
    shape = (12, 10, 9)
    rng = np.random.default_rng(4)
    moving = rng.random((2,) + shape + (1,)).astype(np.float32)
    seed = _seed(21)
    ranges = dict(RANGES, translation_mm=3.0)  # keep most of this small volume in view
    warped, _ = augment.augment_moving(moving, None, seed, max_displacement=0.0,
                                       **ranges, spacing=SPACING)
    # augment_moving draws its affine from fold_in(seed, 1) (documented there).
    parameters = augment.random_affine_parameters(
        2, tf.random.experimental.stateless_fold_in(seed, 1), **ranges)
    centre = (np.asarray(shape) - 1) / 2.0
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    for element in range(2):
        A, b = _voxel_matrix(parameters, element, SPACING)
        offset = centre - A @ centre + b
        expected = ndimage.affine_transform(moving[element, ..., 0].astype(np.float64), A,
                                            offset=offset, order=1, mode="nearest")
        position = index @ A.T + offset
        inside = np.all((position >= 0) & (position <= np.asarray(shape) - 1), axis=-1)
        assert inside.mean() > 0.3
        np.testing.assert_allclose(warped.numpy()[element, ..., 0][inside], expected[inside],
                                   atol=1e-5)


def _recover(W, b, spacing):
    """Rotation angles (degrees), scales, shears and translations (mm) of (W, b), by QR."""
    s = np.asarray(spacing, np.float64)
    angles, scales, shears, translations = [], [], [], []
    for A, t in zip(np.eye(3) + np.asarray(W, np.float64), np.asarray(b, np.float64)):
        matrix = np.diag(s) @ A @ np.diag(1 / s)
        q, r = np.linalg.qr(matrix)  # matrix = R · (H K), H K upper triangular
        signs = np.sign(np.diag(r))
        q, r = q * signs, r * signs[:, None]
        angles.append(Rotation.from_matrix(q).as_euler("xyz", degrees=True))
        scales.append(np.diag(r))
        upper = r / np.diag(r)[None, :]
        shears.append([upper[0, 1], upper[0, 2], upper[1, 2]])
        translations.append(t * s)
    return map(np.array, (angles, scales, shears, translations))


def test_random_affine_draws_lie_within_and_span_their_ranges():
    spacing = (1.0, 1.2, 2.5)
    W, b = augment.random_affine(400, _seed(5), **RANGES, spacing=spacing)
    assert W.shape == (400, 3, 3) and b.shape == (400, 3) and W.dtype == tf.float32
    angles, scales, shears, translations = _recover(W.numpy(), b.numpy(), spacing)
    for values, centre, bound in ((angles, 0.0, 15.0), (scales, 1.0, 0.1), (shears, 0.0, 0.05),
                                  (translations, 0.0, 20.0)):
        deviation = values - centre
        assert np.abs(deviation).max() <= bound * (1 + 1e-4)
        # every component reaches 90 % of its bound on both sides over 400 draws
        assert np.all(deviation.max(axis=0) > 0.9 * bound)
        assert np.all(deviation.min(axis=0) < -0.9 * bound)


def test_affine_augmentation_same_seed_same_field_different_seed_different_field():
    def field(seed):
        return augment.augmentation_flow(2, SHAPE, seed, **RANGES, spacing=SPACING).numpy()

    a, b, c = field(_seed(3, 1)), field(_seed(3, 1)), field(_seed(3, 2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.5
    W1, _ = augment.random_affine(1, _seed(3), **RANGES)
    W2, _ = augment.random_affine(1, _seed(4), **RANGES)
    assert not np.array_equal(W1.numpy(), W2.numpy())


def test_zero_affine_ranges_are_the_bspline_only_path():
    rng = np.random.default_rng(6)
    moving = tf.constant(rng.random((2,) + SHAPE + (1,)), tf.float32)
    labels = tf.constant(rng.choice([0, 3, 7], size=(2,) + SHAPE + (1,)), tf.int32)
    zero = dict(rotation_degrees=0.0, scale=0.0, shear=0.0, translation_mm=0.0)
    warped, warped_labels = augment.augment_moving(moving, labels, _seed(8), **zero,
                                                   spacing=SPACING)
    flow = augment.random_bspline_flow(2, SHAPE, _seed(8))
    np.testing.assert_array_equal(warped.numpy(), sampling.warp(moving, flow).numpy())
    np.testing.assert_array_equal(warped_labels.numpy(),
                                  sampling.warp(labels, flow, "nearest").numpy())


def test_affine_augmentation_keeps_label_ids_and_moves_labels_with_image():
    blocks = np.zeros((2,) + SHAPE + (1,), np.int32)
    blocks[:, 6:, :, :] = 1
    blocks[:, :, 5:, 10:] += 2
    warped, warped_labels = augment.augment_moving(
        tf.constant(blocks, tf.float32), tf.constant(blocks), _seed(2), max_displacement=4.0,
        **RANGES, spacing=SPACING)
    assert warped_labels.dtype == tf.int32
    assert set(np.unique(warped_labels.numpy())) <= {0, 1, 2, 3}
    inside = np.abs(warped.numpy() - np.round(warped.numpy())) < 1e-6
    np.testing.assert_array_equal(warped_labels.numpy()[inside],
                                  np.round(warped.numpy()[inside]).astype(np.int32))
    assert not np.array_equal(warped_labels.numpy(), blocks)


@pytest.mark.parametrize("ranges, name", [
    (dict(rotation_degrees=-1.0), "rotation_degrees"),
    (dict(rotation_degrees=190.0), "rotation_degrees"),
    (dict(scale=1.0), "scale"),
    (dict(shear=float("nan")), "shear"),
    (dict(translation_mm="5"), "translation_mm"),
])
def test_bad_affine_ranges_are_refused(ranges, name):
    with pytest.raises(ValueError, match=name):
        augment.random_affine(1, _seed(0), **ranges)


def test_combined_field_is_bspline_then_affine():
    # compose(bspline, affine)(c) = affine(c) + bspline(sampled at the affine's position):
    # the moving image is deformed by the B-spline in its own frame, then moved by the affine.
    seed = _seed(13)
    flow = augment.augmentation_flow(1, SHAPE, seed, max_displacement=3.0, **RANGES,
                                     spacing=SPACING).numpy()[0]
    bspline = augment.random_bspline_flow(1, SHAPE, seed, max_displacement=3.0).numpy()[0]
    parameters = augment.random_affine_parameters(
        1, tf.random.experimental.stateless_fold_in(seed, 1), **RANGES)
    A, b = _voxel_matrix(parameters, 0, SPACING)
    centre = (np.asarray(SHAPE) - 1) / 2.0
    index = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    position = (index - centre) @ A.T + b + centre
    sampled = np.stack([ndimage.map_coordinates(bspline[..., c], np.moveaxis(position, -1, 0),
                                                order=1, mode="nearest") for c in range(3)], -1)
    np.testing.assert_allclose(flow, position - index + sampled, atol=1e-4)
