"""Tests for data_prep: geometry, intensities, layouts, the pipeline and its manifest."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_prep import __main__ as cli
from data_prep import layouts, prepare
from data_prep.prepare import Settings, prepare_dataset
from vtn_tf import io
from vtn_tf.io import InputError
from vtn_tf.preprocessing import preparation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("VTN_DATA", os.path.join(REPO, "..", "shared", "data"))
GRID = (64, 64, 64)
MANIFEST_KEYS = {"format", "name", "synthetic", "modality", "grid", "label_values", "atlas",
                 "subjects", "splits", "preparation"}
SUBJECT_KEYS = {"id", "image", "labels", "landmarks", "source", "spacing"}


def quiet(*_):
    pass


def phantom(shape=(20, 24, 16), seed=0, organ=((6, 14), (8, 18), (4, 10))):
    """Image with a bright organ (label 1) and a small second structure (label 2)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 5.0, shape).astype(np.float32)
    labels = np.zeros(shape, np.int16)
    (x0, x1), (y0, y1), (z0, z1) = organ
    labels[x0:x1, y0:y1, z0:z1] = 1
    labels[x0:x0 + 2, y0:y0 + 2, z0:z0 + 2] = 2
    image[labels == 1] += 80
    image[labels == 2] += 150
    return image, labels


def rotated_affine():
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.5, 2.0, 3.0])
    affine[:3, 3] = [-40, 12, 7]
    return affine


def write_folder_dataset(root, count=4, affine=None, negative=None):
    affine = rotated_affine() if affine is None else affine
    for folder in ("images", "labels"):
        os.makedirs(root / folder, exist_ok=True)
    for index in range(count):
        image, labels = phantom(seed=index)
        if negative == index:
            labels[0, 0, 0] = -2
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"case{index}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), root / "labels" / f"case{index}.nii.gz")
    return root


def folder_settings(root, output, **changes):
    settings = dict(layout="folder", input=str(root), output=str(output), modality="MRI",
                    grid=GRID, crop_label=1, margin_mm=3.0, validation_count=1,
                    evaluation_fraction=0.25)
    settings.update(changes)
    return Settings(**settings)


# --- geometry -------------------------------------------------------------------------------

def test_bounding_box_keeps_organ_with_margin():
    mask = np.zeros((40, 40, 40), bool)
    mask[10:20, 15:25, 30:38] = True
    low, high = preparation.bounding_box(mask, margin_mm=10.0, spacing=(2.0, 2.5, 1.0))
    np.testing.assert_array_equal(low, [10 - 5, 15 - 4, 30 - 10])
    np.testing.assert_array_equal(high, [20 + 5, 25 + 4, 40])  # clipped at the volume edge
    assert preparation.bounding_box(np.zeros((4, 4, 4), bool), 1.0, (1, 1, 1)) is None


def test_resampled_labels_stay_integers_from_input_set():
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array([0, 3, 7, 250], np.int32), size=(30, 21, 17))
    box = (np.array([2, 1, 0]), np.array([29, 20, 17]))
    out = prepare.resample(labels, box, GRID, order=0)
    assert out.dtype == labels.dtype and out.shape == GRID
    assert set(np.unique(out)) <= {0, 3, 7, 250}


def test_resampled_affine_keeps_world_space():
    """A point's world coordinate names the same sample before and after resampling."""
    affine = rotated_affine()
    box = (np.array([3, 2, 1]), np.array([19, 22, 13]))
    new_affine = affine @ preparation.grid_map(box, GRID)
    x = np.arange(20.0)[:, None, None] + np.zeros((20, 24, 16))  # image = its own x index
    resampled = prepare.resample(x, box, GRID, order=1)
    for index in ([0, 0, 0], [10, 33, 5], [63, 63, 63], [31.0, 7, 60]):
        world = preparation.voxel_to_world(index, new_affine)
        old_index = preparation.world_to_voxel(world, affine)[0]
        value = resampled[tuple(int(i) for i in index)]
        assert value == pytest.approx(np.clip(old_index[0], 0, 19), abs=1e-4)


def test_landmark_round_trip():
    affine = rotated_affine()
    points = np.array([[1.0, 2.0, 3.0], [-4.0, 5.5, 0.0]])
    np.testing.assert_allclose(
        preparation.world_to_voxel(preparation.voxel_to_world(points, affine), affine), points)


# --- intensity ------------------------------------------------------------------------------

def test_window_level_maps_window_to_unit_range():
    hounsfield = np.array([-1000.0, -25.0, 120.0, 265.0, 3000.0])
    np.testing.assert_allclose(preparation.window_level(hounsfield, 290, 120), [0, 0, 0.5, 1, 1])


def test_percentile_scale_ignores_outliers():
    data = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32) * 100
    data[0, 0, 0] = 1.7e6
    scaled = preparation.percentile_scale(data, 0.5, 99.5)
    assert scaled.min() == 0 and scaled.max() == 1
    assert np.median(scaled) == pytest.approx(0.5, abs=0.05)


def test_histogram_matching_brings_quantiles_close():
    rng = np.random.default_rng(0)
    reference = np.clip(rng.normal(0.5, 0.12, (32, 32, 32)), 0, 1).astype(np.float32)
    source = (rng.random((32, 32, 32)) ** 2).astype(np.float32)
    quantiles = preparation.reference_quantiles(reference, reference > 0)
    matched = preparation.match_histogram(source, quantiles, source > 0)
    levels = [0.05, 0.25, 0.5, 0.75, 0.95]
    before = np.abs(np.quantile(source, levels) - np.quantile(reference, levels)).max()
    after = np.abs(np.quantile(matched, levels) - np.quantile(reference, levels)).max()
    assert after < 0.01 < before


# --- layouts --------------------------------------------------------------------------------

def test_lits_layout(tmp_path):
    image, labels = phantom()
    for number in (3, 10):
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / f"volume-{number}.nii")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / f"segmentation-{number}.nii")
    subjects = layouts.lits_subjects(str(tmp_path))
    assert [s.id for s in subjects] == ["lits_003", "lits_010"]
    assert subjects[1].labels.endswith("segmentation-10.nii")
    os.remove(tmp_path / "segmentation-3.nii")
    with pytest.raises(InputError, match="volume-3.nii has no matching label"):
        layouts.lits_subjects(str(tmp_path))


def test_sliver07_layout_reads_mhd(tmp_path):
    image, labels = phantom()
    for name, data in (("liver-orig001.mhd", image), ("liver-seg001.mhd", labels)):
        volume = sitk.GetImageFromArray(data.transpose(2, 1, 0))
        volume.SetSpacing((0.7, 0.7, 2.5))
        sitk.WriteImage(volume, str(tmp_path / name))
    subjects = layouts.sliver07_subjects(str(tmp_path))
    assert [s.id for s in subjects] == ["sliver07_001"]
    volume = io.read_volume(subjects[0].image)
    np.testing.assert_allclose(volume.data, image)
    assert volume.spacing == pytest.approx((0.7, 0.7, 2.5))
    np.testing.assert_array_equal(io.read_labels(subjects[0].labels, reference=volume).data,
                                  labels)


def test_folder_layout_pairs_by_name(tmp_path):
    write_folder_dataset(tmp_path, count=2)
    subjects = layouts.folder_subjects(str(tmp_path))
    assert [(s.id, os.path.basename(s.labels)) for s in subjects] == [
        ("case0", "case0.nii.gz"), ("case1", "case1.nii.gz")]
    os.remove(tmp_path / "labels" / "case1.nii.gz")
    with pytest.raises(InputError, match="case1.nii.gz has no matching label file"):
        layouts.folder_subjects(str(tmp_path))


def test_fixed_splits():
    ids = [f"S{n:02d}" for n in range(1, 41)]
    train, evaluation = layouts.lpba40_splits(ids)
    assert evaluation == ids[:10] and train == ids[10:]
    train, evaluation = layouts.abdomen_splits(["0001", "0010", "0021", "0040"])
    assert evaluation == ["0001", "0010"] and train == ["0021", "0040"]


# --- pipeline -------------------------------------------------------------------------------

def test_pipeline_writes_manifest_and_reports_fixes(tmp_path):
    root = write_folder_dataset(tmp_path / "raw", count=4, negative=2)
    output = tmp_path / "prepared"
    manifest = prepare_dataset(folder_settings(root, output), log=quiet)
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["format"] == "vtn-tf-dataset/1" and manifest["synthetic"] is False
    assert manifest["grid"] == list(GRID) and manifest["label_values"] == [1, 2]
    assert all(set(s) == SUBJECT_KEYS for s in manifest["subjects"])
    assert set(manifest["preparation"]) == {"settings", "fixes", "reference_subject", "reference_quantiles"}
    assert len(manifest["preparation"]["reference_quantiles"]) == 101
    assert manifest["preparation"]["fixes"] == ["case2 labels: 1 voxel of value -2 set to 0"]
    splits = manifest["splits"]
    assert sorted(sum(splits.values(), [])) == ["case0", "case1", "case2", "case3"]
    assert len(splits["evaluation"]) == 1 and len(splits["validation"]) == 1
    assert manifest["preparation"]["reference_subject"] == splits["train"][0]

    on_disk = io.load_manifest(output / "manifest.json")
    assert on_disk["subjects"][0]["image"].startswith(str(output))
    for subject in on_disk["subjects"]:
        image = nib.load(subject["image"])
        labels = nib.load(subject["labels"])
        assert image.get_data_dtype() == np.float32 and labels.get_data_dtype() == np.int16
        data = image.get_fdata()
        assert data.shape == GRID and 0 <= data.min() and data.max() <= 1
        assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 1, 2}


def test_prepared_subject_keeps_world_space(tmp_path):
    """The organ's centre has the same world coordinate before and after crop + resample."""
    root = write_folder_dataset(tmp_path / "raw", count=2)
    manifest = prepare_dataset(folder_settings(root, tmp_path / "out", validation_count=0,
                                               evaluation_fraction=0), log=quiet)
    subject = manifest["subjects"][0]
    original = nib.load(subject["source"]["labels"])
    prepared = nib.load(tmp_path / "out" / subject["labels"])

    def organ_centre_world(image):
        centre = np.argwhere(np.asarray(image.dataobj) >= 1).mean(axis=0)
        return preparation.voxel_to_world(centre, image.affine)[0]

    voxel_mm = max(io.spacing_of(prepared.affine))
    np.testing.assert_allclose(organ_centre_world(prepared), organ_centre_world(original),
                               atol=voxel_mm)
    # The crop kept the organ whole, margin included: labels never touch the new grid's edge.
    data = np.asarray(prepared.dataobj)
    assert data[[0, -1]].max() == 0 and data[:, [0, -1]].max() == 0


def test_landmarks_follow_the_crop(tmp_path):
    root = write_folder_dataset(tmp_path / "raw", count=2)
    marks = tmp_path / "marks"
    marks.mkdir()
    for index in range(2):
        (marks / f"case{index}.csv").write_text("x,y,z\n10,13,7\n6,8,4\n")
    manifest = prepare_dataset(folder_settings(root, tmp_path / "out", landmarks=str(marks),
                                               validation_count=0, evaluation_fraction=0),
                               log=quiet)
    subject = manifest["subjects"][0]
    lines = (tmp_path / "out" / subject["landmarks"]).read_text().splitlines()
    assert lines[0] == "x,y,z"
    new_points = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    affine = nib.load(tmp_path / "out" / subject["image"]).affine
    np.testing.assert_allclose(preparation.voxel_to_world(new_points, affine),
                               preparation.voxel_to_world([[10, 13, 7], [6, 8, 4]],
                                                       rotated_affine()), atol=1e-3)


def test_output_folder_not_empty_is_refused(tmp_path):
    root = write_folder_dataset(tmp_path / "raw", count=2)
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty; pass --overwrite"):
        prepare_dataset(folder_settings(root, output), log=quiet)


def test_cli_error_is_one_line_without_traceback(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "raw", count=2)
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)),
             root / "images" / "case1.nii.gz")
    status = cli.main(["--layout", "folder", "--input", str(root), "--output",
                       str(tmp_path / "out"), "--modality", "MRI", "--grid", "64", "64", "64",
                       "--validation-count", "0"])
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert error == "error: image case1.nii.gz is 2-D (8x8); a 3-D volume is required"


def test_cli_refuses_grid_not_multiple_of_64(tmp_path, capsys):
    status = cli.main(["--layout", "hippocampus", "--input", str(tmp_path), "--output",
                       str(tmp_path / "o"), "--grid", "64", "64", "100"])
    assert status == 2 and "multiple of 64" in capsys.readouterr().err


# --- real data (skipped when absent) --------------------------------------------------------

def real_data(name):
    path = os.path.join(DATA, name)
    if not os.path.isdir(path):
        pytest.skip(f"real data {path} is absent (set VTN_DATA to the shared data folder)")
    return path


def test_hippocampus_real_data(tmp_path):
    source = real_data("hippocampus")
    output = tmp_path / "hippo"
    assert cli.main(["--layout", "hippocampus", "--input", source, "--output", str(output),
                     "--limit", "1", "--validation-count", "1"]) == 0
    manifest = io.load_manifest(output)
    assert manifest["splits"]["evaluation"] == ["hippocampus_287"]
    assert manifest["splits"]["validation"][0] not in manifest["splits"]["evaluation"]
    assert manifest["modality"] == "MRI" and manifest["grid"] == [64, 64, 64]
    subject = manifest["subjects"][0]
    original = nib.load(subject["source"]["labels"])
    prepared = nib.load(subject["labels"])
    np.testing.assert_allclose(prepared.affine, original.affine)
    np.testing.assert_array_equal(np.asarray(prepared.dataobj),
                                  np.clip(np.asarray(original.dataobj), 0, None))


def test_abdomen_synthetic_real_labels(tmp_path):
    source = real_data("abdomen_ct_labels")
    output = tmp_path / "abdomen"
    assert cli.main(["--layout", "abdomen-synthetic", "--input", source, "--output",
                     str(output), "--limit", "1", "--validation-count", "0"]) == 0
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["synthetic"] is True and "SYNTHETIC" in manifest["note"]
    assert manifest["modality"] == "CT" and 6 in manifest["label_values"]
    assert manifest["splits"]["evaluation"] == ["0001"]
    assert manifest["subjects"][0]["source"]["image"] is None


def test_holdout_moves_the_last_training_subjects_to_a_tuning_split(tmp_path):
    from data_prep import holdout

    manifest = {"name": "toy", "subjects": [{"id": f"s{i:02d}"} for i in range(8)],
                "splits": {"train": ["s05", "s01", "s03", "s00", "s04", "s02"], "evaluation": ["s06", "s07"]}}
    source = tmp_path / "manifest.json"
    source.write_text(json.dumps(manifest))
    out = tmp_path / "manifest-tuning.json"
    holdout.main(["--manifest", str(source), "--count", "2", "--out", str(out)])
    copy = json.loads(out.read_text())
    assert copy["splits"] == {"train": ["s00", "s01", "s02", "s03"], "tuning": ["s04", "s05"],
                              "evaluation": ["s06", "s07"]}
    assert copy["subjects"] == manifest["subjects"] and json.loads(source.read_text()) == manifest
    # refused, with the file named and nothing overwritten: an existing output, a count that
    # leaves no training subject, a split name already taken, an output away from the manifest
    before = out.read_text()
    for argv, words in [(["--count", "2", "--out", str(out)], "exists"),
                        (["--count", "6", "--out", str(out), "--overwrite"], "between 1 and 5"),
                        (["--count", "1", "--split", "evaluation", "--out", str(out), "--overwrite"], "already has"),
                        (["--count", "1", "--out", str(tmp_path / "sub" / "m.json")], "beside")]:
        with pytest.raises(SystemExit) as stop:
            holdout.main(["--manifest", str(source)] + argv)
        assert words in str(stop.value)
    assert out.read_text() == before
