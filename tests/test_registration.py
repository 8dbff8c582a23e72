"""vtn_tf.registration / vtn-register: world-space bookkeeping, field files, refusals.

The world/voxel bookkeeping is pinned independently of the network: an identity model (a
tiny VTN with zeroed heads) must reproduce the fixed image from a moving file that holds the
same anatomy under another header. The field files are checked against SimpleITK, which
reads ``flow_itk.nii.gz`` and ``affine.txt`` with its own conventions.
"""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import REPO
from vtn_tf import io
from vtn_tf.core import fields, grids
from vtn_tf.preprocessing import alignment, preparation
from vtn_tf.registration import (
    inputs,
    inverse,
    kernels,
    network,
    outputs,
    pipeline,
    resampling,
)
from vtn_tf.registration.settings import AlignmentSettings, NetworkSettings, OutputSettings, RegistrationSettings

NO_INIT = RegistrationSettings(alignment=AlignmentSettings(init="none"))  # trust the headers

sitk = pytest.importorskip("SimpleITK")

NET = (64, 64, 64)
FIXED_SHAPE = (40, 36, 32)
FIXED_AFFINE = np.array([[1.5, 0, 0, -30], [0, 1.2, 0, -20], [0, 0, 2.0, 10], [0, 0, 0, 1]])
# moving index (a, b, c) holds fixed index (39 - b, a, c + 3): flipped, permuted, cropped.
MOVING_TO_FIXED = np.array([[0, -1, 0, 39], [1, 0, 0, 0], [0, 0, 1, 3], [0, 0, 0, 1.0]])


def smooth(points):
    """A smooth, non-symmetric function of world points ``[..., 3]`` (mm)."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return (3 + np.sin(x / 7.0) + np.cos(y / 6.0 + 0.3) + np.sin(z / 9.0 + 1.0) + 0.01 * x).astype(np.float32)


def world_of(shape, affine):
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    """Fixed and moving files holding the same voxels under different headers (+ labels)."""
    fixed = smooth(world_of(FIXED_SHAPE, FIXED_AFFINE))
    moving = fixed[::-1][:, :, 3:].transpose(1, 0, 2)
    labels = np.where(moving > 3.2, 7, 0).astype(np.uint8) + np.where(moving > 4.0, 200, 0).astype(np.uint8)
    moving_affine = FIXED_AFFINE @ MOVING_TO_FIXED
    return {"fixed": save(tmp_path / "fixed.nii.gz", fixed, FIXED_AFFINE),
            "moving": save(tmp_path / "moving.nii.gz", moving, moving_affine),
            "labels": save(tmp_path / "seg.nii.gz", labels, moving_affine),
            "fixed_data": fixed, "out": tmp_path / "out"}


def test_identity_model_reproduces_fixed_in_world_space(identity_run, pair):
    written = pipeline.register_files(identity_run, pair["fixed"], pair["moving"], pair["out"],
                                          moving_labels=[pair["labels"]], log=lambda *_: None, settings=NO_INIT)
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(["warped.nii.gz", "flow_voxels.nii.gz", "flow_itk.nii.gz",
                            "warped_labels_seg.nii.gz", "affine.json", "affine.txt", "settings.json",
                            "qc.png", "qc.json"])
    warped = nib.load(pair["out"] / "warped.nii.gz")
    np.testing.assert_allclose(warped.affine, FIXED_AFFINE, atol=1e-5)
    assert warped.shape == FIXED_SHAPE
    # The moving file covers fixed z >= 3 only: there it is the fixed image, outside it 0.
    np.testing.assert_allclose(warped.get_fdata()[:, :, 3:], pair["fixed_data"][:, :, 3:], atol=1e-5)
    assert np.all(warped.get_fdata()[:, :, :2] == 0)
    labels = nib.load(pair["out"] / "warped_labels_seg.nii.gz")
    assert labels.get_data_dtype() == np.uint8
    expected = np.where(pair["fixed_data"] > 3.2, 7, 0) + np.where(pair["fixed_data"] > 4.0, 200, 0)
    np.testing.assert_array_equal(np.asarray(labels.dataobj)[:, :, 3:], expected[:, :, 3:])
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 7, 207}


def test_network_grid_samples_the_same_anatomy_from_an_oblique_moving_header():
    """Fixed and moving are one smooth world function on different grids (rotated, other
    spacing, LPS-like): on the network grid they must agree in the interior."""
    fixed = io.Volume(smooth(world_of(FIXED_SHAPE, FIXED_AFFINE)), FIXED_AFFINE, (1.5, 1.2, 2.0))
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    moving_affine = np.eye(4)
    moving_affine[:3, :3] = rotation @ np.diag([-1.0, -0.9, 1.3])
    moving_affine[:3, 3] = [40, 30, 5]
    shape = (90, 90, 60)
    moving = io.Volume(smooth(world_of(shape, moving_affine)), moving_affine, io.spacing_of(moving_affine))
    contract = network.default_contract(NET, "none")
    fixed_net, moving_net, G, T, _, _ = inputs.network_inputs(contract, fixed, moving, "none", print)
    np.testing.assert_array_equal(T, np.eye(4))
    inside = (slice(8, -8),) * 3
    covered = moving_net[inside] != 0
    assert covered.mean() > 0.5
    expected = smooth(world_of(NET, FIXED_AFFINE @ G))[inside]  # interpolation error only
    np.testing.assert_allclose(fixed_net[inside], expected, atol=0.05)
    np.testing.assert_allclose(moving_net[inside][covered], expected[covered], atol=0.05)
    assert np.median(np.abs(moving_net[inside][covered] - expected[covered])) < 0.005
    # Cells aligned: network voxel 0 and 63 sit half a network voxel inside the fixed edges.
    np.testing.assert_allclose(G[:3, :3] @ np.zeros(3) + G[:3, 3], (np.array(FIXED_SHAPE) / 64 - 1) / 2)


def test_flow_to_fixed_grid_scales_and_interpolates():
    constant = np.broadcast_to(np.float32([2.0, -1.0, 0.5]), NET + (3,))
    G = preparation.grid_map(preparation.full_box((32, 128, 64)), NET)
    flow = resampling.network_flow_on_fixed(constant, G, (32, 128, 64)).numpy()
    assert flow.shape == (32, 128, 64, 3) and flow.dtype == np.float32
    np.testing.assert_allclose(flow[5, 7, 9], [1.0, -2.0, 0.5], rtol=1e-6)
    # A field linear in the network index stays linear (and consistent) on the fixed grid.
    grid = grids.identity_grid(NET).numpy()
    linear = 0.1 * grid[..., [1, 2, 0]]
    flow = resampling.network_flow_on_fixed(linear, G, (32, 128, 64)).numpy()
    x = np.array([10.0, 50.0, 30.0])
    n = np.linalg.solve(G[:3, :3], x - G[:3, 3])
    np.testing.assert_allclose(flow[10, 50, 30], np.diag(G)[:3] * 0.1 * n[[1, 2, 0]], rtol=1e-5)


class StubModel:
    """A known, non-trivial network output: an affine stage plus a smooth dense part."""

    def __init__(self):
        self.A = np.array([[1.05, 0.03, 0.0], [-0.02, 0.97, 0.04], [0.01, 0.0, 1.02]], np.float32)
        self.b = np.array([2.3, -1.7, 0.9], np.float32)

    def __call__(self, inputs, dense=True):
        W = (self.A - np.eye(3, dtype=np.float32))[None]
        flow = fields.affine_flow(W, self.b[None], NET).numpy()
        if dense:
            grid = grids.identity_grid(NET).numpy()
            flow = flow + 1.5 * np.sin(grid[..., [1, 2, 0]] / 9.0)[None]
        return {"flow": flow, "warped": inputs["moving"], "affine_matrix": self.A[None],
                "affine_translation": self.b[None]}


def _labels_pair(tmp_path):
    fixed_data = smooth(world_of(FIXED_SHAPE, FIXED_AFFINE))
    moving_affine = FIXED_AFFINE @ MOVING_TO_FIXED
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(36, 40, 29)).astype(np.int16) * 11
    moving = rng.random((36, 40, 29)).astype(np.float32)
    paths = {"fixed": save(tmp_path / "fixed.nii.gz", fixed_data, FIXED_AFFINE),
             "moving": save(tmp_path / "moving.nii.gz", moving, moving_affine),
             "labels": save(tmp_path / "labels.nii.gz", labels, moving_affine)}
    fixed, moving, label_volumes = pipeline.read_inputs(paths["fixed"], paths["moving"], [paths["labels"]])
    return paths, fixed, moving, label_volumes


def test_itk_field_and_affine_match_simpleitk(tmp_path):
    paths, fixed, moving, labels = _labels_pair(tmp_path)
    result = pipeline.register_volumes(StubModel(), NET, fixed, moving, labels, log=lambda *_: None, settings=NO_INIT)
    out = tmp_path / "out"
    outputs.write_result(result, fixed, [paths["labels"]], labels, out, log=lambda *_: None)

    flow = nib.load(out / "flow_voxels.nii.gz")
    assert flow.shape == FIXED_SHAPE + (3,) and flow.get_data_dtype() == np.float32
    assert np.abs(flow.get_fdata()).max() > 2  # a non-trivial field
    mine = nib.load(out / "warped_labels_labels.nii.gz")
    assert mine.get_data_dtype() == np.int16
    mine = np.asarray(mine.dataobj)
    assert set(np.unique(mine)) <= {0, 11, 22, 33, 44}

    field = sitk.ReadImage(str(out / "flow_itk.nii.gz"))
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetDimension() == 3
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    reference = sitk.ReadImage(paths["fixed"])
    theirs = sitk.Resample(sitk.ReadImage(paths["labels"]), reference, transform, sitk.sitkNearestNeighbor, 0)
    theirs = sitk.GetArrayFromImage(theirs).transpose(2, 1, 0)
    assert np.mean(theirs == mine) > 0.999  # rounding ties aside, identical
    assert np.mean(theirs != 0) > 0.5

    # The world affine (affine.txt, LPS) equals the affine stage's field where no dense part.
    affine_only = StubModel()
    result = pipeline.register_volumes(lambda inputs: affine_only(inputs, dense=False), NET, fixed, moving,
                                           log=lambda *_: None, settings=NO_INIT)
    outputs.write_result(result, fixed, [], [], tmp_path / "affine", log=lambda *_: None)
    itk_affine = sitk.ReadTransform(str(tmp_path / "affine" / "affine.txt"))
    field = nib.load(tmp_path / "affine" / "flow_itk.nii.gz").get_fdata()[:, :, :, 0]
    for index in [(20, 18, 16), (10, 25, 8), (30, 6, 24)]:
        point = reference.TransformIndexToPhysicalPoint(index)
        expected = np.asarray(point) + field[index]
        np.testing.assert_allclose(itk_affine.TransformPoint(point), expected, atol=1e-3)


def test_labels_off_the_moving_grid_are_refused_before_writing(identity_run, pair, tmp_path):
    off = save(tmp_path / "off.nii.gz", np.zeros((36, 40, 28), np.uint8), FIXED_AFFINE)
    with pytest.raises(io.InputError, match="off.nii.gz.*must match"):
        pipeline.register_files(identity_run, pair["fixed"], pair["moving"], pair["out"],
                                    moving_labels=[off], log=lambda *_: None)
    assert not pair["out"].exists()


@pytest.mark.parametrize("problem", ["2d", "nan", "constant", "garbage"])
def test_bad_images_are_refused(identity_run, pair, tmp_path, problem):
    bad = tmp_path / "bad.nii.gz"
    if problem == "2d":
        save(bad, np.ones((10, 12), np.float32), np.eye(4))
    elif problem == "nan":
        data = np.ones((10, 12, 8), np.float32)
        data[3, 3, 3] = np.nan
        save(bad, data, np.eye(4))
    elif problem == "constant":
        save(bad, np.zeros((10, 12, 8), np.float32), np.eye(4))
    else:
        bad.write_bytes(b"not an image at all" * 20)
    with pytest.raises(io.InputError, match="moving image bad.nii.gz"):
        pipeline.register_files(identity_run, pair["fixed"], str(bad), pair["out"], log=lambda *_: None)
    assert not pair["out"].exists()


def test_missing_or_corrupt_model_is_refused(identity_run, pair, tmp_path):
    with pytest.raises(io.InputError, match="does not exist"):
        pipeline.register_files(tmp_path / "nowhere", pair["fixed"], pair["moving"], pair["out"])
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "checkpoints").symlink_to(os.path.join(identity_run, "checkpoints"))
    text = open(os.path.join(identity_run, "model.json")).read().replace('"width": 0.125', '"width": 0.25')
    (other / "model.json").write_text(text)
    with pytest.raises(io.InputError, match="does not fit the model"):
        pipeline.register_files(other, pair["fixed"], pair["moving"], pair["out"], log=lambda *_: None)
    (other / "model.json").write_text("{not json")
    with pytest.raises(io.InputError, match="other_run cannot be used"):
        pipeline.register_files(other, pair["fixed"], pair["moving"], pair["out"], log=lambda *_: None)
    assert not pair["out"].exists()


def test_existing_outputs_refused_without_overwrite(identity_run, pair):
    quiet = {"log": lambda *_: None}
    pipeline.register_files(identity_run, pair["fixed"], pair["moving"], pair["out"], **quiet)
    before = (pair["out"] / "warped.nii.gz").stat().st_mtime_ns
    with pytest.raises(io.InputError, match="already exists"):
        pipeline.register_files(identity_run, pair["fixed"], pair["moving"], pair["out"], **quiet)
    assert (pair["out"] / "warped.nii.gz").stat().st_mtime_ns == before
    pipeline.register_files(identity_run, pair["fixed"], pair["moving"], pair["out"], overwrite=True, **quiet)
    assert not [n for n in os.listdir(pair["out"]) if n.startswith(".")]  # no temporary files left


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "vtn_tf.cli.register", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_registers_and_reports_errors_on_one_line(identity_run, pair, tmp_path):
    done = _cli("--model", identity_run, pair["fixed"], pair["moving"], "--out", pair["out"],
                "--moving_labels", pair["labels"], "--set", "network.precision=bfloat16",
                "--set", "alignment.init=none")
    assert done.returncode == 0, done.stderr
    assert "40x36x32" in done.stdout and "wrote 9 files" in done.stdout
    assert "network in bfloat16" in done.stdout
    failed = _cli("--model", identity_run, pair["fixed"], tmp_path / "absent.nii.gz", "--out", tmp_path / "o2")
    assert failed.returncode == 2
    lines = [line for line in failed.stderr.splitlines() if line.startswith("vtn-register")]
    assert len(lines) == 1 and "absent.nii.gz does not exist" in lines[0]
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "o2").exists()


@pytest.mark.slow
@pytest.mark.data
def test_lpba40_outputs_land_in_the_fixed_world_space(identity_run, vtn_data, tmp_path):
    fixed = vtn_data / "lpba40" / "images" / "S01.nii.gz"
    moving = vtn_data / "lpba40" / "images" / "S02.nii.gz"
    labels = vtn_data / "lpba40" / "labels" / "S02.nii.gz"
    if not fixed.exists():
        pytest.skip(f"{fixed} not found")
    pipeline.register_files(identity_run, fixed, moving, tmp_path, moving_labels=[labels],
                                overwrite=True, log=lambda *_: None)
    reference = nib.load(fixed)
    for name in ("warped.nii.gz", "flow_voxels.nii.gz", "flow_itk.nii.gz", "warped_labels_S02.nii.gz"):
        image = nib.load(tmp_path / name)
        np.testing.assert_allclose(image.affine, reference.affine, atol=1e-4)
        assert image.shape[:3] == reference.shape


def test_itk_field_matches_ants_apply_transforms(tmp_path):
    ants = pytest.importorskip("ants", reason="antspyx not installed (pip install antspyx)")
    paths, fixed, moving, labels = _labels_pair(tmp_path)
    result = pipeline.register_volumes(StubModel(), NET, fixed, moving, labels, log=lambda *_: None, settings=NO_INIT)
    outputs.write_result(result, fixed, [paths["labels"]], labels, tmp_path / "out", log=lambda *_: None)
    reference = ants.image_read(paths["fixed"])
    field = [str(tmp_path / "out" / "flow_itk.nii.gz")]
    theirs = ants.apply_transforms(reference, ants.image_read(paths["labels"]), transformlist=field,
                                   interpolator="nearestNeighbor").numpy()
    mine = np.asarray(nib.load(tmp_path / "out" / "warped_labels_labels.nii.gz").dataobj)
    assert np.mean(theirs == mine) > 0.999
    theirs = ants.apply_transforms(reference, ants.image_read(paths["moving"]), transformlist=field,
                                   interpolator="linear").numpy()
    np.testing.assert_allclose(theirs, result.warped, atol=1e-4)


def test_batch_mode_registers_rows_and_reports_a_failed_one(identity_run, pair, tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("fixed,moving,out,moving_labels\n"
                        f"fixed.nii.gz,moving.nii.gz,batch/one,seg.nii.gz\n"
                        f"fixed.nii.gz,absent.nii.gz,batch/two,\n"
                        f"{pair['fixed']},{pair['moving']},batch/three,seg.nii.gz;seg.nii.gz\n"
                        f"fixed.nii.gz,moving.nii.gz,batch/four,\n")
    done = _cli("--model", identity_run, "--pairs", csv_path, "--set", "alignment.init=none")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert sum("ok," in line for line in lines) == 2 and sum("FAILED" in line for line in lines) == 2
    assert any("absent.nii.gz does not exist" in line for line in lines)
    assert any("both be written as" in line for line in lines)  # the same label file twice
    assert "2 of 4 pairs registered" in lines[-1]
    assert (tmp_path / "batch" / "one" / "warped_labels_seg.nii.gz").exists()
    assert (tmp_path / "batch" / "four" / "flow_itk.nii.gz").exists()
    assert not (tmp_path / "batch" / "two").exists() and not (tmp_path / "batch" / "three").exists()
    one = nib.load(tmp_path / "batch" / "one" / "warped.nii.gz").get_fdata()
    np.testing.assert_allclose(one[:, :, 3:], pair["fixed_data"][:, :, 3:], atol=1e-5)


def test_pairs_file_without_a_column_is_refused(tmp_path):
    from vtn_tf.registration import batch

    bad = tmp_path / "pairs.csv"
    bad.write_text("fixed,moving\na.nii.gz,b.nii.gz\n")
    with pytest.raises(io.InputError, match="pairs.csv, line 1: no column 'out'"):
        batch.read_pairs(bad)


def test_uncompressed_outputs_and_nothing_left_after_a_failed_write(identity_run, pair, tmp_path, monkeypatch):
    quiet = {"log": lambda *_: None, "settings": RegistrationSettings(NO_INIT.alignment,
                                                                      output=OutputSettings(compression=0))}
    written = pipeline.register_files(identity_run, pair["fixed"], pair["moving"], pair["out"], **quiet)
    assert sorted(os.path.basename(p) for p in written) == sorted(
        ["warped.nii", "flow_voxels.nii", "flow_itk.nii", "affine.json", "affine.txt", "settings.json",
         "qc.png", "qc.json"])
    assert nib.load(pair["out"] / "flow_itk.nii").shape == FIXED_SHAPE + (1, 3)

    def broken(image, path, compression):
        raise OSError("disk full")

    monkeypatch.setattr(outputs, "save_image", broken)
    with pytest.raises(OSError, match="disk full"):
        pipeline.register_files(identity_run, pair["fixed"], pair["moving"], tmp_path / "new", **quiet)
    assert not (tmp_path / "new").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".new")]


@pytest.mark.parametrize("level", [1, 3, 6])
def test_files_written_side_by_side_read_back_exactly(tmp_path, level):
    # Levels 1-3 deflate with ISA-L, 4-9 with zlib: the same gzip files either way, read back
    # by nibabel, SimpleITK (ITK's own zlib) and Python's gzip module.
    import gzip

    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    arrays = [rng.normal(size=(20, 18, 16, 1, 3)).astype(np.float32), rng.normal(size=(20, 18, 16)).astype(np.float32),
              rng.integers(0, 60, (20, 18, 16)).astype(np.uint8), rng.integers(-5, 900, (20, 18, 16)).astype(np.int16)]
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    jobs = [(tmp_path / f"{i}.nii.gz", nib.Nifti1Image(a, affine)) for i, a in enumerate(arrays)]
    outputs.save_all(jobs, compression=level)
    for (path, image), expected in zip(jobs, arrays):
        with gzip.open(path, "rb") as stream:
            assert stream.read() == image.to_bytes()
        loaded = nib.load(path)
        assert loaded.get_data_dtype() == expected.dtype
        np.testing.assert_array_equal(np.asanyarray(loaded.dataobj), expected)
        np.testing.assert_array_equal(loaded.affine, affine)
        if expected.ndim == 3:  # (the field's ITK reading has its own test)
            read = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
            np.testing.assert_array_equal(read, expected)


def test_gzip_levels_1_to_3_use_isal():  # isal is an install requirement (setup.py)
    assert outputs.gzip_module(1).__name__ == "isal.igzip"
    assert outputs.gzip_module(4).__name__ == "gzip"


@pytest.mark.data
def test_lpba40_pair_moved_in_its_header_scores_as_the_aligned_pair(identity_run, vtn_data, tmp_path):
    """S02 -> S01 at native resolution, then S02 moved by 20 degrees and 25 mm in its header: the
    initial alignment (the default, with its affine search) and the pipeline must give the same
    Dice (within 0.01), and the world transform found for the moved copy must be the move
    composed with the one found for the original."""
    from vtn_tf.core import metrics
    from vtn_tf.evaluation.native import moved_copy

    root = vtn_data / "lpba40"
    fixed_labels = io.read_labels(root / "labels" / "S01.nii.gz")
    move = np.eye(4)
    move[:3, :3] = alignment.rotation_about([0.2, 1.0, -0.4], 20.0)
    centre = nib.load(root / "images" / "S02.nii.gz").affine[:3, 3] / 2
    move[:3, 3] = centre - move[:3, :3] @ centre + np.array([15.0, -20.0, 0.0])  # 25 mm
    scores, transforms = [], []
    for moved in (False, True):
        image, labels = root / "images" / "S02.nii.gz", root / "labels" / "S02.nii.gz"
        if moved:
            image, labels = (moved_copy(p, move, str(tmp_path), role)
                             for p, role in ((image, "image"), (labels, "labels")))
        registrar = pipeline.Registrar(str(identity_run), log=lambda *_: None)
        fixed, moving, label_volumes = pipeline.read_inputs(root / "images" / "S01.nii.gz", image, [labels])
        result = registrar.register(fixed, moving, label_volumes)
        transforms.append(np.asarray(result.affine["initial_alignment_ras"], float))
        scores.append(metrics.overlap_table(fixed_labels.data.astype(np.int32),
                                            result.warped_labels[0].astype(np.int32),
                                            sorted(set(np.unique(fixed_labels.data)) - {0}))[1])
    assert scores[0] > 0.5
    assert abs(scores[0] - scores[1]) < 0.01, scores
    inside = np.argwhere(fixed_labels.data > 0)[::50]  # brain voxels of the fixed image
    points = fixed.affine @ np.c_[inside, np.ones(len(inside))].T
    disagreement = np.linalg.norm((transforms[1] @ points - move @ transforms[0] @ points)[:3], axis=0)
    assert np.sqrt(np.mean(disagreement ** 2)) < 0.5, disagreement.max()  # mm


# ---- the inverse --------------------------------------------------------------------------
def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)


def test_inverse_of_an_analytic_affine_between_two_grids():
    fixed_affine = FIXED_AFFINE
    moving_affine = FIXED_AFFINE @ MOVING_TO_FIXED
    T = np.eye(4)
    T[:3, :3] = alignment.rotation_about([0, 0, 1], 10.0)
    T[:3, 3] = [3.0, -2.0, 1.0]
    A = np.array([[1.03, 0.02, 0.0], [-0.01, 0.98, 0.03], [0.0, 0.01, 1.01]])
    x = _grid(FIXED_SHAPE)
    flow = (x @ (A - np.eye(3)).T + np.array([0.7, -0.4, 0.2])).astype(np.float32)  # x + u = A x + c
    inverse_flow, residual = inverse.inverse_field(flow, fixed_affine, moving_affine, T, (36, 40, 29))
    inverse_flow = inverse_flow.numpy()
    # The forward map (T included in the field): fixed voxel x -> moving voxel P (A x + c); its
    # inverse in closed form. T only splits the field (the result must not depend on it).
    m = _grid((36, 40, 29))
    forward = np.linalg.inv(moving_affine) @ fixed_affine  # fixed voxel position -> moving voxel
    c = np.array([0.7, -0.4, 0.2])
    full = forward[:3, :3] @ A
    offset = forward[:3, :3] @ c + forward[:3, 3]
    x_expected = (m - offset) @ np.linalg.inv(full).T
    P = np.linalg.inv(moving_affine) @ fixed_affine
    expected = x_expected @ P[:3, :3].T + P[:3, 3] - m
    within = np.all((x_expected >= 0) & (x_expected <= np.array(FIXED_SHAPE) - 1), axis=-1)
    assert within.mean() > 0.8  # beyond the fixed grid the field is edge-clamped: not compared
    np.testing.assert_allclose(inverse_flow[within], expected[within], atol=2e-3)
    assert float(np.max(residual)) < 1e-3


def test_inverse_of_a_smooth_random_field_composes_to_the_identity():
    shape = (40, 36, 32)
    rng = np.random.default_rng(0)
    from scipy import ndimage

    field = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 4.0) for _ in range(3)], -1)
    field *= 3.0 / np.abs(field).max()  # up to 3 voxels, smooth (no folding)
    flow = field.astype(np.float32)
    inverse_flow, _ = inverse.inverse_field(flow, np.eye(4), np.eye(4), np.eye(4), shape)
    inverse_flow = inverse_flow.numpy()
    x = _grid(shape)
    target = x + flow  # forward: fixed x -> moving x + u(x); inverse sampled there with scipy
    v = np.stack([ndimage.map_coordinates(inverse_flow[..., c], np.moveaxis(target, -1, 0), order=1, mode="nearest")
                  for c in range(3)], -1)
    inside = (slice(5, -5),) * 3
    error = np.linalg.norm((target + v - x)[inside], axis=-1)
    assert np.sqrt(np.mean(error ** 2)) < 0.1
    rms, p95 = inverse.inverse_consistency(flow, inverse_flow, np.eye(4), np.eye(4), np.ones(shape, bool))
    assert rms < 0.2 and p95 < 0.3


def test_inverse_outputs_match_ants_and_simpleitk(identity_run, tmp_path):
    paths, fixed, moving, labels = _labels_pair(tmp_path)
    fixed_labels_path = save(tmp_path / "atlas.nii.gz",
                             (smooth(world_of(FIXED_SHAPE, FIXED_AFFINE)) > 3.2).astype(np.int16) * 5, FIXED_AFFINE)
    result = pipeline.register_volumes(StubModel(), NET, fixed, moving, labels, log=lambda *_: None, settings=NO_INIT)
    fixed_label_volume = io.read_labels(fixed_labels_path, reference=fixed)
    inverse.invert(result, fixed, moving, [fixed_label_volume], log=lambda *_: None)
    out = tmp_path / "inv"
    outputs.write_result(result, fixed, [paths["labels"]], labels, out, log=lambda *_: None, moving=moving,
                              fixed_label_paths=[fixed_labels_path], fixed_labels=[fixed_label_volume])
    mine = np.asarray(nib.load(out / "warped_fixed_labels_atlas.nii.gz").dataobj)
    assert mine.shape == moving.data.shape and mine.dtype == np.int16
    field = sitk.ReadImage(str(out / "flow_inverse_itk.nii.gz"))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    theirs = sitk.Resample(sitk.ReadImage(fixed_labels_path), sitk.ReadImage(paths["moving"]), transform,
                           sitk.sitkNearestNeighbor, 0)
    assert np.mean(sitk.GetArrayFromImage(theirs).transpose(2, 1, 0) == mine) > 0.999
    ants = pytest.importorskip("ants", reason="antspyx not installed (pip install antspyx)")
    theirs = ants.apply_transforms(ants.image_read(paths["moving"]), ants.image_read(fixed_labels_path),
                                   transformlist=[str(out / "flow_inverse_itk.nii.gz")],
                                   interpolator="nearestNeighbor").numpy()
    assert np.mean(theirs == mine) > 0.999


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32])
def test_resampling_through_a_field_matches_scipy_in_slabs(monkeypatch, dtype):
    """`resample_through` (TensorFlow, in slabs) against scipy's map_coordinates at the same
    positions ``matrix (x + u(x))``: images within float tolerance, label ids exactly and in
    their own dtype."""
    from scipy import ndimage

    monkeypatch.setattr(kernels, "SLAB_VOXELS", 7 * 30 * 26)  # several slabs, a ragged last one
    rng = np.random.default_rng(5)
    source = ndimage.gaussian_filter(rng.normal(size=(33, 29, 24)), 2).astype(np.float32)
    labels = rng.choice(np.array([0, 3, 17, 120], dtype), size=source.shape)
    shape = (31, 30, 26)
    matrix = np.eye(4)
    matrix[:3, :3] = alignment.rotation_about([1, 2, 0.5], 12.0) * 0.9
    matrix[:3, 3] = [2.5, -1.0, 1.5]
    x = _grid(shape)
    field = np.stack([1.5 * np.sin(x[..., 1] / 5), np.cos(x[..., 2] / 4), 0.5 * np.sin(x[..., 0] / 6)],
                     -1).astype(np.float32)
    positions = (x + field) @ matrix[:3, :3].T + matrix[:3, 3]
    inside = np.all((positions >= 0) & (positions <= np.array(source.shape) - 1), axis=-1)
    coords = np.moveaxis(positions, -1, 0)
    image = resampling.resample_through(source, matrix, shape, "linear", "zero", field)
    expected = ndimage.map_coordinates(source, coords, order=1)
    assert image.dtype == np.float32 and inside.mean() > 0.5
    np.testing.assert_allclose(image[inside], expected[inside], atol=1e-5)
    assert np.all(image[np.any((positions < -0.5) | (positions > np.array(source.shape) - 0.5), -1)] == 0)
    warped = resampling.resample_through(labels, matrix, shape, "nearest", "zero", field)
    expected_labels = ndimage.map_coordinates(labels, coords, order=0)
    assert warped.dtype == dtype
    np.testing.assert_array_equal(warped[inside], expected_labels[inside])


def test_network_flow_on_fixed_matches_scipy_with_a_crop_and_an_alignment(monkeypatch):
    """The separable upsampling (in slabs) against scipy's trilinear map_coordinates with edge
    clamping: ``K (x + S f(G^-1 x)) - x`` for a random flow, a crop box and an affine ``K``."""
    from scipy import ndimage

    monkeypatch.setattr(kernels, "SLAB_VOXELS", 9 * 40 * 30)  # several slabs, a ragged last one
    rng = np.random.default_rng(11)
    network_flow = rng.normal(size=(12, 10, 9, 3)).astype(np.float32)
    shape = (37, 40, 30)
    G = preparation.grid_map((np.array([3, 0, 2]), np.array([33, 38, 30])), network_flow.shape[:3])
    K = np.eye(4)
    K[:3, :3] = alignment.rotation_about([0.3, 1, 0.2], 9.0) * 1.05
    K[:3, 3] = [1.5, -2.0, 0.5]
    flow = resampling.network_flow_on_fixed(network_flow, G, shape, K).numpy()
    x = _grid(shape).reshape(-1, 3)
    n = (x - G[:3, 3]) / np.diag(G)[:3]  # network positions; beyond the edges map_coordinates clamps
    f = np.stack([ndimage.map_coordinates(network_flow[..., c], n.T, order=1, mode="nearest") for c in range(3)], -1)
    expected = ((x + f * np.diag(G)[:3]) @ K[:3, :3].T + K[:3, 3] - x).reshape(shape + (3,))
    assert flow.shape == shape + (3,) and flow.dtype == np.float32
    np.testing.assert_allclose(flow, expected, atol=2e-5)


def test_the_compiled_intensity_map_matches_numpy(monkeypatch):
    """`resampling.normalised` (XLA, float32, binary search of the segments, in slabs)
    against the numpy `IntensityMap` (np.interp, float64), with tied knots and values beyond
    the bounds."""
    monkeypatch.setattr(kernels, "SLAB_VOXELS", 7 * 20 * 25)  # 5 slabs, a ragged last one
    rng = np.random.default_rng(2)
    data = rng.normal(100.0, 40.0, size=(30, 20, 25)).astype(np.float32)
    data[0, 0, :5] = [-500, 1e4, 100, 0, 60]
    reference = np.sort(rng.uniform(0.05, 0.95, 101))
    reference[40:45] = reference[40]  # tied target quantiles
    contract = preparation.InputContract(modality="MRI", grid=(8, 8, 8), crop="none",
                                        reference_quantiles=tuple(reference))
    intensity_map, _ = preparation.fit_intensity(np.round(data / 10) * 10, contract)  # tied source quantiles
    assert intensity_map.curve is not None
    for volume in (data, data.astype(np.int16)):
        np.testing.assert_allclose(resampling.normalised(volume, intensity_map), intensity_map(volume),
                                   atol=1e-7, rtol=0)
    plain = preparation.IntensityMap(20.0, 180.0)
    np.testing.assert_allclose(resampling.normalised(data, plain), plain(data), atol=1e-6)


def test_itk_displacement_in_slabs_is_the_voxel_field_in_lps_millimetres(monkeypatch):
    """`itk_displacement` (slabs of the grid) against the field mapped by the fixed affine in
    numpy: ``d = diag(-1, -1, 1) A_f[:3, :3] u``, float32, ``[X, Y, Z, 1, 3]``."""
    monkeypatch.setattr(kernels, "SLAB_VOXELS", 4 * 6 * 5)  # several slabs, a ragged last one
    rng = np.random.default_rng(12)
    flow = rng.normal(size=(11, 6, 5, 3)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = alignment.rotation_about([1, 0.5, 2], 25.0) @ np.diag([0.8, 1.2, 2.0])
    affine[:3, 3] = [10, -20, 5]
    expected = np.einsum("ij,xyzj->xyzi", np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3], flow.astype(np.float64))
    got = outputs.itk_displacement(flow, affine)
    assert got.shape == (11, 6, 5, 1, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, :, :, 0], expected, atol=1e-5)


def test_the_network_runs_as_one_graph_with_the_eager_outputs():
    from vtn_tf.nn.model import VTN

    model = VTN("AD", width=0.25, flow_head_initializer="small")
    rng = np.random.default_rng(0)
    fixed, moving = (rng.random((1, 64, 64, 64, 1)).astype(np.float32) for _ in range(2))
    eager = model({"fixed": fixed, "moving": moving})
    for passes in (1, 2):
        graph = network.network_outputs(model, fixed, moving, passes)
        reference = eager if passes == 1 else model.register(fixed, moving, passes=2)
        for key in ("flow", "affine_matrix", "affine_translation"):
            np.testing.assert_allclose(np.asarray(graph[key]), np.asarray(reference[key]), atol=1e-5)


def test_retracing_warnings_are_quiet_only_inside_the_registration_calls():
    """The compiled kernels retrace per grid size by design: inside `register_volumes` and
    `invert` TensorFlow's retracing warning is dropped, other warnings pass, and outside
    them the caller's own retracing warnings still reach the log."""
    import logging

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger, handler = logging.getLogger("tensorflow"), Keep()
    retracing = "5 out of the last 7 calls to <function f at 0x1> triggered tf.function retracing."
    tools_filter = kernels.expected_retracing in logger.filters  # the command-line tools' own, for good
    logger.removeFilter(kernels.expected_retracing)
    logger.addHandler(handler)
    try:
        @kernels.quiet_retracing
        def inside():
            logger.warning(retracing)
            logger.warning("another warning")

        inside()
        assert seen == ["another warning"]
        logger.warning(retracing)
        assert seen == ["another warning", retracing]
    finally:
        logger.removeHandler(handler)
        if tools_filter:
            logger.addFilter(kernels.expected_retracing)
    for function in (pipeline.register_volumes, inverse.invert):
        assert function.__wrapped__.__name__ == function.__name__  # wrapped by _quiet_retracing


def test_passes_0_runs_no_network(tmp_path, pair):
    """With ``passes=0`` the network's field is not used: a model whose flow head is far from
    zero registers like the identity, and moves the image with ``passes=1``."""
    from vtn_tf.nn.model import VTN
    from vtn_tf.training import loop

    model = VTN("D", width=0.125, flow_head_initializer="small")
    model.build((None, *NET, 1))
    kernel = model.stages[0].output_layer.kernel  # the other layers' weights depend on the test order:
    kernel.assign(np.random.default_rng(0).normal(0, 0.5, kernel.shape).astype(np.float32))  # a head far from 0
    run = loop.save_model_dir(model, NET, tmp_path / "shift_run")
    flows = {}
    for passes in (0, 1):
        out = tmp_path / f"out{passes}"
        pipeline.register_files(run, pair["fixed"], pair["moving"], out, log=lambda *_: None,
                                    settings=RegistrationSettings(NO_INIT.alignment, NetworkSettings(passes=passes)))
        flows[passes] = nib.load(out / "flow_voxels.nii.gz").get_fdata()
        warped = nib.load(out / "warped.nii.gz").get_fdata()
        if passes == 0:
            np.testing.assert_allclose(warped[:, :, 3:], pair["fixed_data"][:, :, 3:], atol=1e-5)
    assert np.abs(flows[0]).max() < 1e-6
    assert np.abs(flows[1]).max() > 0.5
