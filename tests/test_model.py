"""Tests of the VTN cascade (vtn_tf.nn.model) on tiny models, plus one slow real-data test.

References are independent of the code under test: scipy `map_coordinates` for warping and
composing, numpy for the affine field and the correlation coefficient.
"""

import pathlib
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from vtn_tf import VTN
from vtn_tf.core import metrics, sampling
from vtn_tf.nn import losses

SIZE = 64
WIDTH = 0.125


# ----- independent references ---------------------------------------------------------------
def voxel_grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


def reference_warp(image, flow, order=1):
    """warp(image, flow)(x) = image(x + flow(x)), edge-clamped, via scipy."""
    image, flow = np.asarray(image), np.asarray(flow, np.float64)
    grid = voxel_grid(image.shape[1:4])
    out = np.empty(image.shape, np.float64 if order else image.dtype)
    for b in range(image.shape[0]):
        coords = np.moveaxis(grid + flow[b], -1, 0)
        for c in range(image.shape[4]):
            out[b, ..., c] = ndimage.map_coordinates(
                np.asarray(image[b, ..., c], np.float64 if order else image.dtype), coords,
                order=order, mode="nearest")
    return out


def reference_compose(g1, g2):
    """Paper eq. 3: g1 ⋆ g2 = g2 + warp(g1, g2)."""
    return np.asarray(g2, np.float64) + reference_warp(g1, g2)


def reference_affine_flow(A, b, shape):
    centred = voxel_grid(shape) - (np.array(shape) - 1) / 2.0
    return np.einsum("xyzj,bij->bxyzi", centred, A - np.eye(3)) + b[:, None, None, None, :]


def smooth_images(batch=2, seed=0):
    """Blurred random volumes: a fixed image and a shifted, rescaled moving one."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(size=(batch, SIZE + 8, SIZE, SIZE)), (0, 3, 3, 3))
    base /= base.std()  # unit variance: the loss's 1e-6 variance epsilon stays negligible
    fixed = base[:, 4:-4]
    moving = 2.0 * base[:, 6:-2] + 0.5
    return fixed[..., None].astype(np.float32), moving[..., None].astype(np.float32)


@pytest.fixture(scope="module")
def add_run():
    keras.utils.set_random_seed(0)
    model = VTN("ADD", width=WIDTH)
    fixed, moving = smooth_images()
    out = model({"fixed": fixed, "moving": moving})
    return model, fixed, moving, {k: (v.numpy() if hasattr(v, "numpy") else [t.numpy() for t in v])
                                  for k, v in out.items()}


# ----- spec parsing and weights --------------------------------------------------------------
@pytest.mark.parametrize("spec", ["A", "D", "AD", "ADD", "ADDD", "DDD"])
def test_valid_specs(spec):
    model = VTN(spec, width=WIDTH)
    assert model.spec == spec and len(model.stages) == len(spec)
    assert len(model.similarity_weights) == len(spec) == len(model.smoothness_weights)


@pytest.mark.parametrize("spec", ["DA", "AA", "", "X", "ADA", "ad", None])
def test_invalid_specs(spec):
    with pytest.raises(ValueError):
        VTN(spec, width=WIDTH)


def test_default_weights_are_paper_table_1():
    model = VTN("ADDD")
    assert model.similarity_weights == [1.0, 0.0, 0.05, 1.0]
    assert model.smoothness_weights[1:] == [1.0, 1.0, 1.0]
    assert model.determinant_weight == 0.1 and model.orthogonality_weight == 0.1
    assert model.invertibility_weight == 0.0
    assert VTN("ADDD", similarity_weights="last").similarity_weights == [0.0, 0.0, 0.0, 1.0]
    assert VTN("DD", similarity_weights="last").similarity_weights == [0.0, 1.0]
    assert VTN("D").similarity_weights == [1.0]
    with pytest.raises(ValueError):
        VTN("ADD", similarity_weights=[1.0, 1.0])
    with pytest.raises(ValueError):
        VTN("ADD", similarity_weights="first")


def test_loss_term_names():
    assert VTN("AD", width=WIDTH).loss_term_names() == [
        "loss", "affine_similarity", "affine_determinant", "affine_orthogonality",
        "dense1_similarity", "dense1_smoothness"]
    assert VTN("DD", width=WIDTH, invertibility_weight=1e-3).loss_term_names()[-1] == "invertibility"


# ----- forward pass ----------------------------------------------------------------------------
def test_outputs_keys_and_shapes(add_run):
    _, fixed, _, out = add_run
    assert {"flow", "warped", "stage_flows", "stage_aggregate_flows", "stage_warped",
            "affine_matrix", "affine_translation"} <= set(out)
    assert out["flow"].shape == (2, SIZE, SIZE, SIZE, 3)
    assert out["warped"].shape == fixed.shape
    for key in ("stage_flows", "stage_aggregate_flows", "stage_warped"):
        assert len(out[key]) == 3
    assert out["affine_matrix"].shape == (2, 3, 3) and out["affine_translation"].shape == (2, 3)
    for value in (out["flow"], out["warped"], out["affine_matrix"]):
        assert np.all(np.isfinite(value))


def test_affine_stage_flow_is_the_affine_field(add_run):
    _, _, _, out = add_run
    expected = reference_affine_flow(out["affine_matrix"], out["affine_translation"], (SIZE,) * 3)
    np.testing.assert_allclose(out["stage_flows"][0], expected, atol=1e-3)
    np.testing.assert_allclose(out["stage_aggregate_flows"][0], expected, atol=1e-3)


def test_aggregate_flow_is_the_composition_of_stage_flows(add_run):
    _, _, moving, out = add_run
    A = out["affine_matrix"]
    affine, f1, f2 = out["stage_flows"]
    # After the affine stage: agg = A·f1 + affine_flow (exact composition of a linear field).
    agg1 = np.einsum("bij,bxyzj->bxyzi", A, f1) + affine
    np.testing.assert_allclose(out["stage_aggregate_flows"][1], agg1, atol=1e-3, rtol=1e-4)
    agg2 = reference_compose(out["stage_aggregate_flows"][1], f2)
    np.testing.assert_allclose(out["stage_aggregate_flows"][2], agg2, atol=2e-3, rtol=1e-4)
    np.testing.assert_allclose(out["flow"], out["stage_aggregate_flows"][2])
    assert np.abs(f2).max() > 0.5  # the composition is not trivially the identity


def test_warped_is_the_moving_image_resampled_once(add_run):
    _, _, moving, out = add_run
    np.testing.assert_allclose(out["warped"], reference_warp(moving, out["flow"]), atol=1e-3)
    for aggregate, warped in zip(out["stage_aggregate_flows"], out["stage_warped"]):
        np.testing.assert_allclose(warped, reference_warp(moving, aggregate), atol=1e-3)


def test_dense_only_cascade_composes():
    keras.utils.set_random_seed(1)
    model = VTN("DD", width=WIDTH)
    fixed, moving = smooth_images(batch=1, seed=1)
    out = model((fixed, moving))
    f1, f2 = (f.numpy() for f in out["stage_flows"])
    np.testing.assert_allclose(out["stage_aggregate_flows"][0].numpy(), f1)
    np.testing.assert_allclose(out["flow"].numpy(), reference_compose(f1, f2), atol=2e-3, rtol=1e-4)
    assert "affine_matrix" not in out


def test_test_time_recursion_composes_whole_passes(add_run):
    model, fixed, moving, out = add_run
    one = model.register(fixed, moving, passes=1)
    np.testing.assert_allclose(one["flow"].numpy(), out["flow"], atol=1e-5)
    two = model.register(fixed, moving, passes=2)
    # Pass 2 registers the pass-1 warped image (pinned to scipy by the test above) to the fixed
    # one; the composition and the final warp are checked against scipy.
    step = model({"fixed": fixed, "moving": out["warped"]})["flow"].numpy()
    assert np.abs(step).max() > 0.5  # the second pass moves voxels
    np.testing.assert_allclose(two["flow"].numpy(), reference_compose(out["flow"], step), atol=5e-3, rtol=1e-3)
    np.testing.assert_allclose(two["warped"].numpy(), reference_warp(moving, two["flow"].numpy()), atol=1e-3)
    np.testing.assert_allclose(two["affine_matrix"].numpy(), out["affine_matrix"], atol=1e-6)
    with pytest.raises(ValueError, match="passes"):
        model.register(fixed, moving, passes=0)


def test_loss_terms_are_weighted_correctly(add_run):
    model, fixed, moving, out = add_run
    terms = {k: float(v) for k, v in model.loss_terms(fixed, moving).items()}
    for k, name in enumerate(model.stage_names):
        r = [np.corrcoef(fixed[b].ravel(), out["stage_warped"][k][b].ravel())[0, 1] for b in range(2)]
        assert terms[f"{name}_similarity"] == pytest.approx(1 - np.mean(r), abs=1e-4)
    A = out["affine_matrix"]
    assert terms["affine_determinant"] == pytest.approx(np.mean((np.linalg.det(A) - 1) ** 2), rel=1e-3, abs=1e-6)
    expected = (1.0 * terms["affine_similarity"] + 0.1 * terms["affine_determinant"]
                + 0.1 * terms["affine_orthogonality"] + 0.05 * terms["dense1_similarity"]
                + terms["dense1_smoothness"] + 1.0 * terms["dense2_similarity"] + terms["dense2_smoothness"])
    assert terms["loss"] == pytest.approx(expected, rel=1e-5)


def test_local_ncc_similarity_replaces_the_correlation_coefficient(add_run):
    model, fixed, moving, out = add_run
    local = VTN.from_config({**model.get_config(), "similarity": "ncc", "ncc_window": 3})
    local.build((None, SIZE, SIZE, SIZE, 1))
    local.set_weights(model.get_weights())
    terms = {k: float(v) for k, v in local.loss_terms(fixed, moving).items()}
    for k, name in enumerate(model.stage_names):
        expected = np.mean(losses.local_ncc_loss(fixed, out["stage_warped"][k], 3).numpy())
        assert terms[f"{name}_similarity"] == pytest.approx(expected, rel=1e-4)
        r = [np.corrcoef(fixed[b].ravel(), out["stage_warped"][k][b].ravel())[0, 1] for b in range(2)]
        assert abs(terms[f"{name}_similarity"] - (1 - np.mean(r))) > 1e-3  # not the global loss


@pytest.mark.parametrize("kwargs, match", [({"similarity": "mse"}, "similarity"),
                                           ({"similarity": "ncc", "ncc_window": 4}, "odd"),
                                           ({"ncc_window": True}, "odd")])
def test_bad_similarity_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VTN("D", width=WIDTH, **kwargs)


# ----- training --------------------------------------------------------------------------------
def test_gradients_finite_and_reach_every_stage(add_run):
    model, fixed, moving, _ = add_run
    with tf.GradientTape() as tape:
        loss = model.loss_terms(fixed, moving, training=True)["loss"]
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) > 0
    for g, v in zip(grads, model.trainable_variables):
        assert g is not None, v.path
        assert np.all(np.isfinite(g.numpy())), v.path
    by_variable = {id(v): g for g, v in zip(grads, model.trainable_variables)}
    for stage in model.stages:  # every stage learns (no stage left without a signal)
        stage_grads = [by_variable[id(v)] for v in stage.trainable_variables]
        assert stage_grads and max(float(tf.reduce_max(tf.abs(g))) for g in stage_grads) > 0


def pair_dataset(fixed, moving):
    return tf.data.Dataset.from_tensors({"fixed": fixed, "moving": moving})


def test_train_step_reports_every_term():
    keras.utils.set_random_seed(2)
    model = VTN("AD", width=WIDTH)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    fixed, moving = smooth_images(batch=1, seed=2)
    model({"fixed": fixed, "moving": moving})  # build, to compare the weights after one step
    before = [v.numpy().copy() for v in model.trainable_variables]
    history = model.fit(pair_dataset(fixed, moving), epochs=1, verbose=0, shuffle=False)
    assert set(history.history) == set(model.loss_term_names())
    assert all(np.isfinite(v[0]) for v in history.history.values())
    assert int(model.optimizer.iterations.numpy()) == 1
    logs = model.evaluate(pair_dataset(fixed, moving), verbose=0, return_dict=True)
    assert set(logs) == set(model.loss_term_names())
    changed = [not np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables)]
    assert np.mean(changed) > 0.9  # Adam moves (almost) every variable in its first step


def test_train_on_batch_accepts_a_dict():
    model = VTN("D", width=WIDTH)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    fixed, moving = smooth_images(batch=1, seed=2)
    logs = model.train_on_batch({"fixed": fixed, "moving": moving}, return_dict=True)
    assert set(logs) == set(model.loss_term_names())


def test_invertibility_adds_its_metric():
    keras.utils.set_random_seed(3)
    model = VTN("D", width=WIDTH, invertibility_weight=1e-3)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    fixed, moving = smooth_images(batch=1, seed=3)
    logs = model.fit(pair_dataset(fixed, moving), epochs=1, verbose=0, shuffle=False).history
    assert set(logs) == set(model.loss_term_names())
    assert np.isfinite(logs["invertibility"][0]) and logs["invertibility"][0] > 0
    # Direct check against the loss on the forward and swapped passes.
    terms = model.loss_terms(fixed, moving)
    f12 = model({"fixed": fixed, "moving": moving})["flow"]
    f21 = model({"fixed": moving, "moving": fixed})["flow"]
    expected = float(tf.reduce_mean(losses.invertibility_loss(f12, f21, 0.5)))
    assert float(terms["invertibility"]) == pytest.approx(expected, rel=1e-5)


# ----- serialisation ---------------------------------------------------------------------------
def test_config_round_trip():
    model = VTN("ADD", width=0.25, flow_scale=10.0, flow_head_initializer="small",
                similarity_weights="last", smoothness_weights=[0, 2, 3], determinant_weight=0.2,
                orthogonality_weight=0.3, invertibility_weight=1e-3, central_fraction=0.75,
                similarity="ncc", ncc_window=7)
    config = model.get_config()
    clone = VTN.from_config(config)
    assert clone.get_config() == config
    assert (clone.spec, clone.width, clone.flow_head_initializer) == ("ADD", 0.25, "small")
    assert clone.similarity_weights == [0.0, 0.0, 1.0] and clone.smoothness_weights == [0, 2, 3]
    assert (clone.similarity, clone.ncc_window) == ("ncc", 7)


def test_save_and_load_give_the_same_flow(add_run, tmp_path):
    model, fixed, moving, out = add_run
    path = tmp_path / "vtn.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, VTN) and loaded.spec == "ADD"
    again = loaded({"fixed": fixed, "moving": moving})
    np.testing.assert_allclose(again["flow"].numpy(), out["flow"], atol=1e-4)


# ----- input validation ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    return VTN("AD", width=WIDTH)


@pytest.mark.parametrize("fixed_shape, moving_shape", [
    ((1, SIZE, SIZE, SIZE), (1, SIZE, SIZE, SIZE)),              # rank 4
    ((1, SIZE, SIZE, SIZE, 2), (1, SIZE, SIZE, SIZE, 2)),        # 2 channels
    ((1, SIZE, SIZE, SIZE, 1), (1, SIZE, SIZE, 2 * SIZE, 1)),    # mismatched grids
    ((1, 48, SIZE, SIZE, 1), (1, 48, SIZE, SIZE, 1)),            # not divisible by 64
])
def test_bad_shapes_are_rejected(tiny_model, fixed_shape, moving_shape):
    with pytest.raises(ValueError):
        tiny_model({"fixed": tf.zeros(fixed_shape), "moving": tf.zeros(moving_shape)})


def test_missing_keys_are_rejected(tiny_model):
    with pytest.raises(ValueError):
        tiny_model({"fixed": tf.zeros((1, SIZE, SIZE, SIZE, 1))})


def test_integer_images_are_rejected(tiny_model):
    image = tf.zeros((1, SIZE, SIZE, SIZE, 1), tf.int32)
    with pytest.raises(ValueError):
        tiny_model({"fixed": image, "moving": image})


# ----- slow, real data -------------------------------------------------------------------------
def load_volume(path):
    nib = pytest.importorskip("nibabel")
    return np.asanyarray(nib.load(str(path)).dataobj)


def normalise(image):
    """99th-percentile clip and rescale to [0, 1] (the set's dtypes and ranges differ wildly)."""
    image = image.astype(np.float32)
    low, high = np.min(image), np.percentile(image, 99)
    return np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)


@pytest.mark.slow
@pytest.mark.data
def test_training_on_one_hippocampus_pair_raises_dice(vtn_data):
    root = pathlib.Path(vtn_data) / "hippocampus"
    names = sorted(p.name for p in (root / "images").glob("*.nii.gz"))
    training = names[:-40]  # the last 40 are the evaluation subjects
    # A training pair with room to improve (unregistered Dice 0.45); a well-aligned pair such
    # as 003 → 001 (0.79) has no room for a +0.1 gain.
    fixed_name, moving_name = "hippocampus_001.nii.gz", "hippocampus_020.nii.gz"
    if fixed_name not in training or moving_name not in training:
        pytest.skip(f"{fixed_name} or {moving_name} missing from the hippocampus training subjects")
    fixed = normalise(load_volume(root / "images" / fixed_name))[None, ..., None]
    moving = normalise(load_volume(root / "images" / moving_name))[None, ..., None]
    fixed_labels = load_volume(root / "labels" / fixed_name).astype(np.int32)
    moving_labels = load_volume(root / "labels" / moving_name).astype(np.int32)[None, ..., None]

    def dice_now(model):
        flow = model({"fixed": fixed, "moving": moving})["flow"]
        warped = sampling.warp(moving_labels, flow, "nearest").numpy()[0, ..., 0]
        return metrics.dice(fixed_labels, warped, label_values=[1, 2])[1]

    keras.utils.set_random_seed(0)
    model = VTN("DD", width=0.25, flow_head_initializer="small", similarity_weights="last")
    model.compile(optimizer=keras.optimizers.Adam(5e-4))
    before = metrics.dice(fixed_labels, moving_labels[0, ..., 0], label_values=[1, 2])[1]
    initial = dice_now(model)
    data = tf.data.Dataset.from_tensors({"fixed": fixed, "moving": moving}).repeat()
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=STEPS, epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - start
    after = dice_now(model)
    print(f"\n{moving_name} → {fixed_name}: Dice unregistered {before:.3f}, untrained {initial:.3f}, "
          f"after {STEPS} steps {after:.3f} ({seconds:.0f} s training)")
    assert abs(initial - before) < 0.02  # the small flow head starts at the identity
    assert after > before + 0.1


STEPS = 200  # measured: Dice 0.45 → 0.52 / 0.61 / 0.66 / 0.67 after 50 / 100 / 150 / 200
