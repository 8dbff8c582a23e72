"""vtn_tf.nn.checkpoints: run directories written and restored, reduced-precision restores,
and loading a model without the training code."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from vtn_tf.nn import checkpoints
from vtn_tf.nn.model import VTN

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_save_and_restore_give_the_same_flow(tmp_path):
    model = VTN("AD", width=0.125, flow_head_initializer="small")
    model.build((None, 64, 64, 64, 1))
    run_dir = checkpoints.save_model_dir(model, (64, 64, 64), tmp_path / "run", [0, 3])
    info = json.loads((run_dir / "model.json").read_text())
    assert info["image_shape"] == [64, 64, 64] and info["label_values"] == [0, 3]
    restored, shape, latest = checkpoints.restore_model(run_dir)
    assert shape == (64, 64, 64) and latest.startswith(str(run_dir / "checkpoints"))
    x = np.random.default_rng(0).random((1, 64, 64, 64, 1)).astype(np.float32)
    inputs = {"fixed": x, "moving": x[:, ::-1].copy()}
    np.testing.assert_array_equal(restored(inputs)["flow"].numpy(), model(inputs)["flow"].numpy())


def test_the_weights_alone_are_read_when_they_are_the_latest_checkpoints(tmp_path):
    model = VTN("AD", width=0.125, flow_head_initializer="small")
    model.build((None, 64, 64, 64, 1))
    run_dir = checkpoints.save_model_dir(model, (64, 64, 64), tmp_path / "run")
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    copy = checkpoints.write_inference_weights(model, latest)
    assert copy == checkpoints.inference_weights(latest) == str(run_dir / "weights" / pathlib.Path(latest).name)
    assert not [p for p in (run_dir / "weights").iterdir() if p.name.startswith(".")]  # no partial file left
    for data in (run_dir / "checkpoints").glob("*.data-*"):
        data.write_bytes(b"")  # the checkpoint unreadable: restoring must not need it
    x = np.random.default_rng(1).random((1, 64, 64, 64, 1)).astype(np.float32)
    inputs = {"fixed": x, "moving": x[:, :, ::-1].copy()}
    restored, _, named = checkpoints.restore_model(run_dir)
    assert named == latest  # outputs keep naming the checkpoint
    np.testing.assert_array_equal(restored(inputs)["flow"].numpy(), model(inputs)["flow"].numpy())


def test_weights_of_an_older_checkpoint_are_not_read(tmp_path):
    model = VTN("AD", width=0.125, flow_head_initializer="small")
    model.build((None, 64, 64, 64, 1))
    run_dir = checkpoints.save_model_dir(model, (64, 64, 64), tmp_path / "run")
    checkpoints.write_inference_weights(model, tf.train.latest_checkpoint(str(run_dir / "checkpoints")))
    head = model.stages[-1].output_layer.kernel
    head.assign(head.numpy() + 0.01)  # training went on: a newer checkpoint, other values
    tf.train.CheckpointManager(checkpoints.make_checkpoint(model), str(run_dir / "checkpoints"), 2).save(1)
    latest = tf.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert checkpoints.inference_weights(latest) is None
    restored, _, named = checkpoints.restore_model(run_dir)
    assert named == latest
    np.testing.assert_array_equal(restored.stages[-1].output_layer.kernel.numpy(), head.numpy())


def test_restore_refuses_a_mismatched_checkpoint(tmp_path):
    model = VTN("AD", width=0.125, flow_head_initializer="small")
    model.build((None, 64, 64, 64, 1))
    checkpoints.save_model_dir(model, (64, 64, 64), tmp_path)
    description = json.loads((tmp_path / "model.json").read_text())
    description["model"]["width"] = 0.25
    (tmp_path / "model.json").write_text(json.dumps(description))
    with pytest.raises(ValueError, match="does not fit"):
        checkpoints.restore_model(tmp_path)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_restore_model_in_reduced_precision(tmp_path, precision):
    """The network computes in the named type (its convolutions say so), the flow comes
    back float32 and near the float32 model's, and the global Keras policy is untouched.

    Near: an RMS difference within 3 % of the RMS flow (bfloat16's 8-bit significand gave
    1.0-1.3 % over four initialisations, float16 0.13-0.16 %) and no voxel off by a tenth of
    the largest flow (single voxels reach 2-5 % in bfloat16, by machine: oneDNN's bfloat16
    kernels or Eigen's)."""
    keras.utils.set_random_seed(0)
    model = VTN("AD", width=0.25)  # the paper's flow-head init: flows of a few voxels
    model.build((None, 64, 64, 64, 1))
    run_dir = checkpoints.save_model_dir(model, (64, 64, 64), tmp_path / "run")
    coarse = np.random.default_rng(0).random((2, 8, 8, 8)).astype(np.float32)
    fixed, moving = (np.kron(c, np.ones((8, 8, 8), np.float32))[None, ..., None] for c in coarse)
    reference, _, _ = checkpoints.restore_model(run_dir)
    expected = reference({"fixed": fixed, "moving": moving})["flow"].numpy()
    reduced, _, _ = checkpoints.restore_model(run_dir, precision)
    convolutions = [layer for layer in reduced._flatten_layers() if isinstance(layer, keras.layers.Conv3D)]
    assert convolutions and all(layer.compute_dtype == precision for layer in convolutions)
    assert keras.mixed_precision.global_policy().name == "float32"
    flow = reduced({"fixed": fixed, "moving": moving})["flow"]
    assert flow.dtype == tf.float32
    scale = np.abs(expected).max()
    assert scale > 0.5  # the comparison below means something
    error = flow.numpy() - expected
    assert np.sqrt(np.mean(error ** 2)) < 0.03 * np.sqrt(np.mean(expected ** 2))
    assert np.abs(error).max() < 0.1 * scale
    with pytest.raises(ValueError, match="precision must be one of"):
        checkpoints.restore_model(run_dir, "int8")


def test_precision_flag_offers_the_restorable_precisions():
    from absl import flags

    from vtn_tf.cli.common import define_precision_flag

    define_precision_flag()
    assert set(flags.FLAGS["precision"].parser.enum_values) == set(checkpoints.PRECISIONS)



LOADER_SCRIPT = textwrap.dedent("""
    import sys
    import vtn_tf
    from vtn_tf.evaluation import protocols
    from vtn_tf.serving import export
    from vtn_tf.registration import network
    assert vtn_tf.__file__.startswith(sys.argv[2]), vtn_tf.__file__
    assert "vtn_tf.training.loop" not in sys.modules, "importing the loaders imported the training loop"
    model, shape, _ = network.load_model(sys.argv[1])
    protocols.make_methods(["vtn"], sys.argv[1], log=lambda *_: None)
    assert "vtn_tf.training.loop" not in sys.modules, "loading a model imported the training loop"
    assert tuple(shape) == (64, 64, 64)
""")


def test_loading_a_model_needs_no_training_code(tmp_path):
    model = VTN("D", width=0.125, flow_head_initializer="small")
    model.build((None, 64, 64, 64, 1))
    run_dir = checkpoints.save_model_dir(model, (64, 64, 64), tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(run_dir), str(REPO)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("text, problem", [("{not json", "JSONDecodeError"), ('{"model": {}}', "KeyError"),
                                           ('{"model": {"spec": "AD", "widht": 1}, "image_shape": [64, 64, 64]}',
                                            "does not describe a usable VTN")])
def test_a_broken_model_description_is_an_input_error(tmp_path, text, problem):
    from vtn_tf.io import InputError

    (tmp_path / "model.json").write_text(text)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-0"\n')
    (tmp_path / "checkpoints" / "ckpt-0.index").write_bytes(b"")  # never read: the description fails first
    with pytest.raises(InputError, match=problem) as caught:
        checkpoints.restore_model(tmp_path)
    assert "model.json" in str(caught.value)
