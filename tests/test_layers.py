"""Tests of vtn_tf.nn.layers against independent references: scipy `map_coordinates` for the
warp and the composition, numpy for the affine flow. Tiny tensors, no vtn_tf.core.

Conventions: images [B, X, Y, Z, C], flows [B, X, Y, Z, 3] in voxels of the fixed grid,
channel c along axis c, pulling: warp(I, f)(x) = I(x + f(x)), edges clamped.
"""

import keras
import numpy as np
import pytest
from scipy import ndimage

from vtn_tf.nn.layers import AffineFlow, ComposeFlows, SpatialTransformer

SHAPE = (7, 9, 6)


def voxel_grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


def reference_warp(image, flow, order=1):
    image, flow = np.asarray(image), np.asarray(flow, np.float64)
    out = np.empty(image.shape, np.float64 if order else image.dtype)
    for b in range(image.shape[0]):
        coords = np.moveaxis(voxel_grid(image.shape[1:4]) + flow[b], -1, 0)
        for c in range(image.shape[4]):
            out[b, ..., c] = ndimage.map_coordinates(image[b, ..., c], coords, order=order, mode="nearest")
    return out


def reference_affine_flow(W, b, shape):
    centred = voxel_grid(shape) - (np.array(shape) - 1) / 2.0
    return np.einsum("xyzj,bij->bxyzi", centred, W) + b[:, None, None, None, :]


def random_inputs(seed=0, batch=2, channels=2, scale=2.5):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(batch, *SHAPE, channels)).astype(np.float32)
    flow = (rng.uniform(-1, 1, size=(batch, *SHAPE, 3)) * scale).astype(np.float32)
    return image, flow


def affine_inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return (rng.normal(scale=0.1, size=(batch, 3, 3)).astype(np.float32),
            rng.normal(scale=2.0, size=(batch, 3)).astype(np.float32))


# ----- values ------------------------------------------------------------------------------
def test_spatial_transformer_linear_matches_scipy():
    image, flow = random_inputs(scale=6.0)  # many positions outside the volume: clamped
    out = SpatialTransformer()([image, flow])
    assert tuple(out.shape) == image.shape and out.dtype == "float32"
    np.testing.assert_allclose(out.numpy(), reference_warp(image, flow), atol=2e-5)


def test_spatial_transformer_nearest_keeps_integer_labels():
    rng = np.random.default_rng(1)
    labels = (rng.integers(0, 30, size=(2, *SHAPE, 1)) * 3 - 7).astype(np.int32)
    flow = (rng.integers(-4, 5, size=(2, *SHAPE, 3)) + rng.uniform(-0.4, 0.4, (2, *SHAPE, 3))).astype(np.float32)
    out = SpatialTransformer("nearest")([labels, flow])
    assert out.dtype == "int32"
    np.testing.assert_array_equal(out.numpy(), reference_warp(labels, flow, order=0))


def test_spatial_transformer_zero_flow_is_the_identity():
    image, flow = random_inputs()
    np.testing.assert_array_equal(SpatialTransformer()([image, 0 * flow]).numpy(), image)


def test_compose_flows_matches_the_definition():
    _, g1 = random_inputs(seed=2)
    _, g2 = random_inputs(seed=3)
    out = ComposeFlows()([g1, g2])
    assert tuple(out.shape) == g1.shape
    np.testing.assert_allclose(out.numpy(), g2 + reference_warp(g1, g2), atol=2e-5)


def test_composed_flow_warps_like_two_warps():
    """warp(warp(I, g1), g2) = warp(I, g1 ⋆ g2) for smooth fields (interpolation error aside)."""
    rng = np.random.default_rng(4)
    image = ndimage.gaussian_filter(rng.normal(size=(1, *SHAPE, 1)), (0, 2, 2, 2, 0)).astype(np.float32)
    g1 = np.full((1, *SHAPE, 3), [1.0, -1.0, 0.0], np.float32)  # whole-voxel shifts: exact
    g2 = np.full((1, *SHAPE, 3), [0.0, 2.0, 1.0], np.float32)
    once = SpatialTransformer()([image, ComposeFlows()([g1, g2])]).numpy()
    twice = reference_warp(reference_warp(image, g1), g2)
    inner = (slice(None), slice(1, -2), slice(2, -3), slice(1, -2))  # away from clamped edges
    np.testing.assert_allclose(once[inner], twice[inner], atol=1e-5)


def test_affine_flow_matches_numpy():
    W, b = affine_inputs()
    fixed = np.zeros((2, *SHAPE, 1), np.float32)
    out = AffineFlow()([W, b, fixed])
    assert tuple(out.shape) == (2, *SHAPE, 3)
    np.testing.assert_allclose(out.numpy(), reference_affine_flow(W, b, SHAPE), atol=1e-5)


def test_affine_flow_identity_and_translation():
    fixed = np.zeros((1, *SHAPE, 1), np.float32)
    out = AffineFlow()([np.zeros((1, 3, 3), np.float32), np.array([[1.5, -2.0, 0.25]], np.float32), fixed])
    np.testing.assert_array_equal(out.numpy(), np.broadcast_to([1.5, -2.0, 0.25], (1, *SHAPE, 3)))


def test_layers_compute_in_float32_under_a_mixed_policy():
    image, flow = random_inputs()
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = SpatialTransformer()
        out = layer([image, flow])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert layer.compute_dtype == "float32" and out.dtype == "float32"
    np.testing.assert_allclose(out.numpy(), reference_warp(image, flow), atol=2e-5)


# ----- shapes and bad arguments ------------------------------------------------------------
def test_compute_output_shape():
    assert SpatialTransformer().compute_output_shape([(None, 4, 5, 6, 2), (None, 4, 5, 6, 3)]) == (None, 4, 5, 6, 2)
    assert ComposeFlows().compute_output_shape([(2, 4, 5, 6, 3), (2, 4, 5, 6, 3)]) == (2, 4, 5, 6, 3)
    assert AffineFlow().compute_output_shape([(None, 3, 3), (None, 3), (None, 4, 5, 6, 1)]) == (None, 4, 5, 6, 3)


@pytest.mark.parametrize("kwargs, match", [({"interpolation": "cubic"}, "interpolation"),
                                           ({"boundary": "zeros"}, "boundary")])
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpatialTransformer(**kwargs)


@pytest.mark.parametrize("layer, shapes, match", [
    (SpatialTransformer(), [(None, 4, 5, 6, 1), (None, 4, 5, 6, 2)], "flow"),
    (SpatialTransformer(), [(None, 4, 5, 6, 1), (None, 4, 5, 7, 3)], "grid"),
    (ComposeFlows(), [(None, 4, 5, 6, 3)], "two inputs"),
    (AffineFlow(), [(None, 3, 3), (None, 3)], "reference"),
    (AffineFlow(), [(None, 3, 3), (None, 3), (None, None, 5, 6, 1)], "statically"),
    (AffineFlow(), [(None, 3, 4), (None, 3), (None, 4, 5, 6, 1)], "W"),
])
def test_bad_input_shapes_are_rejected(layer, shapes, match):
    with pytest.raises(ValueError, match=match):
        layer.build(shapes)


# ----- symbolic use and serialisation ------------------------------------------------------
def functional_model():
    """fixed, moving, W, b, dense flow → warped, aggregate flow, warped labels."""
    fixed = keras.Input(SHAPE + (1,), name="fixed")
    moving = keras.Input(SHAPE + (1,), name="moving")
    labels = keras.Input(SHAPE + (1,), dtype="int32", name="labels")
    W, b = keras.Input((3, 3), name="W"), keras.Input((3,), name="b")
    dense = keras.Input(SHAPE + (3,), name="dense")
    affine = AffineFlow(name="affine")([W, b, fixed])
    aggregate = ComposeFlows(name="compose")([affine, dense])
    warped = SpatialTransformer(name="warp")([moving, aggregate])
    warped_labels = SpatialTransformer("nearest", name="warp_labels")([labels, aggregate])
    assert tuple(affine.shape) == (None, *SHAPE, 3) and tuple(warped.shape) == (None, *SHAPE, 1)
    assert warped_labels.dtype == "int32"
    return keras.Model([fixed, moving, labels, W, b, dense], [warped, aggregate, warped_labels])


def functional_inputs():
    image, dense = random_inputs(seed=5, channels=1)
    W, b = affine_inputs(seed=6)
    labels = np.random.default_rng(7).integers(0, 5, size=(2, *SHAPE, 1)).astype(np.int32)
    return [image, image[::-1].copy(), labels, W, b, dense]


def test_functional_model_matches_the_references():
    fixed, moving, labels, W, b, dense = inputs = functional_inputs()
    warped, aggregate, warped_labels = functional_model()(inputs)
    affine = reference_affine_flow(W, b, SHAPE)
    expected = dense + reference_warp(affine, dense)
    np.testing.assert_allclose(aggregate.numpy(), expected, atol=5e-5)
    np.testing.assert_allclose(warped.numpy(), reference_warp(moving, aggregate.numpy()), atol=2e-5)
    np.testing.assert_array_equal(warped_labels.numpy(), reference_warp(labels, aggregate.numpy(), order=0))


@pytest.mark.parametrize("layer", [SpatialTransformer("nearest", name="w"), ComposeFlows(name="c"),
                                   AffineFlow(name="a", dtype="float64")])
def test_config_round_trip(layer):
    config = layer.get_config()
    again = type(layer).from_config(config)
    assert again.get_config() == config
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer) and revived.get_config() == config


def test_saved_functional_model_gives_the_same_outputs(tmp_path):
    model, inputs = functional_model(), functional_inputs()
    path = tmp_path / "spatial.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert {type(layer).__name__ for layer in loaded.layers} >= {"AffineFlow", "ComposeFlows", "SpatialTransformer"}
    for before, after in zip(model(inputs), loaded(inputs)):
        np.testing.assert_array_equal(before.numpy(), after.numpy())
