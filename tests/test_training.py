"""Training: TensorBoard contents, checkpoints, exact resume after SIGKILL, NaN guards."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from vtn_tf.io import InputError
from vtn_tf.nn import checkpoints
from vtn_tf.nn.model import VTN
from vtn_tf.training import config as config_lib
from vtn_tf.training import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny-ci.json"


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    from data_prep.toy import write_toy_folder
    root = tmp_path_factory.mktemp("toy")
    write_toy_folder(root / "raw", subjects=6)
    subprocess.run([sys.executable, "-m", "data_prep", "--layout", "folder", "--input", str(root / "raw"),
                    "--modality", "MRI", "--no-crop", "--grid", "64", "64", "64", "--validation-count", "2",
                    "--output", str(root / "prepared")], check=True, capture_output=True)
    return root / "prepared" / "manifest.json"


def tiny_config(manifest, *overrides):
    return config_lib.load_config(TINY, [f"data.manifest={manifest}", *overrides])


def test_affine_ranges_follow_the_switch():
    data = config_lib.load_config(overrides=["data.rotation_degrees=10"])["data"]
    assert loop.affine_ranges(data) == dict(rotation_degrees=0.0, scale=0.0, shear=0.0,
                                                translation_mm=0.0)
    data["affine_augment"] = True
    assert loop.affine_ranges(data) == dict(rotation_degrees=10, scale=0.1, shear=0.05,
                                                translation_mm=20.0)


def event_tags(log_dir):
    tags = set()
    for path in pathlib.Path(log_dir).rglob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(value.tag for value in event.summary.value)
    return tags


def test_training_writes_config_checkpoints_and_tensorboard(toy_manifest, tmp_path):
    config = tiny_config(toy_manifest)
    summary = loop.train(config, tmp_path / "run", verbose=0, log=lambda *_: None)
    total = config["train"]["epochs"] * config["train"]["steps_per_epoch"]
    assert summary["steps"] == total
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith(f"-{total}")
    tags = event_tags(tmp_path / "run" / "logs")
    for term in ["loss", "affine_similarity", "affine_determinant", "affine_orthogonality",
                 "dense1_similarity", "dense1_smoothness", "learning_rate"]:
        assert f"train/{term}" in tags
    assert {"validation/dice", "validation/dice_unregistered"} <= tags
    assert any(tag.startswith("validation/fixed_moving_warped") for tag in tags)
    model, shape, latest = checkpoints.restore_model(tmp_path / "run")
    assert shape == (64, 64, 64) and model.spec == "AD"
    copy = checkpoints.inference_weights(latest)  # the weights alone, named after the last checkpoint
    assert copy == str(tmp_path / "run" / "weights" / f"ckpt-{total}")
    stored = dict(tf.train.list_variables(latest))
    alone = {name for name, _ in tf.train.list_variables(copy) if name.startswith("model/")}
    assert alone == {name for name in stored if name.startswith("model/")}
    assert not [name for name, _ in tf.train.list_variables(copy) if name.startswith("optimizer/")]
    assert any(name.startswith("optimizer/") for name in stored)
    for name in alone:
        np.testing.assert_array_equal(tf.train.load_variable(copy, name), tf.train.load_variable(latest, name))


def test_init_from_starts_a_deeper_cascade_from_a_trained_one(toy_manifest, tmp_path):
    """AD trained, then ADD initialised from it: the affine and first dense stage start from the
    source's weights (checked against the files with tf.train.load_variable), the new stage from
    its initialiser; a source of another width is refused, naming the checkpoint."""
    one = tiny_config(toy_manifest, "train.epochs=1", "train.steps_per_epoch=2")
    loop.train(one, tmp_path / "source", verbose=0, log=lambda *_: None)
    source = checkpoints.inference_weights(tf.train.latest_checkpoint(str(tmp_path / "source" / "checkpoints")))
    deeper = tiny_config(toy_manifest, "model.spec=ADD", "model.similarity_weights=[1, 0, 1]", "train.epochs=1",
                         "train.steps_per_epoch=1", f"train.init_from={tmp_path / 'source'}")
    model = loop.build_model(deeper, (64, 64, 64))
    lines = []
    loaded, new = checkpoints.initialise_from(model, tmp_path / "source", lines.append)
    assert {key.split(".", 1)[0] for key in loaded} == {"affine", "dense1"}
    assert new and {key.split(".", 1)[0] for key in new} == {"dense2"}
    assert f"from {source}; new: dense2" in lines[0]
    for v in model.weights:
        key = v.path.split("/", 1)[-1].replace("/", ".")
        if key in loaded:
            np.testing.assert_array_equal(v.numpy(), tf.train.load_variable(
                source, f"model/{key.replace('.', '..')}/.ATTRIBUTES/VARIABLE_VALUE"))
    history = []
    loop.train(deeper, tmp_path / "deeper", verbose=0, log=history.append)
    assert any("initialised" in line and "new: dense2" in line for line in history), history
    wider = tiny_config(toy_manifest, "model.width=0.25", f"train.init_from={tmp_path / 'source'}")
    with pytest.raises(InputError, match=r"ckpt-2 does not fit this model \(shapes differ"):
        loop.train(wider, tmp_path / "wider", verbose=0, log=lambda *_: None)
    with pytest.raises(config_lib.ConfigError, match="not a run directory with a checkpoint"):
        loop.train(tiny_config(toy_manifest, f"train.init_from={tmp_path / 'nowhere'}"), tmp_path / "none",
                   verbose=0, log=lambda *_: None)
    assert not (tmp_path / "none").exists()


def test_a_different_config_is_not_resumed(toy_manifest, tmp_path):
    loop.train(tiny_config(toy_manifest), tmp_path / "run", verbose=0, log=lambda *_: None)
    with pytest.raises(config_lib.ConfigError, match="model.width"):
        loop.train(tiny_config(toy_manifest, "model.width=0.25"), tmp_path / "run", verbose=0)


def test_more_epochs_extend_a_finished_run(toy_manifest, tmp_path):
    """A finished 1-epoch run started again with epochs=2 goes on from its last checkpoint
    and ends where a straight 2-epoch run ends (same step, same weights); fewer epochs,
    or more epochs together with another change, are refused."""
    quiet = {"verbose": 0, "log": lambda *_: None}
    one, two = tiny_config(toy_manifest, "train.epochs=1"), tiny_config(toy_manifest, "train.epochs=2")
    loop.train(two, tmp_path / "straight", **quiet)
    loop.train(one, tmp_path / "extended", **quiet)
    messages = []
    summary = loop.train(two, tmp_path / "extended", verbose=0, log=messages.append)
    assert summary["start_step"] == 4 and summary["steps"] == 8
    assert any("extending" in m and "1 to 2 epochs" in m for m in messages)
    for a, b in zip(_trained_weights(tmp_path / "straight"), _trained_weights(tmp_path / "extended")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(config_lib.ConfigError, match="train.epochs"):
        loop.train(one, tmp_path / "extended", **quiet)
    with pytest.raises(config_lib.ConfigError, match="model.width"):
        loop.train(tiny_config(toy_manifest, "train.epochs=3", "model.width=0.25"),
                       tmp_path / "extended", **quiet)


def test_a_run_saved_before_a_field_existed_resumes(toy_manifest, tmp_path):
    """A saved config without a field added to the defaults since (as an older run's) reads as
    that field's default: the run resumes; a non-default value there is still another config."""
    quiet = {"verbose": 0, "log": lambda *_: None}
    config = tiny_config(toy_manifest, "train.epochs=1", "train.steps_per_epoch=1")
    loop.train(config, tmp_path / "run", **quiet)
    saved = tmp_path / "run" / "config.json"
    older = json.loads(saved.read_text())
    del older["model"]["folding_weight"], older["train"]["init_from"]
    saved.write_text(json.dumps(older))
    summary = loop.train(tiny_config(toy_manifest, "train.epochs=2", "train.steps_per_epoch=1"), tmp_path / "run",
                         **quiet)
    assert summary["start_step"] == 1 and summary["steps"] == 2
    with pytest.raises(config_lib.ConfigError, match="model.folding_weight"):
        loop.train(tiny_config(toy_manifest, "train.epochs=3", "train.steps_per_epoch=1", "model.folding_weight=1"),
                   tmp_path / "run", **quiet)


def _trained_weights(run_dir):
    model, _, _ = checkpoints.restore_model(run_dir)
    return [v.numpy() for v in model.trainable_variables]


@pytest.mark.slow
def test_sigkill_then_restart_resumes_exactly(toy_manifest, tmp_path):
    """Kill a run mid-way (SIGKILL) twice; the restarted command ends where an
    uninterrupted run ends: same step count, same weights (CPU is deterministic here)."""
    overrides = ["--set", f"data.manifest={toy_manifest}", "--set", "train.epochs=3",
                 "--set", "train.validate_every=1000"]
    command = [sys.executable, "-m", "vtn_tf.cli.train", "--config", str(TINY), "--progress", "0"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run(command + ["--run_dir", str(tmp_path / "straight")] + overrides, check=True,
                   capture_output=True, env=env)
    killed = tmp_path / "killed"
    delays = np.random.default_rng(0).uniform(0.0, 1.5, 2)  # kill mid-step, not just after a save
    for kill_after, delay in zip((2, 4), delays):
        process = subprocess.Popen(command + ["--run_dir", str(killed)] + overrides, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            latest = tf.train.latest_checkpoint(str(killed / "checkpoints"))
            if latest and int(latest.rsplit("-", 1)[1]) >= kill_after:
                break
            time.sleep(0.2)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert tf.train.latest_checkpoint(str(killed / "checkpoints")) is not None
    subprocess.run(command + ["--run_dir", str(killed)] + overrides, check=True, capture_output=True, env=env)
    straight_ckpt = tf.train.latest_checkpoint(str(tmp_path / "straight" / "checkpoints"))
    killed_ckpt = tf.train.latest_checkpoint(str(killed / "checkpoints"))
    assert straight_ckpt.rsplit("-", 1)[1] == killed_ckpt.rsplit("-", 1)[1] == "12"
    for a, b in zip(_trained_weights(tmp_path / "straight"), _trained_weights(killed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _nan_stream(batches=4):
    x = np.random.default_rng(0).random((1, 64, 64, 64, 1)).astype(np.float32)
    bad = x.copy()
    bad[0, 0, 0, 0, 0] = np.nan
    items = [{"fixed": x, "moving": x[:, ::-1].copy()}, {"fixed": bad, "moving": x}] * (batches // 2)
    return tf.data.Dataset.from_tensor_slices({k: np.concatenate([i[k] for i in items]) for k in items[0]}).batch(1)


def _small_model(on_nonfinite):
    config = config_lib.load_config(TINY, [f"train.on_nonfinite={on_nonfinite}"])
    return loop.build_model(config, (64, 64, 64))


def test_nonfinite_loss_stops_without_checkpoint(tmp_path):
    model = _small_model("stop")
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(tmp_path), 2)
    with pytest.raises(FloatingPointError, match="loss became nan at step 2"):
        model.fit(_nan_stream(), callbacks=[loop.NonFiniteGuard(), loop.Checkpoints(manager, 1, 10)],
                  verbose=0)
    assert manager.latest_checkpoint.endswith("-1")  # the good step 1 only


def test_nonfinite_batches_can_be_skipped():
    model = _small_model("skip")
    before = [v.numpy().copy() for v in model.trainable_variables]
    history = model.fit(_nan_stream(), verbose=0)
    assert history.history["skipped_batches"][-1] == pytest.approx(0.5)
    assert int(model.optimizer.iterations) == 4
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables))


def test_paper_schedule_is_the_config_schedule():
    from tests.test_config import SMALL_RATES, SMALL_SCHEDULE

    config = config_lib.load_config(overrides=SMALL_SCHEDULE + ["model.spec=D", "model.width=0.125"])
    train = config["train"]
    schedule = loop.PaperSchedule(train["learning_rate"], train["steps_per_epoch"], train["halve_after_epoch"])
    for step, rate in SMALL_RATES.items():
        assert float(schedule(tf.constant(step, tf.int64))) == pytest.approx(rate, rel=1e-6)
    again = loop.PaperSchedule.from_config(schedule.get_config())
    assert float(again(7)) == pytest.approx(5e-4, rel=1e-6)
    optimizer = loop.build_model(config, (64, 64, 64)).optimizer  # the schedule training uses
    for step in (0, 9, 30):
        optimizer.iterations.assign(step)
        assert float(optimizer.learning_rate) == pytest.approx(SMALL_RATES[step], rel=1e-6)


def test_a_half_written_checkpoint_never_replaces_the_last_good_one(toy_manifest, tmp_path):
    """Simulate a crash in the middle of a checkpoint write: the data files of a newer
    checkpoint exist (truncated) but the index was never updated. Resuming uses the
    last complete checkpoint."""
    config = tiny_config(toy_manifest)
    run = tmp_path / "run"
    loop.train(config, run, verbose=0, log=lambda *_: None)
    folder = run / "checkpoints"
    good = tf.train.latest_checkpoint(str(folder))
    for source in folder.glob(pathlib.Path(good).name + ".*"):
        half = source.read_bytes()[: max(1, source.stat().st_size // 2)]
        (folder / source.name.replace(pathlib.Path(good).name, "ckpt-99")).write_bytes(half)
    assert tf.train.latest_checkpoint(str(folder)) == good
    model, _, restored = checkpoints.restore_model(run)
    assert restored == good


def test_mixed_precision_keeps_flows_warps_and_losses_in_float32(toy_manifest):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = VTN("AD", width=0.125, flow_head_initializer="small")
        x = np.random.default_rng(0).random((1, 64, 64, 64, 1)).astype(np.float32)
        out = model({"fixed": x, "moving": x[:, ::-1].copy()})
        assert model.stages[-1].compute_dtype == "float16"
        for name in ("flow", "warped", "affine_matrix"):
            assert out[name].dtype == tf.float32, name
        terms = model.loss_terms(x, x[:, ::-1].copy())
        assert all(value.dtype == tf.float32 and np.isfinite(float(value)) for value in terms.values())
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("fails", [False, True])
def test_training_puts_the_global_policy_back(toy_manifest, tmp_path, monkeypatch, fails):
    """train.mixed_precision computes in float16 during the run; the policy the caller had
    (here mixed_bfloat16) is back afterwards, also when the run fails."""
    seen = {}

    def fit(model, *args, **kwargs):
        seen["policy"] = keras.mixed_precision.global_policy().name
        seen["network"] = model.stages[-1].compute_dtype
        if fails:
            raise RuntimeError("failed in fit")

    monkeypatch.setattr(VTN, "fit", fit)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        config = tiny_config(toy_manifest, "train.mixed_precision=true")
        if fails:
            with pytest.raises(RuntimeError, match="failed in fit"):
                loop.train(config, tmp_path / "run", verbose=0, log=lambda *_: None)
        else:
            loop.train(config, tmp_path / "run", verbose=0, log=lambda *_: None)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert seen == {"policy": "mixed_float16", "network": "float16"}


def test_validation_dice_is_the_evaluation_metric(toy_manifest, tmp_path):
    """Validation scores each held-out pair as vtn-evaluate does (`vtn_tf.evaluation.protocols.pair_metrics`
    over `vtn_tf.core.metrics`): the mean over pairs of the label-mean Dice of the moving labels
    warped with nearest neighbour, the unregistered Dice, and the folding percentage."""
    from scipy import ndimage

    from vtn_tf.core import sampling
    from vtn_tf.evaluation import protocols
    from vtn_tf.training import data as data_lib

    dataset = data_lib.load_prepared(toy_manifest, splits=("validation",))
    pairs = data_lib.evaluation_pairs(dataset.ids("validation"), "pairwise")
    batches = list(data_lib.evaluation_batches(dataset, pairs, include_labels=True))
    keras.utils.set_random_seed(1)
    model = VTN("AD", width=0.125)  # the paper's flow head: random flows of a few voxels
    validation = loop.Validation(batches, dataset.label_values, tf.summary.create_file_writer(str(tmp_path)),
                                     every=1, log=lambda *_: None)
    validation.set_model(model)
    result = validation.evaluate(0)
    registered, unregistered = [], []
    for batch in batches:
        flow = model({"fixed": batch["fixed"], "moving": batch["moving"]})["flow"]
        fixed_labels, moving_labels = (batch[name].numpy()[0, ..., 0] for name in ("fixed_labels", "moving_labels"))
        warped = sampling.warp(batch["moving_labels"], flow, "nearest").numpy()[0, ..., 0]
        registered.append(protocols.pair_metrics(fixed_labels, warped, dataset.label_values, flow.numpy()[0]))
        unregistered.append(protocols.pair_metrics(fixed_labels, moving_labels, dataset.label_values, None))
        # The labels really move with the flow (scipy's nearest neighbour, up to rounding ties).
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in warped.shape], indexing="ij"), -1)
        coords = np.moveaxis(grid + flow.numpy()[0], -1, 0)
        reference = ndimage.map_coordinates(moving_labels, coords, order=0, mode="nearest")
        assert np.mean(reference != warped) < 1e-4 < np.mean(moving_labels != warped)
    assert result["dice"] == np.nanmean([row["dice"] for row in registered])
    assert result["dice_unregistered"] == np.nanmean([row["dice"] for row in unregistered])
    assert result["folding_percent"] == pytest.approx(np.mean([row["folding_percent"] for row in registered]),
                                                      rel=1e-6, abs=1e-9)
    assert result["dice"] != result["dice_unregistered"]


def test_a_run_directory_under_a_file_is_an_input_error(tmp_path):
    from vtn_tf.io import InputError

    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="file.txt/run cannot be created"):
        loop.prepare_run_dir(tmp_path / "file.txt" / "run", config_lib.load_config())


def test_the_register_section_is_not_part_of_what_a_run_trains(tmp_path):
    """A run's test-time recommendations (config section ``register``) may change on a
    trained run; config.json then holds the new ones. A change to a trained field is still
    refused, and an unknown register field is a config error."""
    config = config_lib.load_config()
    loop.prepare_run_dir(tmp_path / "run", config)
    recommended = config_lib.apply_overrides(config, ["register.passes=2", "register.refine=40x12"])
    loop.prepare_run_dir(tmp_path / "run", recommended, log=lambda *_: None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["register"]["passes"] == 2 and saved["register"]["refine"] == "40x12"
    with pytest.raises(config_lib.ConfigError, match="model.width"):
        loop.prepare_run_dir(tmp_path / "run", config_lib.apply_overrides(recommended, ["model.width=0.25"]))
    with pytest.raises(config_lib.ConfigError, match="unknown field register.refine_steps"):
        config_lib.apply_overrides(config, ["register.refine_steps=3"])
