"""Writers for the bad inputs of `test_bad_inputs.py`, and a driver for the absl tools.

Each ``write_<kind>(folder, name)`` writes one bad file (or leaves it missing) and returns its
path. Volumes are small (16^3) so every case stays fast.

The driver (``python tests/_bad_files.py TOOL CASES.json RESULTS.json``) runs several command
lines of one absl tool in one process: flags are parsed exactly as on the command line
(``FLAGS(argv)``) and the tool's ``main`` is called; its exit status, stdout and stderr are
recorded per case. One TensorFlow start-up then serves all cases of a tool (the tools define
flags of the same names, so they cannot share a process).
"""

import contextlib
import gzip
import io as text_io
import json
import os
import struct
import sys
import traceback

import nibabel as nib
import numpy as np

SHAPE = (16, 16, 16)


def volume(shape=SHAPE, seed=0):
    """A smooth-ish random float32 volume with contrast."""
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def save(path, data, affine=None):
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    nib.save(image, path)
    return os.fspath(path)


def write_good(folder, name="good.nii.gz", seed=0, shape=SHAPE, affine=None):
    return save(os.path.join(folder, name), volume(shape, seed), affine)


def write_missing(folder, name):
    return os.path.join(folder, name)


def write_directory(folder, name):
    path = os.path.join(folder, name)
    os.makedirs(path)
    return path


def write_zero_byte(folder, name):
    path = os.path.join(folder, name)
    open(path, "wb").close()
    return path


def write_not_nifti(folder, name):
    path = os.path.join(folder, name)
    with open(path, "w") as stream:
        stream.write("patient,age\n1,42\n" * 40)
    return path


def write_truncated_gzip(folder, name):
    path = write_good(folder, name)
    payload = open(path, "rb").read()
    with open(path, "wb") as stream:
        stream.write(payload[: len(payload) // 2])
    return path


def write_two_d(folder, name):
    return save(os.path.join(folder, name), volume((16, 16)))


def write_four_d(folder, name):
    return save(os.path.join(folder, name), np.stack([volume()] * 3, axis=-1))


def write_complex(folder, name):
    return save(os.path.join(folder, name), volume().astype(np.complex64))


def write_nan(folder, name):
    data = volume()
    data[3, 4, 5] = np.nan
    return save(os.path.join(folder, name), data)


def write_inf(folder, name):
    data = volume()
    data[3, 4, 5] = -np.inf
    return save(os.path.join(folder, name), data)


def write_constant(folder, name):
    return save(os.path.join(folder, name), np.full(SHAPE, 7, np.float32))


def write_all_zero(folder, name):
    return save(os.path.join(folder, name), np.zeros(SHAPE, np.float32))


def write_fractional_labels(folder, name):
    labels = (volume() * 3).astype(np.float32)  # values in [0, 3), mostly fractional
    return save(os.path.join(folder, name), labels)


def write_labels_other_grid(folder, name):
    return save(os.path.join(folder, name), np.ones((8, 8, 8), np.int16))


def write_negative_spacing(folder, name):
    """A NIfTI whose header says the x voxel size (pixdim[1], qform) is -2 mm."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(SHAPE)
    header.set_qform(np.eye(4), code=1)
    header["sform_code"] = 0
    header["pixdim"][1] = -2.0  # nibabel refuses to set this; the raw header allows it
    return _write_raw(folder, name, header, volume())


def write_huge_spacing(folder, name):
    return save(os.path.join(folder, name), volume(), np.diag([250.0, 1, 1, 1]))


def write_singular_affine(folder, name):
    affine = np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    return save(os.path.join(folder, name), volume(), affine)


def write_huge_header(folder, name, shape=(4000, 4000, 4000)):
    """A small file whose NIfTI header claims ``shape`` float32 voxels (238 GiB at 4000^3)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    return _write_raw(folder, name, header, np.zeros(64, np.float32))


def _write_raw(folder, name, header, data):
    """Header + 4-byte extension flag + ``data`` (Fortran order), gzipped for .gz names."""
    payload = (header.binaryblock + struct.pack("<i", 0)
               + np.asarray(data, np.float32).tobytes(order="F"))
    path = os.path.join(folder, name)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wb") as stream:
        stream.write(payload)
    return path


def write_tiny(folder, name):
    return save(os.path.join(folder, name), volume((3, 3, 3)))


def write_reoriented(folder, name):
    """A good volume in LPS-like orientation (x and y flipped) with 1.5 mm voxels."""
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    affine[:3, 3] = [24.0, 24.0, 0.0]
    return save(os.path.join(folder, name), volume(seed=1), affine)


def write_manifest(folder, subjects, grid=SHAPE, splits=None):
    """A ``vtn-tf-dataset/1`` manifest; ``subjects``: ``[(id, image, labels or None)]``."""
    ids = [s[0] for s in subjects]
    manifest = {
        "format": "vtn-tf-dataset/1", "name": "bad-inputs", "modality": "MRI",
        "grid": list(grid), "label_values": [1],
        "subjects": [{"id": i, "image": image, "labels": labels, "landmarks": None}
                     for i, image, labels in subjects],
        "splits": splits or {"train": ids, "validation": [], "evaluation": ids},
    }
    path = os.path.join(folder, "manifest.json")
    with open(path, "w") as stream:
        json.dump(manifest, stream)
    return path


def snapshot(path):
    """``{relative path: bytes}`` of a file or folder (empty when missing): 'unchanged' checks."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    found = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            found[os.path.relpath(full, path)] = open(full, "rb").read()
    return found


# ---- the absl driver ----------------------------------------------------------------------
TOOLS = {"train": "vtn_tf.cli.train", "evaluate": "vtn_tf.cli.evaluate",
         "register": "vtn_tf.cli.register", "export": "vtn_tf.cli.export"}


def drive(tool, cases):
    """Run each ``argv`` (without the program name) through ``tool``'s flags and main."""
    import importlib

    from absl import app, flags

    module = importlib.import_module(TOOLS[tool])
    results = []
    for argv in cases:
        out, err = text_io.StringIO(), text_io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            flags.FLAGS.unparse_flags()
            try:
                module.main(flags.FLAGS([tool] + list(argv)))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except app.UsageError as error:
                print(f"FATAL Flags parsing error: {error}", file=sys.stderr)
                code = 1
            except BaseException:  # what Python would print on an uncaught error
                traceback.print_exc()
                code = 1
        results.append({"argv": argv, "code": code, "stdout": out.getvalue(),
                        "stderr": err.getvalue()})
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(sys.argv[2]) as stream:
        cases = json.load(stream)
    with open(sys.argv[3], "w") as stream:
        json.dump(drive(sys.argv[1], cases), stream)
