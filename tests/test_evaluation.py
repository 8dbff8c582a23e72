import csv
import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from absl import flags
from scipy import ndimage, stats

from vtn_tf.cli import evaluate as evaluate_app
from vtn_tf.evaluation import baselines, protocols
from vtn_tf.nn.model import VTN
from vtn_tf.training import data, loop

GRID = (64, 64, 64)
SUBJECTS = ["e1", "e2", "e3", "e4"]
LANDMARKS = {"e1": [[10.0, 20.0, 30.0], [40.0, 40.0, 12.0]],
             "e2": [[13.0, 24.0, 30.0], [40.0, 40.0, 14.0]]}


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _volume(number):
    """Image and labels of one subject: three blobs (labels 1, 2, 3) moved a little each time."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in GRID], indexing="ij")
    labels = np.zeros(GRID, np.int16)
    centres = [(20, 20, 20), (40, 36, 30), (30, 44, 44)]
    for value, (cx, cy, cz) in enumerate(centres, 1):
        shift = 2 * number
        inside = (x - cx - shift) ** 2 + (y - cy) ** 2 + (z - cz + number) ** 2 < (7 + value) ** 2
        labels[inside] = value
    rng = np.random.default_rng(number)
    image = (labels / 3.0 + 0.05 * rng.random(GRID)).astype(np.float32)
    return image, labels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny prepared dataset: 4 evaluation subjects at 64^3, landmarks for e1 and e2."""
    root = tmp_path_factory.mktemp("prepared")
    subjects = []
    for number, subject_id in enumerate(SUBJECTS):
        image, labels = _volume(number)
        _write(root / "images" / f"{subject_id}.nii.gz", image)
        _write(root / "labels" / f"{subject_id}.nii.gz", labels)
        entry = {"id": subject_id, "image": f"images/{subject_id}.nii.gz",
                 "labels": f"labels/{subject_id}.nii.gz", "landmarks": None,
                 "spacing": [1.0, 1.0, 1.0]}
        if subject_id in LANDMARKS:
            entry["landmarks"] = f"landmarks/{subject_id}.csv"
            (root / "landmarks").mkdir(exist_ok=True)
            (root / "landmarks" / f"{subject_id}.csv").write_text(
                "x,y,z\n" + "".join(",".join(map(str, p)) + "\n" for p in LANDMARKS[subject_id]))
        subjects.append(entry)
    manifest = {"format": "vtn-tf-dataset/1", "name": "tiny", "synthetic": True,
                "modality": "MRI", "grid": list(GRID), "label_values": [0, 1, 2, 3],
                "atlas": None, "subjects": subjects,
                "splits": {"train": [], "evaluation": SUBJECTS}, "preparation": {}}
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding a tiny untrained VTN (AD, width 1/8) at 64^3."""
    model = VTN("AD", width=0.125, flow_head_initializer="small")
    model.build((None, *GRID, 1))
    return loop.save_model_dir(model, GRID, tmp_path_factory.mktemp("run"), [0, 1, 2, 3])


def _numpy_dice(a, b, values):
    scores = [2.0 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in values]
    return scores, float(np.mean(scores))


def _read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture
def cli(capsys):
    """Run the app in-process: returns (exit code, stdout, stderr)."""
    def call(*args):
        flags.FLAGS.unparse_flags()
        argv = flags.FLAGS(["vtn-evaluate", *map(str, args)])
        code = 0
        try:
            evaluate_app.main(argv)
        except SystemExit as stop:
            code = stop.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return call


def test_consecutive_protocol_pairs_sorted_ids():
    ids = ["s4", "s1", "s3", "s2", "s5"]
    assert data.evaluation_pairs(ids, "consecutive") == [("s1", "s2"), ("s3", "s4")]
    ids = [f"hippocampus_{n:03d}" for n in range(335, 255, -2)]  # 40 ids, unsorted
    pairs = data.evaluation_pairs(ids, "consecutive")
    assert len(pairs) == 20 and pairs[0] == ("hippocampus_257", "hippocampus_259")


def test_load_pairs_protocols(prepared):
    _, pairs = protocols.load_pairs(prepared, protocol="consecutive")
    assert pairs == [("e1", "e2"), ("e3", "e4")]
    _, pairs = protocols.load_pairs(prepared, protocol="pairwise", max_pairs=5)
    assert len(pairs) == 5 and pairs[0] == ("e1", "e2")
    _, pairs = protocols.load_pairs(prepared, protocol="atlas", atlas="e3")
    assert pairs == [("e3", "e1"), ("e3", "e2"), ("e3", "e4")]
    with pytest.raises(ValueError, match="needs --atlas"):
        protocols.load_pairs(prepared, protocol="atlas")


def test_identity_dice_equals_numpy_dice_of_unwarped_labels(prepared, tmp_path):
    out = tmp_path / "identity.csv"
    rows, summary = protocols.run_protocol(prepared, out, methods="identity",
                                            protocol="pairwise", log=None)
    assert len(rows) == 12
    dataset = data.load_prepared(prepared, splits=("evaluation",))
    for row in rows:
        fixed, moving = dataset.labels[row["fixed"]], dataset.labels[row["moving"]]
        per_label, mean = _numpy_dice(fixed, moving, [1, 2, 3])
        assert row["dice"] == pytest.approx(mean, abs=1e-12)
        assert [row[f"dice_{v}"] for v in (1, 2, 3)] == pytest.approx(per_label, abs=1e-12)
        ious = [np.sum((fixed == v) & (moving == v)) / np.sum((fixed == v) | (moving == v))
                for v in (1, 2, 3)]
        assert row["iou"] == pytest.approx(np.mean(ious), abs=1e-12)
        assert row["folding_percent"] == 0 and row["jacobian_std"] == 0 and row["seconds"] == 0
    # Landmarks only where both subjects have them; identity leaves them where they are.
    with_landmarks = [r for r in rows if {r["fixed"], r["moving"]} == {"e1", "e2"}]
    expected = np.linalg.norm(np.subtract(LANDMARKS["e1"], LANDMARKS["e2"]), axis=1).mean()
    assert [r["landmark_mm"] for r in with_landmarks] == pytest.approx([expected] * 2)
    assert all(math.isnan(r["landmark_mm"]) for r in rows if r not in with_landmarks)
    # The CSV round-trips to 6 significant digits; the summary is written next to it.
    stored = protocols.read_results(out)
    assert [r["dice"] for r in stored] == pytest.approx([r["dice"] for r in rows], rel=1e-5)
    assert (tmp_path / "identity.md").read_text() == summary
    assert "| identity | 12 |" in summary and "landmark mm" in summary


def test_vtn_run_dir_evaluates_one_row_per_pair(prepared, run_dir, tmp_path, cli):
    out = tmp_path / "vtn.csv"
    code, stdout, _ = cli("--model", run_dir, "--manifest", prepared, "--protocol", "consecutive",
                          "--methods", "vtn,identity", "--out", out)
    assert code == 0
    rows = _read_csv(out)
    assert list(rows[0]) == ["fixed", "moving", "method", "dice", "iou", "dice_1", "dice_2",
                             "dice_3", "landmark_mm", "landmark_voxels", "jacobian_std",
                             "folding_percent", "seconds", "device"]
    assert [(r["method"], r["fixed"], r["moving"]) for r in rows] == [
        ("vtn", "e1", "e2"), ("vtn", "e3", "e4"), ("identity", "e1", "e2"), ("identity", "e3", "e4")]
    vtn = [r for r in rows if r["method"] == "vtn"]
    assert all(float(r["seconds"]) > 0 and r["device"] in ("CPU", "GPU") for r in vtn)
    assert all(0 <= float(r["dice"]) <= 1 and float(r["jacobian_std"]) >= 0 for r in vtn)
    assert "| vtn | 2 |" in stdout and "| identity | 2 |" in stdout


def test_vtn_method_warps_labels_with_its_own_flow(prepared, run_dir):
    model, _, _ = loop.restore_model(run_dir)
    dataset = data.load_prepared(prepared, splits=("evaluation",))
    method = protocols.VTNMethod(model)
    args = dataset.images["e1"], dataset.images["e2"], dataset.labels["e2"], (1.0, 1.0, 1.0)
    warped, flow, seconds = method(*args)
    outputs = model({"fixed": args[0][None, ..., None], "moving": args[1][None, ..., None]})
    np.testing.assert_allclose(flow, outputs["flow"].numpy()[0], atol=1e-4)
    assert warped.shape == GRID and warped.dtype == np.int32 and seconds > 0


def test_test_time_passes_and_precision_reach_the_method_and_the_summary(prepared, run_dir, tmp_path, cli):
    model, _, _ = loop.restore_model(run_dir)
    dataset = data.load_prepared(prepared, splits=("evaluation",))
    fixed, moving, labels = dataset.images["e1"], dataset.images["e2"], dataset.labels["e2"]
    warped, flow, _ = protocols.VTNMethod(model, passes=2)(fixed, moving, labels, (1.0, 1.0, 1.0))
    expected = model.register(fixed[None, ..., None], moving[None, ..., None], passes=2)["flow"].numpy()[0]
    np.testing.assert_allclose(flow, expected, atol=1e-4)
    coords = np.moveaxis(np.stack(np.meshgrid(*map(np.arange, GRID), indexing="ij"), -1) + flow, -1, 0)
    reference = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
    assert np.mean(warped == reference) > 0.999  # nearest ties at exact .5 may round apart
    code, stdout, _ = cli("--model", run_dir, "--manifest", prepared, "--methods", "vtn",
                          "--passes", "2", "--precision", "bfloat16", "--out", tmp_path / "passes.csv")
    assert code == 0 and "in bfloat16 with 2 test-time passes" in stdout


def test_wilcoxon_comparison_matches_scipy(tmp_path, cli):
    rng = np.random.default_rng(0)
    pairs = [(f"f{k}", f"m{k}") for k in range(12)]
    a, b = rng.random(12), rng.random(12)
    for name, scores, method in (("a.csv", a, "vtn"), ("b.csv", b, "ants")):
        rows = [{"fixed": f, "moving": m, "method": method, "dice": s, "iou": s / 2,
                 "landmark_mm": math.nan, "landmark_voxels": math.nan, "jacobian_std": 0.1,
                 "folding_percent": 0.0, "seconds": 1.0, "device": "CPU"}
                for (f, m), s in zip(pairs, scores)]
        # b.csv lists its pairs in reverse and one extra: matching is by (fixed, moving).
        if name == "b.csv":
            rows = rows[::-1] + [dict(rows[0], fixed="x", moving="y")]
        protocols.write_results(rows, tmp_path / name, [0])
    result = protocols.compare(protocols.read_results(tmp_path / "a.csv"),
                                protocols.read_results(tmp_path / "b.csv"))
    stored_a = [float(f"{v:.6g}") for v in a]
    stored_b = [float(f"{v:.6g}") for v in b]
    expected = stats.wilcoxon(stored_a, stored_b)
    assert result["n"] == 12 and result["only_in_b"] == 1
    assert result["statistic"] == pytest.approx(expected.statistic)
    assert result["p_value"] == pytest.approx(expected.pvalue)
    assert result["median_difference"] == pytest.approx(np.median(np.subtract(stored_a, stored_b)))
    code, stdout, _ = cli("--compare", tmp_path / "a.csv", tmp_path / "b.csv")
    assert code == 0 and f"p-value = {expected.pvalue:.4g}" in stdout and "n = 12" in stdout


def test_compare_two_methods_of_one_file(prepared, tmp_path, cli):
    out = tmp_path / "two.csv"
    protocols.run_protocol(prepared, out, methods="identity", protocol="pairwise", log=None)
    rows = protocols.read_results(out)
    twin = [dict(r, method="shifted", dice=r["dice"] + 0.01 * k) for k, r in enumerate(rows)]
    protocols.write_results(rows + twin, out, [0, 1, 2, 3], overwrite=True)
    code, stdout, _ = cli("--compare", out, "--methods", "shifted,identity")
    expected = stats.wilcoxon([r["dice"] for r in protocols.read_results(out)[12:]],
                              [r["dice"] for r in protocols.read_results(out)[:12]])
    assert code == 0 and f"p-value = {expected.pvalue:.4g}" in stdout
    code, _, stderr = cli("--compare", out)
    assert code == 2 and "needs --methods naming two methods" in stderr


def test_missing_baselines_are_skipped_with_one_line(prepared, tmp_path, monkeypatch, cli):
    def missing(method):
        raise ImportError(f"No module named {method!r}")

    monkeypatch.setattr(baselines, "_import", missing)
    out = tmp_path / "skip.csv"
    code, stdout, stderr = cli("--manifest", prepared, "--methods", "identity,ants,elastix",
                               "--out", out)
    assert code == 0
    assert {r["method"] for r in _read_csv(out)} == {"identity"}
    skipped = [line for line in stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and "antspyx" in skipped[0] and "itk-elastix" in skipped[1]
    code, _, stderr = cli("--manifest", prepared, "--methods", "ants", "--out", tmp_path / "x.csv")
    assert code == 2 and "no method left" in stderr


def test_existing_csv_is_refused_without_overwrite(prepared, tmp_path, cli):
    out = tmp_path / "result.csv"
    out.write_text("keep me\n")
    code, _, stderr = cli("--manifest", prepared, "--methods", "identity", "--out", out)
    assert code == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert out.read_text() == "keep me\n"
    code, _, _ = cli("--manifest", prepared, "--methods", "identity", "--out", out, "--overwrite")
    assert code == 0 and out.read_text().startswith("fixed,moving,method")


def test_cli_one_line_errors_for_missing_model_and_manifest(prepared, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "vtn_tf.cli.evaluate", *map(str, args)],
                              capture_output=True, text=True)

    missing_model = run("--model", tmp_path / "no_run", "--manifest", prepared,
                        "--out", tmp_path / "a.csv")
    missing_manifest = run("--manifest", tmp_path / "none.json", "--methods", "identity",
                           "--out", tmp_path / "b.csv")
    for result, words in ((missing_model, "no_run does not exist"),
                          (missing_manifest, "none.json does not exist")):
        assert result.returncode == 2
        errors = [line for line in result.stderr.splitlines() if line.startswith("vtn-evaluate:")]
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.slow
@pytest.mark.parametrize("method", baselines.METHODS)
def test_baseline_flow_reproduces_its_label_warp(method):
    """The exported field, warped with vtn_tf.core, gives the tool's own label warp."""
    if baselines.unavailable(method):
        pytest.skip(baselines.unavailable(method))
    from vtn_tf.core import sampling

    fixed, fixed_labels = _volume(0)
    moving, moving_labels = _volume(2)
    spacing = (1.0, 1.5, 2.0)  # anisotropic: checks the axis order and mm -> voxel units
    result = baselines.register(method, fixed, moving, moving_labels, spacing)
    ours = sampling.warp(moving_labels[None, ..., None].astype(np.int32), result["flow"][None],
                        "nearest").numpy()[0, ..., 0]
    assert np.mean(ours == result["warped_labels"]) > 0.999
    assert protocols.pair_metrics(fixed_labels, result["warped_labels"], [1, 2, 3], None)["dice"] \
        > _numpy_dice(fixed_labels, moving_labels, [1, 2, 3])[1]
