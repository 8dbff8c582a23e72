"""vtn_tf.serving.export / vtn-export: a SavedModel that TensorFlow alone loads and runs.

The SavedModel is loaded in a fresh Python that imports only tensorflow and numpy, run on
inputs saved to .npy (batch 2: the batch dimension is free), and its flow compared with the
Keras model's.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO
from vtn_tf import io
from vtn_tf.serving import export

NET = (64, 64, 64)

FRESH = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf

    path, fixed, moving, out = sys.argv[1:]
    serve = tf.saved_model.load(path).signatures["serving_default"]
    result = serve(fixed=tf.constant(np.load(fixed)), moving=tf.constant(np.load(moving)))
    np.save(out, result["flow"].numpy())
    print("warped", tuple(result["warped"].shape), result["warped"].dtype.name)
    print("vtn_tf imported:", any(name.startswith("vtn_tf") for name in sys.modules))
""")


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny untrained AD model with the paper's (large, random) flow head."""
    from vtn_tf.nn.model import VTN
    from vtn_tf.training import loop

    model = VTN("AD", width=0.125)
    model.build((None, *NET, 1))
    return loop.save_model_dir(model, NET, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def pair_and_flow(run_dir, tmp_path_factory):
    from vtn_tf.registration.network import load_model

    folder = tmp_path_factory.mktemp("arrays")
    rng = np.random.default_rng(0)
    fixed, moving = (rng.random((2, *NET, 1), dtype=np.float32) for _ in range(2))
    np.save(folder / "fixed.npy", fixed)
    np.save(folder / "moving.npy", moving)
    model, _, _ = load_model(str(run_dir))
    flow = model({"fixed": fixed, "moving": moving})["flow"].numpy()
    assert np.abs(flow).max() > 1.0  # a non-trivial flow to compare
    return folder, flow


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The default (plain, no-XLA) export, shared by the read-only tests."""
    return export.export_model(run_dir, tmp_path_factory.mktemp("export") / "vtn", log=lambda *_: None)


@pytest.mark.parametrize("xla", [False, True], ids=["plain", "xla"])
def test_savedmodel_runs_in_a_fresh_tensorflow_process(run_dir, exported, pair_and_flow, tmp_path, xla):
    folder, flow = pair_and_flow
    out = export.export_model(run_dir, tmp_path / "exported", xla=True, log=lambda *_: None) if xla else exported
    graph = (out / "saved_model.pb").read_bytes()
    assert (b"_XlaMustCompile" in graph) == xla
    assert json.loads((out / "vtn_export.json").read_text())["image_shape"] == list(NET)
    done = subprocess.run([sys.executable, "-c", FRESH, str(out), str(folder / "fixed.npy"),
                           str(folder / "moving.npy"), str(tmp_path / "flow.npy")],
                          cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warped (2, 64, 64, 64, 1) float32" in done.stdout
    assert "vtn_tf imported: False" in done.stdout
    served = np.load(tmp_path / "flow.npy")
    assert served.shape == (2, *NET, 3) and served.dtype == np.float32
    np.testing.assert_allclose(served, flow, atol=1e-4)


def test_export_serves_the_test_time_passes(run_dir, pair_and_flow, tmp_path):
    from vtn_tf.registration.network import load_model

    folder, _ = pair_and_flow
    fixed, moving = np.load(folder / "fixed.npy"), np.load(folder / "moving.npy")
    out = export.export_model(run_dir, tmp_path / "exported", passes=2, log=lambda *_: None)
    assert json.loads((out / "vtn_export.json").read_text())["passes"] == 2
    served = tf.saved_model.load(str(out)).signatures["serving_default"](
        fixed=tf.constant(fixed), moving=tf.constant(moving))["flow"].numpy()
    model, _, _ = load_model(str(run_dir))
    np.testing.assert_allclose(served, model.register(fixed, moving, passes=2)["flow"].numpy(), atol=1e-3)
    assert np.abs(served - model({"fixed": fixed, "moving": moving})["flow"].numpy()).max() > 0.1


def test_export_in_bfloat16_keeps_float32_signature_and_flow(run_dir, pair_and_flow, tmp_path):
    folder, flow = pair_and_flow
    out = export.export_model(run_dir, tmp_path / "exported", precision="bfloat16", log=lambda *_: None)
    assert json.loads((out / "vtn_export.json").read_text())["network_precision"] == "bfloat16"
    result = tf.saved_model.load(str(out)).signatures["serving_default"](
        fixed=tf.constant(np.load(folder / "fixed.npy")), moving=tf.constant(np.load(folder / "moving.npy")))
    assert result["flow"].dtype == tf.float32 and result["warped"].dtype == tf.float32
    difference = np.abs(result["flow"].numpy() - flow).max()
    assert 0 < difference < 0.05 * np.abs(flow).max()  # bfloat16 rounding, no more


def test_saved_model_cli_lists_the_signature(exported):
    out = exported
    done = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show",
                           "--dir", str(out), "--all"], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout
    signature = text[text.index("signature_def['serving_default']"):]
    signature = signature[: signature.index("Method name is")]
    for name, channels in (("inputs['fixed']", 1), ("inputs['moving']", 1),
                           ("outputs['flow']", 3), ("outputs['warped']", 1)):
        block = signature[signature.index(name):][:200]
        assert "dtype: DT_FLOAT" in block, block
        assert f"shape: (-1, 64, 64, 64, {channels})" in block, block


def test_existing_output_refused_then_replaced_with_overwrite(run_dir, tmp_path):
    target = tmp_path / "exported"
    target.mkdir()
    (target / "old.txt").write_text("previous export")
    with pytest.raises(io.InputError, match="already exists"):
        export.export_model(run_dir, target, log=lambda *_: None)
    assert (target / "old.txt").exists()
    export.export_model(run_dir, target, overwrite=True, log=lambda *_: None)
    assert (target / "saved_model.pb").exists() and not (target / "old.txt").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folders left


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vtn_tf.cli.export", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=_env(), timeout=120)


@pytest.mark.slow
def test_cli_exports(run_dir, tmp_path):
    done = _cli("--model", run_dir, "--out", tmp_path / "exported")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "serving_default" in done.stdout and (tmp_path / "exported" / "saved_model.pb").exists()


def test_cli_reports_errors_on_one_line(tmp_path):
    failed = _cli("--model", tmp_path / "no_run", "--out", tmp_path / "other")
    assert failed.returncode == 2
    lines = [line for line in failed.stderr.splitlines() if line.startswith("vtn-export")]
    assert len(lines) == 1 and "no_run does not exist" in lines[0], failed.stderr
    assert not (tmp_path / "other").exists()
