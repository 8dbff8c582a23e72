"""vtn_tf.io.completion: the record that makes an output folder complete, and its absence."""

import json
import shutil

import pytest

from vtn_tf.io import completion

SETTINGS = {"passes": 2, "init": "none", "refine": {"steps": [40, 12], "resolution": (0.5, 1.0)}}
INPUTS = {"fixed": "/d/f.nii.gz", "moving": "/d/m.nii.gz", "moving_labels": []}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "model.json").write_text('{"model": {"spec": "AD"}, "image_shape": [64, 64, 64]}')
    (run / "checkpoints" / "ckpt-3.index").write_bytes(b"weights 3")
    return run


def finished(out, model):
    out.mkdir()
    for name in ("warped.nii.gz", "affine.json"):
        (out / name).write_bytes(b"x")
    completion.write(out, completion.make_record(model, SETTINGS, INPUTS, ["warped.nii.gz", "affine.json"],
                                                 {"network": 0.1}))


def test_the_model_identity_follows_its_contents_not_its_path(run_dir, tmp_path):
    identity = completion.model_identity(run_dir, run_dir / "checkpoints" / "ckpt-3")
    assert identity["checkpoint"] == "ckpt-3"
    copy = tmp_path / "elsewhere"
    shutil.copytree(run_dir, copy)
    assert completion.model_identity(copy, copy / "checkpoints" / "ckpt-3") == identity
    (copy / "checkpoints" / "ckpt-3.index").write_bytes(b"weights 3, trained on")
    assert completion.model_identity(copy, copy / "checkpoints" / "ckpt-3")["sha256"] != identity["sha256"]
    (run_dir / "preprocessing.json").write_text("{}")
    assert completion.model_identity(run_dir, run_dir / "checkpoints" / "ckpt-3") != identity


def test_states_of_an_output_folder(run_dir, tmp_path):
    model = completion.model_identity(run_dir, run_dir / "checkpoints" / "ckpt-3")
    out = tmp_path / "out"
    assert completion.status(out, model, SETTINGS, INPUTS)[0] == completion.ABSENT
    finished(out, model)
    assert completion.status(out, model, SETTINGS, INPUTS) == (completion.COMPLETE, "complete")
    record = json.loads((out / "registration.json").read_text())
    assert record["format"] == "vtn-tf-registration/1" and record["settings"]["refine"]["resolution"] == [0.5, 1.0]
    other = dict(SETTINGS, passes=1)
    assert completion.status(out, model, other, INPUTS) == (completion.DIFFERENT, "made with other settings (passes)")
    finer = dict(SETTINGS, refine={"steps": [40, 12], "resolution": [0.5, 0.75]})
    assert completion.status(out, model, finer, INPUTS)[1] == "made with other settings (refine.resolution)"
    moved = dict(INPUTS, moving="/d/m2.nii.gz")
    assert completion.status(out, model, SETTINGS, moved)[0] == completion.DIFFERENT
    retrained = dict(model, sha256="0" * 64)
    assert completion.status(out, retrained, SETTINGS, INPUTS)[1] == "made with another model (ckpt-3)"
    (out / "affine.json").unlink()
    assert completion.status(out, model, SETTINGS, INPUTS) == (completion.INCOMPLETE, "affine.json is missing")


def test_outputs_without_a_record_are_incomplete_and_clear_removes_it(run_dir, tmp_path):
    model = completion.model_identity(run_dir, run_dir / "checkpoints" / "ckpt-3")
    out = tmp_path / "out"
    finished(out, model)
    completion.clear(out)
    completion.clear(out)  # twice is fine
    assert completion.status(out, model, SETTINGS, INPUTS) == (completion.INCOMPLETE,
                                                               "outputs without a completion record")
    (out / "registration.json").write_text("{not json")
    assert completion.read_record(out) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".empty.lock").write_text("")
    assert completion.status(empty, model, SETTINGS, INPUTS)[0] == completion.ABSENT
