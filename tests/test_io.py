"""Tests for vtn_tf.io: every InputError case, ITK LPS <-> RAS geometry, output checks, atomic and
staged writes, one-line error messages."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from vtn_tf import io
from vtn_tf.io import InputError


def save_nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return str(path)


def random_volume(shape=(6, 7, 8), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_reads_nifti_with_geometry(tmp_path):
    affine = np.diag([-1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10, -5, 2]
    data = random_volume()
    volume = io.read_volume(save_nifti(tmp_path / "a.nii.gz", data, affine))
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.affine, affine)
    assert volume.spacing == pytest.approx((1.5, 2.0, 3.0))


@pytest.mark.parametrize("make, problem", [
    (lambda p: None, "does not exist"),
    (lambda p: os.mkdir(p), "is a folder"),
    (lambda p: open(p, "wb").close(), r"empty \(0 bytes\)"),
    (lambda p: open(p, "w").write("not an image\n"), "could not be read"),
])
def test_bad_files_raise_input_error(tmp_path, make, problem):
    path = str(tmp_path / "moving.nii.gz")
    make(path)
    with pytest.raises(InputError, match=problem) as info:
        io.read_volume(path, role="moving image")
    assert "moving image" in str(info.value) and "moving.nii.gz" in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_gzip(tmp_path):
    full = save_nifti(tmp_path / "full.nii.gz", random_volume((20, 20, 20)))
    payload = open(full, "rb").read()
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(InputError, match="cut.nii.gz could not be read"):
        io.read_volume(truncated)


def test_text_named_nii(tmp_path):
    path = tmp_path / "x.nii"
    path.write_text("hello " * 100)
    with pytest.raises(InputError, match="could not be read"):
        io.read_volume(path)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="unsupported file type"):
        io.read_volume(path)


def test_two_d_refused(tmp_path):
    path = save_nifti(tmp_path / "labels.nii.gz", np.zeros((8, 8), np.float32))
    with pytest.raises(InputError, match=r"moving image labels.nii.gz is 2-D .*3-D volume"):
        io.read_volume(path, role="moving image")


def test_single_slice_refused(tmp_path):
    path = save_nifti(tmp_path / "slice.nii.gz", np.zeros((8, 8, 1), np.float32))
    with pytest.raises(InputError, match="single slice"):
        io.read_volume(path)


def test_four_d_singleton_squeezed_and_multi_volume_refused(tmp_path):
    data = random_volume()
    single = io.read_volume(save_nifti(tmp_path / "one.nii.gz", data[..., None]))
    assert single.data.shape == data.shape
    path = save_nifti(tmp_path / "many.nii.gz", np.stack([data] * 3, axis=-1))
    with pytest.raises(InputError, match="4-D .* 3 volumes"):
        io.read_volume(path)


def test_nan_and_inf_refused(tmp_path):
    data = random_volume()
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    with pytest.raises(InputError, match="2 NaN or infinite"):
        io.read_volume(save_nifti(tmp_path / "nan.nii.gz", data))


def test_complex_refused(tmp_path):
    data = random_volume().astype(np.complex64)
    with pytest.raises(InputError, match="complex"):
        io.read_volume(save_nifti(tmp_path / "c.nii.gz", data))


def test_bool_refused():
    # NIfTI cannot store booleans; arrays can still arrive from code paths.
    with pytest.raises(InputError, match="boolean"):
        io.check_voxels(np.zeros((4, 4, 4), bool), "mask", "mask.nii.gz")


@pytest.mark.parametrize("affine, problem", [
    (np.diag([500.0, 1, 1, 1]), "implausible voxel spacing"),
    (np.diag([0.0, 1, 1, 1]), "non-positive voxel spacing"),
    (np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "singular"),
])
def test_bad_geometry_refused(affine, problem):
    with pytest.raises(InputError, match=problem):
        io.check_geometry(affine, "image", "a.nii.gz")


def test_absurd_spacing_in_file(tmp_path):
    path = save_nifti(tmp_path / "big.nii.gz", random_volume(), np.diag([1.0, 1, 250, 1]))
    with pytest.raises(InputError, match="big.nii.gz has implausible voxel spacing"):
        io.read_volume(path)


def test_constant_image_refused():
    volume = io.Volume(np.zeros((4, 4, 4)), np.eye(4), (1, 1, 1), "zeros.nii.gz")
    with pytest.raises(InputError, match="zeros.nii.gz is all zeros"):
        io.check_not_constant(volume, "fixed image")
    volume.data = volume.data + 7
    with pytest.raises(InputError, match="constant"):
        io.check_not_constant(volume, "fixed image")


def test_read_labels_integer_and_grid_checks(tmp_path):
    image = io.read_volume(save_nifti(tmp_path / "img.nii.gz", random_volume()))
    labels = np.zeros((6, 7, 8), np.float32)
    labels[1:3, 2:4, 3:5] = 2
    volume = io.read_labels(save_nifti(tmp_path / "ok.nii.gz", labels), reference=image)
    assert volume.data.dtype == np.int32 and set(np.unique(volume.data)) == {0, 2}

    labels[0, 0, 0] = 0.5
    with pytest.raises(InputError, match="frac.nii.gz has 1 non-integer values"):
        io.read_labels(save_nifti(tmp_path / "frac.nii.gz", labels))

    other_grid = save_nifti(tmp_path / "grid.nii.gz", np.zeros((6, 7, 9), np.int16))
    with pytest.raises(InputError, match="grid 6x7x9 but image img.nii.gz has 6x7x8"):
        io.read_labels(other_grid, reference=image)

    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    moved = save_nifti(tmp_path / "moved.nii.gz", np.zeros((6, 7, 8), np.int16), shifted)
    with pytest.raises(InputError, match="different voxel-to-world affine"):
        io.read_labels(moved, reference=image)


def test_mhd_lps_to_ras_affine(tmp_path):
    data = random_volume((5, 6, 7))
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0))  # ITK arrays are [z, y, x]
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))  # index x runs along LPS y, index y along x
    sitk.WriteImage(image, str(tmp_path / "scan.mhd"))
    volume = io.read_volume(tmp_path / "scan.mhd")
    # By hand: RAS = diag(-1, -1, 1) @ (origin + D @ diag(spacing) @ index).
    expected = np.array([[0.0, -0.75, 0.0, -10.0],
                         [-0.5, 0.0, 0.0, -20.0],
                         [0.0, 0.0, 2.0, 30.0],
                         [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_allclose(volume.affine, expected)
    np.testing.assert_array_equal(volume.data, data)
    # Same physical point through ITK: index (1, 2, 3) -> LPS -> RAS.
    lps = np.array(image.TransformIndexToPhysicalPoint((1, 2, 3)))
    np.testing.assert_allclose(volume.affine @ [1, 2, 3, 1], [-lps[0], -lps[1], lps[2], 1])


def test_mha_round_trip_keeps_affine(tmp_path):
    affine = np.array([[0.0, -2.0, 0.0, 5.0], [1.0, 0.0, 0.0, -3.0],
                       [0.0, 0.0, 1.5, 7.0], [0.0, 0.0, 0.0, 1.0]])
    data = random_volume()
    io.write_volume(tmp_path / "v.mha", data, affine)
    volume = io.read_volume(tmp_path / "v.mha")
    np.testing.assert_allclose(volume.affine, affine, atol=1e-9)
    np.testing.assert_array_equal(volume.data, data)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
@pytest.mark.parametrize("layout", ["[X, Y, Z, 3]", "[X, Y, Z, 1, 3]"])
def test_vector_field_is_written_as_a_3d_vector_image(tmp_path, suffix, layout):
    """Read back with SimpleITK: a 3-D image of 3-vectors, index (x, y, z) holding
    field[x, y, z], on the grid the affine gives (LPS: x and y flipped from RAS)."""
    shape = (5, 6, 7)
    field = np.random.default_rng(3).normal(size=(*shape, 3)).astype(np.float32)
    field[1, 2, 3] = [0.5, -1.25, 2.0]
    affine = np.array([[0.0, -2.0, 0.0, 5.0], [1.5, 0.0, 0.0, -3.0],
                       [0.0, 0.0, 1.25, 7.0], [0.0, 0.0, 0.0, 1.0]])
    data = field[:, :, :, None] if layout == "[X, Y, Z, 1, 3]" else field
    path = io.write_volume(tmp_path / f"flow{suffix}", data, affine)
    image = sitk.ReadImage(path)
    assert image.GetDimension() == 3 and image.GetSize() == shape
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetPixelID() == sitk.sitkVectorFloat32
    np.testing.assert_array_equal(image.GetPixel(1, 2, 3), [0.5, -1.25, 2.0])
    np.testing.assert_array_equal(image.GetPixel(4, 0, 6), field[4, 0, 6])
    np.testing.assert_allclose(image.GetSpacing(), [1.5, 2.0, 1.25])
    np.testing.assert_allclose(image.GetOrigin(), [-5.0, 3.0, 7.0])
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)),
                               [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], atol=1e-12)
    # The same physical point as the affine gives (RAS -> LPS).
    ras = affine @ [1, 2, 3, 1]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((1, 2, 3)), [-ras[0], -ras[1], ras[2]])


def test_unwritable_itk_shapes_are_refused_before_writing(tmp_path):
    with pytest.raises(InputError, match=r"shape 4x5x6x2x3 cannot be written"):
        io.write_volume(tmp_path / "bad.mha", np.zeros((4, 5, 6, 2, 3), np.float32), np.eye(4))
    assert os.listdir(tmp_path) == []


def test_write_volume_refuses_existing_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.nii.gz"
    data = random_volume()
    io.write_volume(path, data, np.eye(4))
    with pytest.raises(InputError, match="already exists"):
        io.write_volume(path, data, np.eye(4))
    io.write_volume(path, data * 2, np.eye(4), overwrite=True)
    np.testing.assert_allclose(io.read_volume(path).data, data * 2)
    assert os.listdir(tmp_path) == ["out.nii.gz"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - whatever the writer raises, nothing is left
        io.write_volume(tmp_path / "bad.nii.gz", np.zeros((2, 2, 2), bool), np.eye(4))
    assert os.listdir(tmp_path) == []


def test_write_into_missing_folder(tmp_path):
    with pytest.raises(InputError, match="folder .* does not exist"):
        io.write_volume(tmp_path / "no" / "x.nii.gz", random_volume(), np.eye(4))


def test_atomic_text_and_bytes(tmp_path):
    io.atomic_write_text(tmp_path / "a.txt", "hello")
    io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(InputError, match="already exists"):
        io.atomic_write_text(tmp_path / "a.txt", "again")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin"]


def test_check_output_file_message_names_the_flag(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(InputError, match=r"a.csv already exists; pass --overwrite to replace it"):
        io.check_output_file(tmp_path / "a.csv")
    assert io.check_output_file(tmp_path / "a.csv", overwrite=True) == (str(tmp_path / "a.csv"), str(tmp_path))


def test_staged_folder_that_raises_leaves_no_target_and_no_staging(tmp_path):
    out = tmp_path / "new" / "result"
    with pytest.raises(OSError, match="disk full"):
        with io.staged_folder(out) as staging:
            (staging / "first.txt").write_text("written")
            raise OSError("disk full")
    assert not out.exists() and os.listdir(tmp_path / "new") == []


def test_staged_folder_creates_a_missing_target(tmp_path):
    out = tmp_path / "a" / "b"
    with io.staged_folder(out) as staging:
        assert staging.parent == out.parent and staging.name.startswith(".b.") and staging.name.endswith(".part")
        (staging / "x.txt").write_text("x")
    assert os.listdir(out) == ["x.txt"] and os.listdir(out.parent) == ["b"]


def test_staged_folder_into_an_existing_folder_keeps_unrelated_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "x.txt").write_text("old")
    with io.staged_folder(out) as staging:
        (staging / "x.txt").write_text("new")
        (staging / "y.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["notes.txt", "x.txt", "y.txt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "x.txt").read_text() == "new"
    with pytest.raises(ValueError):
        with io.staged_folder(out) as staging:
            (staging / "x.txt").write_text("newer")
            raise ValueError("stop")
    assert sorted(os.listdir(out)) == ["notes.txt", "x.txt", "y.txt"] and (out / "x.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["out"]


def test_staged_folder_replace_swaps_the_whole_folder(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError):
        with io.staged_folder(out, replace=True) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("failed")
    assert os.listdir(out) == ["old.txt"]
    with io.staged_folder(out, replace=True) as staging:
        (staging / "new.txt").write_text("complete")
    assert os.listdir(out) == ["new.txt"] and os.listdir(tmp_path) == ["export"]


@pytest.mark.parametrize("error, line", [
    (ValueError("\n  first line  \nsecond line\n"), "first line"),
    (ValueError(""), "ValueError"),
    (KeyError(), "KeyError"),
    (OSError("   \n "), "OSError"),
])
def test_error_line(error, line):
    assert io.error_line(error) == line


def test_check_output_folder_refusals(tmp_path):
    out = tmp_path / "out"
    assert io.check_output_folder(out, names=["a.nii.gz"]) == out  # missing: created later
    out.mkdir()
    (out / "a.nii.gz").write_text("x")
    with pytest.raises(InputError, match=r"out/a.nii.gz already exists; pass --overwrite"):
        io.check_output_folder(out, False, ["b.nii.gz", "a.nii.gz"])
    io.check_output_folder(out, True, ["a.nii.gz"])
    io.check_output_folder(out, False, ["b.nii.gz"])
    with pytest.raises(InputError, match=r"out already exists; pass --overwrite"):
        io.check_output_folder(out)  # the folder as a whole is the output
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"output .*file is a file; an output folder is required"):
        io.check_output_folder(tmp_path / "file", True, ["a.nii.gz"])
    with pytest.raises(InputError, match=r"inside .*file, which is a file"):
        io.check_output_folder(tmp_path / "file" / "deeper" / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_folder_refuses_an_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(InputError, match=r"output folder .*locked is not writable"):
            io.check_output_folder(locked / "missing" / "out", names=["a.nii.gz"])
        with pytest.raises(InputError, match=r"locked is not writable"):
            io.check_output_file(locked / "a.csv")
    finally:
        locked.chmod(0o755)


def make_manifest(tmp_path, **changes):
    io.write_volume(tmp_path / "s1.nii.gz", random_volume(), np.eye(4))
    manifest = {"format": "vtn-tf-dataset/1", "name": "t", "modality": "MRI",
                "grid": [64, 64, 64], "label_values": [], "atlas": None,
                "subjects": [{"id": "s1", "image": "s1.nii.gz", "labels": None,
                              "landmarks": None}],
                "splits": {"train": ["s1"], "validation": [], "evaluation": []}}
    manifest.update(changes)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path / "manifest.json"


def test_load_manifest_resolves_paths(tmp_path):
    manifest = io.load_manifest(make_manifest(tmp_path))
    assert manifest["subjects"][0]["image"] == str(tmp_path / "s1.nii.gz")
    assert io.load_manifest(tmp_path)["name"] == "t"  # a folder means its manifest.json


@pytest.mark.parametrize("changes, problem", [
    ({"format": "other/2"}, "has format 'other/2'"),
    ({"subjects": [{"id": "s1", "image": "missing.nii.gz"}]}, "missing.nii.gz\\) does not exist"),
    ({"splits": {"train": ["s9"]}}, "unknown subject 's9'"),
])
def test_load_manifest_errors_name_the_manifest(tmp_path, changes, problem):
    path = make_manifest(tmp_path, **changes)
    with pytest.raises(InputError, match=problem) as info:
        io.load_manifest(path)
    assert "manifest.json" in str(info.value)


def test_load_manifest_bad_json(tmp_path):
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        io.load_manifest(tmp_path / "manifest.json")
