import json

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from vtn_tf import io
from vtn_tf.training import data

GRID = (16, 16, 16)
TRAIN = ["s1", "s2", "s3", "s4"]
VALIDATION = ["v1"]
EVALUATION = ["e1", "e2", "e3"]


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _image(number):
    rng = np.random.default_rng(number)
    return rng.random(GRID).astype(np.float32)


def _labels(number):
    rng = np.random.default_rng(100 + number)
    return rng.choice([0, 1, 5], size=GRID).astype(np.int16)


@pytest.fixture
def prepared(tmp_path):
    """A tiny prepared dataset: 8 subjects of 16^3, atlas e1 (an evaluation subject)."""
    subjects = []
    for number, subject_id in enumerate(TRAIN + VALIDATION + EVALUATION):
        _write(tmp_path / "images" / f"{subject_id}.nii.gz", _image(number))
        _write(tmp_path / "labels" / f"{subject_id}.nii.gz", _labels(number))
        subjects.append({"id": subject_id, "image": f"images/{subject_id}.nii.gz",
                         "labels": f"labels/{subject_id}.nii.gz", "landmarks": None,
                         "spacing": [1.0, 1.0, 1.0]})
    manifest = {"format": "vtn-tf-dataset/1", "name": "tiny", "synthetic": True,
                "modality": "MRI", "grid": list(GRID), "label_values": [0, 1, 5],
                "atlas": "e1", "subjects": subjects,
                "splits": {"train": TRAIN, "validation": VALIDATION, "evaluation": EVALUATION},
                "preparation": {}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def _number(subject_id):
    return (TRAIN + VALIDATION + EVALUATION).index(subject_id)


def test_load_prepared_reads_splits_and_atlas(prepared):
    dataset = data.load_prepared(prepared)
    assert dataset.grid == GRID and dataset.synthetic and dataset.atlas == "e1"
    assert dataset.label_values == [0, 1, 5] and dataset.has_labels
    assert set(dataset.images) == set(TRAIN + VALIDATION + ["e1"])  # atlas loaded too
    image, labels = dataset.images["s2"], dataset.labels["s2"]
    assert image.dtype == np.float32 and image.shape == GRID
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(image, _image(1))
    np.testing.assert_array_equal(labels, _labels(1))


def test_load_prepared_errors_name_the_manifest(prepared, tmp_path):
    with pytest.raises(ValueError, match="manifest.*no split 'test'"):
        data.load_prepared(prepared, splits=("train", "test"))
    _write(tmp_path / "images" / "s3.nii.gz", np.zeros((16, 16, 8), np.float32))
    with pytest.raises(io.InputError, match="manifest.*s3.nii.gz has grid 16x16x8"):
        data.load_prepared(prepared, splits=("train",))
    (tmp_path / "images" / "s3.nii.gz").unlink()
    with pytest.raises(io.InputError, match="manifest"):
        data.load_prepared(prepared, splits=("train",))


def test_pairwise_training_pairs(prepared):
    dataset = data.load_prepared(prepared, splits=("train",))
    pairs = data.training_pairs(dataset)
    assert len(pairs) == len(TRAIN) * (len(TRAIN) - 1) == len(set(pairs))
    assert all(fixed != moving for fixed, moving in pairs)
    # Evaluation subjects never enter training pairs (the atlas is loaded but not paired).
    assert {i for pair in pairs for i in pair} == set(TRAIN)


def test_atlas_training_pairs_with_atlas_from_another_split(prepared):
    dataset = data.load_prepared(prepared, splits=("train",))
    pairs = data.training_pairs(dataset, mode="atlas")
    assert pairs == [("e1", moving) for moving in TRAIN]
    assert data.training_pairs(dataset, mode="atlas", atlas="s1") == [
        ("s1", "s2"), ("s1", "s3"), ("s1", "s4")]
    with pytest.raises(ValueError, match="not loaded"):
        data.training_pairs(dataset, mode="atlas", atlas="e2")
    with pytest.raises(ValueError, match="not loaded"):
        data.training_pairs(dataset, split="evaluation")


def test_evaluation_pairs():
    ids = ["c", "a", "e", "b", "d"]
    assert data.evaluation_pairs(ids, "consecutive") == [("a", "b"), ("c", "d")]
    assert data.evaluation_pairs(ids, "atlas", atlas="a") == [
        ("a", "c"), ("a", "e"), ("a", "b"), ("a", "d")]
    pairwise = data.evaluation_pairs(ids, "pairwise")
    assert len(pairwise) == 20 and all(f != m for f, m in pairwise)
    assert data.evaluation_pairs(ids, "pairwise", max_pairs=3) == pairwise[:3]
    with pytest.raises(ValueError):
        data.evaluation_pairs(ids, "random")


def _first(dataset):
    return {k: v.numpy() for k, v in next(iter(dataset)).items()}


def test_pair_dataset_shapes_and_resume_determinism(prepared):
    dataset = data.load_prepared(prepared, splits=("train",))
    pairs = data.training_pairs(dataset)
    stream = data.pair_dataset(dataset, pairs, batch_size=2, seed=3, include_labels=True)
    assert stream.element_spec["fixed"].shape == (2, *GRID, 1)
    assert stream.element_spec["moving_labels"].dtype == tf.int32
    batches = [{k: v.numpy() for k, v in b.items()} for b in stream.take(3)]
    for key, dtype in (("fixed", np.float32), ("moving", np.float32),
                       ("fixed_labels", np.int32), ("moving_labels", np.int32)):
        assert batches[0][key].shape == (2, *GRID, 1) and batches[0][key].dtype == dtype
    assert set(np.unique(batches[0]["moving_labels"])) <= {0, 1, 5}
    again = [{k: v.numpy() for k, v in b.items()} for b in
             data.pair_dataset(dataset, pairs, batch_size=2, seed=3, include_labels=True).take(3)]
    resumed = _first(data.pair_dataset(dataset, pairs, batch_size=2, seed=3, start_step=2,
                                       include_labels=True))
    other = _first(data.pair_dataset(dataset, pairs, batch_size=2, seed=4, include_labels=True))
    for key in batches[0]:
        for k in range(3):
            np.testing.assert_array_equal(batches[k][key], again[k][key])
        np.testing.assert_array_equal(batches[2][key], resumed[key])
    assert not np.array_equal(batches[0]["moving"], other["moving"])
    assert not np.array_equal(batches[0]["moving"], batches[1]["moving"])


def test_pair_dataset_without_augmentation_returns_stored_volumes(prepared):
    dataset = data.load_prepared(prepared, splits=("train",))
    pairs = data.training_pairs(dataset)
    stream = data.pair_dataset(dataset, pairs, batch_size=4, seed=1, augment=False,
                               include_labels=True)
    stored = {i: dataset.images[i] for i in TRAIN}
    for batch in stream.take(2):
        for b in range(4):
            fixed = _match(batch["fixed"].numpy()[b, ..., 0], stored)
            moving = _match(batch["moving"].numpy()[b, ..., 0], stored)
            assert (fixed, moving) in pairs
            np.testing.assert_array_equal(batch["fixed_labels"].numpy()[b, ..., 0],
                                          _labels(_number(fixed)))
            np.testing.assert_array_equal(batch["moving_labels"].numpy()[b, ..., 0],
                                          _labels(_number(moving)))


def _match(volume, stored):
    found = [i for i, image in stored.items() if np.array_equal(volume, image)]
    assert len(found) == 1
    return found[0]


def test_pair_dataset_augments_moving_only(prepared):
    dataset = data.load_prepared(prepared, splits=("train",))
    stream = data.pair_dataset(dataset, [("s1", "s2")], batch_size=2, seed=0)
    batch = _first(stream)
    np.testing.assert_array_equal(batch["fixed"][..., 0], np.stack([_image(0)] * 2))
    assert not np.array_equal(batch["moving"][0, ..., 0], _image(1))
    assert not np.array_equal(batch["moving"][0], batch["moving"][1])  # one field per pair


AFFINE = dict(rotation_degrees=15.0, scale=0.1, shear=0.05, translation_mm=4.0)


def test_zero_affine_ranges_give_the_bspline_only_stream(prepared):
    dataset = data.load_prepared(prepared, splits=("train",))
    pairs = data.training_pairs(dataset)
    plain = _first(data.pair_dataset(dataset, pairs, batch_size=2, seed=5, include_labels=True))
    zero = _first(data.pair_dataset(dataset, pairs, batch_size=2, seed=5, include_labels=True,
                                    rotation_degrees=0.0, scale=0.0, shear=0.0,
                                    translation_mm=0.0))
    affine = _first(data.pair_dataset(dataset, pairs, batch_size=2, seed=5, include_labels=True,
                                      **AFFINE))
    for key in plain:
        np.testing.assert_array_equal(plain[key], zero[key])
    np.testing.assert_array_equal(plain["fixed"], affine["fixed"])  # the fixed image stays
    assert not np.array_equal(plain["moving"], affine["moving"])
    assert set(np.unique(affine["moving_labels"])) <= {0, 1, 5}


def test_affine_augmentation_uses_the_moving_subjects_spacing(prepared):
    def moving_after(spacings):
        dataset = data.load_prepared(prepared, splits=("train",))
        for subject_id, spacing in spacings.items():
            dataset.subjects[subject_id]["spacing"] = spacing
        return _first(data.pair_dataset(dataset, [("s1", "s2")], batch_size=2, seed=0,
                                        **AFFINE))["moving"]

    reference = moving_after({})
    np.testing.assert_array_equal(moving_after({"s1": [1.0, 2.0, 3.0]}), reference)  # fixed's
    assert not np.array_equal(moving_after({"s2": [1.0, 2.0, 3.0]}), reference)  # moving's


def test_spacing_missing_from_the_manifest_comes_from_the_header(prepared, tmp_path):
    affine = np.diag([1.5, 2.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(_image(0), affine), str(tmp_path / "images" / "s1.nii.gz"))
    nib.save(nib.Nifti1Image(_labels(0), affine), str(tmp_path / "labels" / "s1.nii.gz"))
    manifest = json.loads(prepared.read_text())
    for subject in manifest["subjects"]:
        del subject["spacing"]
    prepared.write_text(json.dumps(manifest))
    dataset = data.load_prepared(prepared, splits=("train",))
    assert dataset.subjects["s1"]["spacing"] == [1.5, 2.0, 1.0]
    assert dataset.subjects["s2"]["spacing"] == [1.0, 1.0, 1.0]


def test_evaluation_batches(prepared):
    dataset = data.load_prepared(prepared, splits=("evaluation",))
    pairs = data.evaluation_pairs(dataset.ids("evaluation"), "consecutive")
    assert pairs == [("e1", "e2")]
    batches = list(data.evaluation_batches(dataset, pairs))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["fixed"].shape == (1, *GRID, 1) and batch["moving_labels"].dtype == tf.int32
    np.testing.assert_array_equal(batch["fixed"].numpy()[0, ..., 0], _image(_number("e1")))
    np.testing.assert_array_equal(batch["moving_labels"].numpy()[0, ..., 0],
                                  _labels(_number("e2")))


def test_subject_without_labels(prepared):
    manifest = json.loads(prepared.read_text())
    manifest["subjects"][0]["labels"] = None  # s1
    prepared.write_text(json.dumps(manifest))
    dataset = data.load_prepared(prepared, splits=("train",))
    assert dataset.labels["s1"] is None and not dataset.has_labels
    pairs = data.training_pairs(dataset)
    with pytest.raises(ValueError, match="'s1'.*no labels"):
        data.pair_dataset(dataset, pairs, batch_size=2, include_labels=True)
    batch = _first(data.pair_dataset(dataset, pairs, batch_size=2))
    assert set(batch) == {"fixed", "moving"}
