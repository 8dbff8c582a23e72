"""The bad-input matrix: every tool and the public API refuse bad input cleanly.

For each case: exit status 2, the last stderr line names the file (basename) and the problem,
no traceback (one ``--verbose`` case per tool family shows one), and no partial output (the
output is absent, or unchanged when it existed). The table in docs/failure-modes.md mirrors
these cases.

How the tools run (keeping TensorFlow start-ups few on 2 cores):
* ``python -m data_prep``: its ``main(argv)`` in-process (no TensorFlow), plus real
  subprocesses for a plain and a ``--verbose`` error;
* ``vtn-train`` / ``vtn-evaluate`` / ``vtn-register``: all cases of one tool in one subprocess
  (`_bad_files.drive`: absl flag parsing + the tool's ``main``, as on the command line), plus
  real ``python -m`` subprocesses for one plain and one ``--verbose`` error.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _bad_files as bad  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def last_line(stderr):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_refused(code, stderr, name, problem):
    """Exit 2; the last stderr line names ``name`` and matches ``problem``; no traceback."""
    assert code == 2, f"exit status {code}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    line = last_line(stderr)
    assert "error:" in line, line
    assert name in line, f"{name!r} not named in: {line}"
    assert re.search(problem, line), f"{problem!r} not in: {line}"


def check_refusal(results, table, case, tool):
    """A driven case of ``table`` ({name: (builder, file named, problem)}) was refused by ``tool``."""
    result = results[case]
    _, name, problem = table[case]
    assert_refused(result["code"], result["stderr"], name, problem)
    assert last_line(result["stderr"]).startswith(f"{tool}: error:")


def run_module(module, args, timeout=120):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=REPO, timeout=timeout)


# ---- file kinds, through python -m data_prep (and vtn_tf.io underneath) --------------------
# kind: (writer, where the bad file goes: "images" or "labels", expected problem)
FILE_KINDS = {
    "missing file": (None, "labels", r"has no matching label file"),
    "directory given as a file": (bad.write_directory, "images", r"is a folder"),
    "zero-byte file": (bad.write_zero_byte, "images", r"is empty \(0 bytes\)"),
    "non-NIfTI named .nii.gz": (bad.write_not_nifti, "images", r"could not be read as an image"),
    "truncated gzip": (bad.write_truncated_gzip, "images", r"could not be read as an image"),
    "2-D image": (bad.write_two_d, "images", r"is 2-D \(16x16\); a 3-D volume is required"),
    "4-D image, 3 volumes": (bad.write_four_d, "images", r"is 4-D .* with 3 volumes"),
    "complex voxels": (bad.write_complex, "images", r"complex voxels"),
    "NaN voxels": (bad.write_nan, "images", r"1 NaN or infinite voxels"),
    "Inf voxels": (bad.write_inf, "images", r"1 NaN or infinite voxels"),
    "constant image": (bad.write_constant, "images", r"constant \(every voxel = 7\)"),
    "all-zero image": (bad.write_all_zero, "images", r"is all zeros"),
    "fractional labels": (bad.write_fractional_labels, "labels", r"non-integer values"),
    "labels on another grid": (bad.write_labels_other_grid, "labels",
                               r"has grid 8x8x8 but image .* has 16x16x16"),
    "negative spacing": (bad.write_negative_spacing, "images",
                         r"negative voxel spacing in its header \(-2, 1, 1 mm\)"),
    "huge spacing (250 mm)": (bad.write_huge_spacing, "images", r"implausible voxel spacing"),
    "singular affine": (bad.write_singular_affine, "images", r"singular voxel-to-world affine"),
    "header claiming 4000^3 float32": (bad.write_huge_header, "images",
                                       r"claims 4000x4000x4000 voxels \(238\.4 GiB\)"),
}


def make_folder_dataset(root, kind):
    """``root/in`` with subjects s0 (good) and s1 (bad as ``kind``); returns the bad name."""
    writer, place, _ = FILE_KINDS[kind]
    images, labels = root / "in" / "images", root / "in" / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for subject in ("s0", "s1"):
        if not (subject == "s1" and place == "images"):
            bad.write_good(images, f"{subject}.nii.gz", seed=int(subject[1]))
        if not (subject == "s1" and place == "labels"):
            bad.save(labels / f"{subject}.nii.gz", np.ones(bad.SHAPE, np.int16))
    if writer is None:  # missing: s1 has an image but no label file
        return "s1.nii.gz"
    writer(str(images if place == "images" else labels), "s1.nii.gz")
    return "s1.nii.gz"


def data_prep_args(root, *extra):
    return ["--layout", "folder", "--input", str(root / "in"), "--output",
            str(root / "out" / "prepared"), "--modality", "MRI", "--grid", "64", "64", "64",
            "--no-crop", *extra]


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_data_prep_refuses_bad_file(kind, tmp_path, capsys):
    from data_prep.__main__ import main

    name = make_folder_dataset(tmp_path, kind)
    began = time.perf_counter()
    code = main(data_prep_args(tmp_path))
    assert time.perf_counter() - began < 20  # the 238 GiB header is refused, not allocated
    assert_refused(code, capsys.readouterr().err, name, FILE_KINDS[kind][2])
    assert not (tmp_path / "out").exists()  # no partial dataset


@pytest.mark.parametrize("kind", [k for k in FILE_KINDS if FILE_KINDS[k][0] is not None])
def test_read_volume_refuses_bad_file(kind, tmp_path):
    from vtn_tf import io

    writer, place, problem = FILE_KINDS[kind]
    path = writer(str(tmp_path), "bad.nii.gz")
    with pytest.raises(io.InputError) as caught:
        if place == "labels":
            io.read_labels(path, reference=io.read_volume(bad.write_good(str(tmp_path))))
        else:
            io.check_not_constant(io.read_volume(path))
    assert "bad.nii.gz" in str(caught.value) and re.search(problem, str(caught.value))


def test_data_prep_command_line_and_verbose(tmp_path):
    make_folder_dataset(tmp_path, "NaN voxels")
    plain = run_module("data_prep", data_prep_args(tmp_path))
    assert_refused(plain.returncode, plain.stderr, "s1.nii.gz", "NaN or infinite")
    verbose = run_module("data_prep", data_prep_args(tmp_path, "--verbose"))
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
    assert "InputError" in last_line(verbose.stderr)
    assert not (tmp_path / "out").exists()


def test_data_prep_missing_input_and_existing_output(tmp_path, capsys):
    from data_prep.__main__ import main

    code = main(["--layout", "folder", "--input", str(tmp_path / "nowhere"), "--output",
                 str(tmp_path / "out"), "--modality", "MRI"])
    assert_refused(code, capsys.readouterr().err, "nowhere", "does not exist")
    make_folder_dataset(tmp_path, "NaN voxels")
    out = tmp_path / "out" / "prepared"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    code = main(data_prep_args(tmp_path))
    assert_refused(code, capsys.readouterr().err, "prepared", "is not empty; pass --overwrite")
    assert bad.snapshot(out) == {"keep.txt": b"mine"}


def test_data_prep_output_under_a_file(tmp_path, capsys):
    from data_prep.__main__ import main

    make_folder_dataset(tmp_path, "NaN voxels")
    (tmp_path / "file.txt").write_text("x")
    args = data_prep_args(tmp_path)
    args[args.index("--output") + 1] = str(tmp_path / "file.txt" / "out")
    code = main(args)
    assert_refused(code, capsys.readouterr().err, "file.txt", "cannot be created|not a folder")
    assert (tmp_path / "file.txt").read_text() == "x"


# ---- run directories and datasets for the TensorFlow tools ---------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Run dirs (good, corrupt checkpoint, mismatched model.json) and a 64^3 dataset."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from vtn_tf import VTN
    from vtn_tf.training import loop

    root = tmp_path_factory.mktemp("world")
    model = VTN("AD", width=0.125, flow_head_initializer="small")
    model.build((None, 64, 64, 64, 1))
    good = loop.save_model_dir(model, (64, 64, 64), root / "run_good")
    corrupt = pathlib.Path(shutil.copytree(good, root / "run_corrupt"))
    for data in (corrupt / "checkpoints").glob("*.data-*"):
        data.write_bytes(data.read_bytes()[:100])
    mismatched = pathlib.Path(shutil.copytree(good, root / "run_mismatched"))
    description = json.loads((mismatched / "model.json").read_text())
    description["model"]["width"] = 0.25
    (mismatched / "model.json").write_text(json.dumps(description))

    data = root / "data"
    data.mkdir()
    subjects = []
    for k in range(2):
        image = bad.write_good(str(data), f"s{k}.nii.gz", seed=k, shape=(64, 64, 64))
        labels = bad.save(data / f"s{k}_labels.nii.gz", (bad.volume((64, 64, 64), k) > 0.5)
                          .astype(np.int16))
        subjects.append((f"s{k}", image, labels))
    (data / "good").mkdir()
    bad.write_manifest(str(data / "good"), subjects, grid=(64, 64, 64))
    (data / "missing").mkdir()
    bad.write_manifest(str(data / "missing"), subjects[:1] + [("s1", "gone.nii.gz", None)],
                       grid=(64, 64, 64))
    (data / "nan").mkdir()
    with_nan = bad.volume((64, 64, 64))
    with_nan[1, 2, 3] = np.nan
    bad.write_manifest(str(data / "nan"), subjects[:1] + [
        ("s1", bad.save(data / "nan.nii.gz", with_nan), None)], grid=(64, 64, 64))
    (data / "other_grid").mkdir()
    bad.write_manifest(str(data / "other_grid"), subjects[:1] + [
        ("s1", subjects[1][1], bad.write_labels_other_grid(str(data), "small.nii.gz"))],
        grid=(64, 64, 64))
    (root / "file.txt").write_text("a file, not a folder")
    return root


def drive(tool, cases, root):
    """Run ``{name: argv}`` through ``tool`` in one subprocess; ``{name: result}``."""
    names = list(cases)
    case_file, result_file = root / f"{tool}_cases.json", root / f"{tool}_results.json"
    case_file.write_text(json.dumps([[str(a) for a in cases[n]] for n in names]))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "_bad_files.py"), tool,
                           str(case_file), str(result_file)], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return dict(zip(names, json.loads(result_file.read_text())))


# ---- vtn-train -------------------------------------------------------------------------------
def write_config(root, name, content):
    path = root / name
    path.write_text(json.dumps(content))
    return path


TRAIN_CASES = {
    # name: (argv builder(root) -> (argv, run_dir), file named, problem)
    "config with an unknown field": (
        lambda w: ["--config", write_config(w, "typo.json", {"model": {"spec": "AD", "widht": 1}})],
        "typo.json", r"unknown field model\.widht"),
    "missing config": (lambda w: ["--config", w / "absent.json"], "absent.json", "does not exist"),
    "config not JSON": (lambda w: ["--config", bad.write_not_nifti(str(w), "notjson.json")],
                        "notjson.json", "is not valid JSON"),
    "--set unknown field": (lambda w: ["--set", "train.batchsize=4"], "train.batchsize",
                            "unknown field"),
    "bad spec DA": (lambda w: ["--set", "model.spec=DA"], "model.spec", r"got 'DA'"),
    "bad spec AA": (lambda w: ["--set", "model.spec=AA"], "model.spec", r"got 'AA'"),
    "manifest with a missing file": (
        lambda w: ["--set", f"data.manifest={w / 'data' / 'missing' / 'manifest.json'}"],
        "gone.nii.gz", "does not exist"),
    "manifest with a NaN image": (
        lambda w: ["--set", f"data.manifest={w / 'data' / 'nan' / 'manifest.json'}"],
        "nan.nii.gz", "NaN or infinite"),
}


@pytest.fixture(scope="module")
def train_results(world):
    cases = {name: [*build(world), "--run_dir", world / "runs" / f"train{k}"]
             for k, (name, (build, _, _)) in enumerate(TRAIN_CASES.items())}
    return drive("train", cases, world)


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses(case, train_results, world):
    check_refusal(train_results, TRAIN_CASES, case, "vtn-train")
    assert not (world / "runs").exists()  # no run directory, no config.json


def test_train_command_line_and_verbose(world, tmp_path):
    config = write_config(tmp_path, "typo.json", {"train": {"epochz": 1}})
    plain = run_module("vtn_tf.cli.train", ["--config", config, "--run_dir", tmp_path / "run"])
    assert_refused(plain.returncode, plain.stderr, "typo.json", r"unknown field train\.epochz")
    verbose = run_module("vtn_tf.cli.train", ["--config", config, "--run_dir", tmp_path / "run",
                                               "--verbose"])
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
    assert "ConfigError" in verbose.stderr
    assert not (tmp_path / "run").exists()


# ---- vtn-evaluate ----------------------------------------------------------------------------
EVALUATE_CASES = {
    # name: (argv builder(world, out csv), file named, problem, output that must stay as it was)
    "manifest with a missing file": (
        lambda w, out: ["--manifest", w / "data" / "missing", "--methods", "identity",
                        "--out", out], "gone.nii.gz", "does not exist"),
    "labels on another grid (manifest)": (
        lambda w, out: ["--manifest", w / "data" / "other_grid", "--methods", "identity",
                        "--out", out], "small.nii.gz", "has grid 8x8x8 but image"),
    "corrupt checkpoint": (
        lambda w, out: ["--manifest", w / "data" / "good", "--model", w / "run_corrupt",
                        "--methods", "vtn", "--out", out], "run_corrupt",
        r"checkpoint .* is unreadable \(truncated or corrupt"),
    "mismatched checkpoint": (
        lambda w, out: ["--manifest", w / "data" / "good", "--model", w / "run_mismatched",
                        "--methods", "vtn", "--out", out], "run_mismatched",
        "does not fit the model"),
    "missing model": (
        lambda w, out: ["--manifest", w / "data" / "good", "--model", w / "run_absent",
                        "--methods", "vtn", "--out", out], "run_absent", "does not exist"),
    "existing output": (
        lambda w, out: ["--manifest", w / "data" / "good", "--methods", "identity",
                        "--out", w / "existing.csv"], "existing.csv",
        "already exists; pass --overwrite"),
    "output under a file": (
        lambda w, out: ["--manifest", w / "data" / "good", "--methods", "identity",
                        "--out", w / "file.txt" / "results.csv"], "file.txt", "does not exist"),
}


@pytest.fixture(scope="module")
def evaluate_results(world):
    (world / "existing.csv").write_text("old results\n")
    (world / "results").mkdir()  # vtn-evaluate writes into an existing folder
    cases = {name: build(world, world / "results" / f"eval{k}.csv")
             for k, (name, (build, _, _)) in enumerate(EVALUATE_CASES.items())}
    return drive("evaluate", cases, world)


@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_evaluate_refuses(case, evaluate_results, world):
    check_refusal(evaluate_results, EVALUATE_CASES, case, "vtn-evaluate")
    assert not os.listdir(world / "results")  # no CSV, no summary, no temporary file
    assert (world / "existing.csv").read_text() == "old results\n"
    assert not (world / "existing.md").exists()
    assert (world / "file.txt").read_text() == "a file, not a folder"


def test_evaluate_command_line(world, tmp_path):
    done = run_module("vtn_tf.cli.evaluate", ["--manifest", world / "data" / "missing",
                                               "--methods", "identity", "--out", tmp_path / "r.csv"])
    assert_refused(done.returncode, done.stderr, "gone.nii.gz", "does not exist")
    assert not (tmp_path / "r.csv").exists()


# ---- vtn-register ----------------------------------------------------------------------------
REGISTER_CASES = {
    # name: (argv builder(world, inputs, out), file named, problem); inputs: folder of files
    "missing fixed image": (
        lambda w, i, out: ["--model", w / "run_good", i / "absent.nii.gz", i / "good.nii.gz",
                           "--out", out], "absent.nii.gz", "fixed image .* does not exist"),
    "2-D moving image": (
        lambda w, i, out: ["--model", w / "run_good", i / "good.nii.gz", i / "two_d.nii.gz",
                           "--out", out], "two_d.nii.gz", "moving image .* is 2-D"),
    "constant moving image": (
        lambda w, i, out: ["--model", w / "run_good", i / "good.nii.gz", i / "constant.nii.gz",
                           "--out", out], "constant.nii.gz", "constant"),
    "header claiming 4000^3 float32": (
        lambda w, i, out: ["--model", w / "run_good", i / "good.nii.gz", i / "huge.nii.gz",
                           "--out", out], "huge.nii.gz", r"238\.4 GiB"),
    "moving labels on another grid": (
        lambda w, i, out: ["--model", w / "run_good", i / "good.nii.gz", i / "good.nii.gz",
                           "--moving_labels", i / "small.nii.gz", "--out", out], "small.nii.gz",
        "has grid 8x8x8 but image"),
    "corrupt checkpoint": (
        lambda w, i, out: ["--model", w / "run_corrupt", i / "good.nii.gz", i / "good.nii.gz",
                           "--out", out], "run_corrupt", "cannot be used"),
    "mismatched checkpoint": (
        lambda w, i, out: ["--model", w / "run_mismatched", i / "good.nii.gz",
                           i / "good.nii.gz", "--out", out], "run_mismatched",
        "does not fit the model"),
    "existing output": (
        lambda w, i, out: ["--model", w / "run_good", i / "good.nii.gz", i / "good.nii.gz",
                           "--out", w / "existing_out"], "warped.nii.gz",
        "already exists; pass --overwrite"),
    "output folder under a file": (
        lambda w, i, out: ["--model", w / "run_good", i / "good.nii.gz", i / "good.nii.gz",
                           "--out", w / "file.txt" / "out"], "file.txt", "which is a file"),
}
REGISTER_WORKS = {
    "fixed and moving of different orientations": ("good.nii.gz", "reoriented.nii.gz"),
    "tiny (3x3x3) fixed image": ("tiny.nii.gz", "good.nii.gz"),
}


@pytest.fixture(scope="module")
def register_results(world):
    inputs = world / "register_inputs"
    inputs.mkdir()
    bad.write_good(str(inputs))
    bad.write_two_d(str(inputs), "two_d.nii.gz")
    bad.write_constant(str(inputs), "constant.nii.gz")
    bad.write_huge_header(str(inputs), "huge.nii.gz")
    bad.write_labels_other_grid(str(inputs), "small.nii.gz")
    bad.write_reoriented(str(inputs), "reoriented.nii.gz")
    bad.write_tiny(str(inputs), "tiny.nii.gz")
    (world / "existing_out").mkdir()
    (world / "existing_out" / "warped.nii.gz").write_bytes(b"old")
    cases = {name: build(world, inputs, world / "register" / f"out{k}")
             for k, (name, (build, _, _)) in enumerate(REGISTER_CASES.items())}
    for k, (name, (fixed, moving)) in enumerate(REGISTER_WORKS.items()):
        cases[name] = ["--model", world / "run_good", inputs / fixed, inputs / moving,
                       "--set", "network.intensity=none", "--out", world / "register_ok" / f"out{k}"]
    return drive("register", cases, world)


@pytest.mark.parametrize("case", list(REGISTER_CASES))
def test_register_refuses(case, register_results, world):
    check_refusal(register_results, REGISTER_CASES, case, "vtn-register")
    assert not (world / "register").exists()
    assert bad.snapshot(world / "existing_out") == {"warped.nii.gz": b"old"}


@pytest.mark.parametrize("case", list(REGISTER_WORKS))
def test_register_works(case, register_results, world):
    from vtn_tf import io

    result = register_results[case]
    assert result["code"] == 0, result["stderr"]
    out = world / "register_ok" / f"out{list(REGISTER_WORKS).index(case)}"
    fixed = io.read_volume(world / "register_inputs" / REGISTER_WORKS[case][0])
    warped = io.read_volume(out / "warped.nii.gz")
    assert warped.data.shape == fixed.data.shape
    # It says how it resampled (the tiny image: 64^3 network voxels of 3/64 mm).
    assert "network grid 64x64x64 over a " in result["stdout"] and "box of the fixed image" in result["stdout"]
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-4)


# ---- the public API ----------------------------------------------------------------------
def api_cases():
    import tensorflow as tf

    import vtn_tf

    image, flow = tf.zeros((1, 8, 8, 8, 1)), tf.zeros((1, 8, 8, 8, 3))
    return {
        "warp: image of rank 4": (lambda: vtn_tf.warp(image[0], flow), r"\[B, X, Y, Z, C\]"),
        "warp: flow on another grid": (lambda: vtn_tf.warp(image, tf.zeros((1, 8, 8, 4, 3))),
                                       r"grid|shape"),
        "warp: integer image, linear": (
            lambda: vtn_tf.warp(tf.zeros((1, 8, 8, 8, 1), tf.int32), flow),
            "linear warp needs a floating-point image"),
        "warp: boolean image, linear": (  # (nearest keeps booleans: a valid mask warp)
            lambda: vtn_tf.warp(tf.zeros((1, 8, 8, 8, 1), tf.bool), flow),
            "linear warp needs a floating-point image; got bool"),
        "compose: flow of rank 4": (lambda: vtn_tf.compose(flow[0], flow), r"\[B, X, Y, Z, 3\]"),
        "affine_flow: wrong matrix shape": (
            lambda: vtn_tf.affine_flow(tf.zeros((1, 2, 2)), tf.zeros((1, 3)), (8, 8, 8)),
            r"shape|\[B, 3, 3\]"),
        "VTN: grid not divisible by 64": (
            lambda: vtn_tf.VTN("AD", width=0.125).build((None, 48, 64, 64, 1)),
            r"48.*64|multiple of 64|divisible"),
        "VTN: spec DA": (lambda: vtn_tf.VTN("DA"), r"got 'DA'"),
        "VTN: spec AA": (lambda: vtn_tf.VTN("AA"), r"got 'AA'"),
        "io: boolean voxels": (
            lambda: vtn_tf.io.check_voxels(np.zeros((4, 4, 4), bool), "mask", "mask.nii.gz"),
            r"mask\.nii\.gz has boolean voxels"),
    }


API_CASES = ["warp: image of rank 4", "warp: flow on another grid", "warp: integer image, linear",
             "warp: boolean image, linear", "compose: flow of rank 4",
             "affine_flow: wrong matrix shape", "VTN: grid not divisible by 64", "VTN: spec DA",
             "VTN: spec AA", "io: boolean voxels"]


@pytest.mark.parametrize("case", API_CASES)
def test_api_refuses(case):
    call, problem = api_cases()[case]
    with pytest.raises(ValueError, match=problem):
        call()


@pytest.mark.parametrize("run, problem", [("run_corrupt", "is unreadable"),
                                          ("run_mismatched", "does not fit the model"),
                                          ("run_absent", "not a vtn-tf run directory")])
def test_restore_model_refuses(run, problem, world):
    from vtn_tf.nn import checkpoints

    with pytest.raises((ValueError, FileNotFoundError), match=problem) as caught:
        checkpoints.restore_model(world / run)
    assert run in str(caught.value)


# ---- vtn-export ------------------------------------------------------------------------------
EXPORT_CASES = {
    # name: (argv builder(world, out), file named, problem)
    "corrupt checkpoint": (lambda w, out: ["--model", w / "run_corrupt", "--out", out],
                           "run_corrupt", r"is unreadable \(truncated or corrupt"),
    "mismatched checkpoint": (lambda w, out: ["--model", w / "run_mismatched", "--out", out],
                              "run_mismatched", "does not fit the model"),
    "missing model": (lambda w, out: ["--model", w / "run_absent", "--out", out], "run_absent",
                      "does not exist|not a vtn-tf run directory"),
    "existing output": (lambda w, out: ["--model", w / "run_good", "--out", w / "existing_export"],
                        "existing_export", "already exists; pass --overwrite"),
    "output under a file": (lambda w, out: ["--model", w / "run_good", "--out",
                                            w / "file.txt" / "export"], "file.txt", "which is a file"),
}


@pytest.fixture(scope="module")
def export_results(world):
    (world / "existing_export").mkdir()
    (world / "existing_export" / "keep.txt").write_text("mine")
    cases = {name: build(world, world / "exports" / f"export{k}")
             for k, (name, (build, _, _)) in enumerate(EXPORT_CASES.items())}
    return drive("export", cases, world)


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_refuses(case, export_results, world):
    check_refusal(export_results, EXPORT_CASES, case, "vtn-export")
    assert not (world / "exports").exists()
    assert bad.snapshot(world / "existing_export") == {"keep.txt": b"mine"}


def test_native_evaluation_names_an_unknown_or_empty_split(tmp_path):
    import nibabel as nib

    from vtn_tf import io
    from vtn_tf.evaluation import native

    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / f"{name}.nii.gz")
    subjects = [{"id": n, "image": f"{n}.nii.gz", "labels": None, "landmarks": None} for n in ("a", "b")]
    manifest = {"format": io.MANIFEST_FORMAT, "name": "toy", "modality": "mri", "grid": [4, 4, 4],
                "label_values": [1], "subjects": subjects, "splits": {"train": ["a", "b"], "evaluation": ["a"]}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(io.InputError, match=r"no split 'training'.*train, evaluation"):
        native.run(tmp_path, tmp_path / "out.csv", ("identity",), split="training",
                              protocol="consecutive")
    with pytest.raises(io.InputError, match=r"split 'evaluation' .* gives no consecutive pairs"):
        native.run(tmp_path, tmp_path / "out.csv", ("identity",), split="evaluation",
                              protocol="consecutive")
    assert not (tmp_path / "out.csv").exists()
