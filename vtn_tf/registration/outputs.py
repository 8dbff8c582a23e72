"""Writing a registration's outputs: the NIfTI fields and images, the ITK displacement field and
affine transform file, ``affine.json``, staged so that they appear together or not at all."""

import concurrent.futures
import gzip
import json
import os
import pathlib

import nibabel as nib
import numpy as np

from vtn_tf import io, qc
from vtn_tf.core import geometry
from vtn_tf.registration import kernels
from vtn_tf.registration.settings import COMPRESSION_LEVELS, RegistrationSettings


def itk_displacement(flow_voxels, fixed_affine):
    """ITK/ANTs displacement ``[X, Y, Z, 1, 3]`` float32, LPS mm, fixed point -> moving point.

    ``flow_voxels`` ``[X, Y, Z, 3]`` (voxels of the fixed grid) times the fixed grid's LPS
    direction-and-spacing matrix, in slabs of the grid (no full-size temporaries)."""
    flow_voxels = np.asarray(flow_voxels, np.float32)
    matrix = (geometry.LPS_FLIP @ np.asarray(fixed_affine, float)[:3, :3]).astype(np.float32)  # [mm axis, voxel axis]
    out = np.empty(flow_voxels.shape[:3] + (1, 3), np.float32)
    for rows in kernels.slabs(flow_voxels.shape):
        part = flow_voxels[rows.start:rows.stop]
        for c in range(3):
            out[rows.start:rows.stop, :, :, 0, c] = (part[..., 0] * matrix[c, 0] + part[..., 1] * matrix[c, 1]
                                                     + part[..., 2] * matrix[c, 2])
    return out


def itk_field_image(flow_voxels, fixed_affine):
    """``flow_itk`` as a nibabel image: 5-D NIfTI, intent vector (1007), fixed affine."""
    return io.nifti_image(itk_displacement(flow_voxels, fixed_affine), fixed_affine, intent="vector")


def affine_description(A, b, network_shape, G, fixed_affine, initial=None):
    """The affine part as JSON-ready numbers, with its world-space (RAS and LPS) 4x4 maps.

    ``A``, ``b``: the network's affine stage (identity and 0 for models without one);
    ``initial``: the initial alignment ``T`` (4x4 RAS, fixed -> moving point) or None.
    """
    A, b = np.asarray(A, float), np.asarray(b, float)
    initial = np.eye(4) if initial is None else np.asarray(initial, float)
    centre = (np.asarray(network_shape, float) - 1.0) / 2.0
    network = np.eye(4)  # network index n -> sampled network index A (n - c) + b + c
    network[:3, :3] = A
    network[:3, 3] = b + centre - A @ centre
    to_world = fixed_affine @ G
    world_ras = initial @ to_world @ network @ np.linalg.inv(to_world)
    world_lps = geometry.LPS_FLIP4 @ world_ras @ geometry.LPS_FLIP4

    def rows(matrix):
        return [[float(v) for v in row] for row in np.asarray(matrix)]

    return {
        "convention": "pull: maps a point of the fixed image to the corresponding point of the "
                      "moving image. A, b act on centred network voxel coordinates "
                      "c = n - (network_size - 1) / 2 (sampled position A c + b, b in network "
                      "voxels); initial_alignment_ras is the world-space alignment applied "
                      "before the network; world_ras / world_lps are the whole affine part as "
                      "4x4 maps of physical points in mm.",
        "A": rows(A), "b": [float(v) for v in b],
        "network_shape": [int(n) for n in network_shape], "network_centre": [float(v) for v in centre],
        "network_affine_ras": rows(to_world), "network_to_fixed_voxels": rows(G),
        "initial_alignment_ras": rows(initial),
        "world_ras": rows(world_ras), "world_lps": rows(world_lps),
    }


def itk_affine_text(world_lps):
    """An ITK transform file (``AffineTransform_double_3_3``, LPS, centre 0) for ``world_lps``."""
    world_lps = np.asarray(world_lps, float)
    parameters = list(world_lps[:3, :3].ravel()) + list(world_lps[:3, 3])
    return ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            "Parameters: " + " ".join(repr(float(v)) for v in parameters) + "\n"
            "FixedParameters: 0 0 0\n")


def _stem(path):
    name = os.path.basename(os.fspath(path))
    for suffix in io.NIFTI_SUFFIXES + io.ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _label_dtype(path, data):
    """The integer dtype stored in a label file (int32 when it stored floats)."""
    try:
        stored = np.dtype(nib.load(os.fspath(path)).get_data_dtype())
    except Exception:  # not NIfTI: SimpleITK formats keep int32
        stored = np.dtype(np.int32)
    if not np.issubdtype(stored, np.integer):
        return np.dtype(np.int32)
    info = np.iinfo(stored)
    return stored if data.min() >= info.min and data.max() <= info.max else np.dtype(np.int32)


def _extension(compression):
    return ".nii" if int(compression) == 0 else ".nii.gz"


def output_names(label_paths, compression=1, inverse=False, fixed_label_paths=(), quality=False):
    ext = _extension(compression)
    names = [f"warped{ext}", f"flow_voxels{ext}", f"flow_itk{ext}"]
    names += [f"warped_labels_{_stem(p)}{ext}" for p in label_paths]
    if inverse:
        names += [f"flow_inverse_voxels{ext}", f"flow_inverse_itk{ext}", f"warped_fixed{ext}"]
        names += [f"warped_fixed_labels_{_stem(p)}{ext}" for p in fixed_label_paths]
    return names + ["affine.json", "affine.txt", "settings.json"] + (list(qc.FILES) if quality else [])


def check_outputs(out, label_paths, overwrite, compression=1, inverse=False, fixed_label_paths=(), quality=False):
    """Refuse before any work: a bad compression level, --fixed_labels without --inverse,
    clashing label names, or an output folder :func:`vtn_tf.io.check_output_folder` refuses."""
    if int(compression) not in COMPRESSION_LEVELS:
        raise io.InputError(f"compression must be a gzip level 0-9 (0: uncompressed .nii); got {compression}")
    if fixed_label_paths and not inverse and not quality:
        raise io.InputError("--fixed_labels are carried into the moving space (--inverse) or scored by the quality "
                            "check (output.qc): they need one of them")
    names = output_names(label_paths, compression, inverse, fixed_label_paths, quality)
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise io.InputError(f"two label files would both be written as {clashes[0]}; rename one")
    io.check_output_folder(out, overwrite, names)


def write_result(result, fixed, label_paths, labels, out, overwrite=False, log=print, compression=1,
                 moving=None, fixed_label_paths=(), fixed_labels=(), settings=None, quality=None):
    """Write a :class:`Result` into ``out`` (created if missing); see the module doc.

    Every file is written into a staging folder first; only when all of them are complete
    are they moved into ``out`` (:func:`vtn_tf.io.staged_folder`; other files in ``out`` stay).
    ``quality``: the :class:`vtn_tf.qc.Check` of the registration (``qc.png``, ``qc.json``), or None.
    """
    out = pathlib.Path(out)
    inverse = result.inverse
    check_outputs(out, label_paths, overwrite, compression, inverse is not None, fixed_label_paths,
                  quality is not None)
    ext, affine = _extension(compression), fixed.affine
    names, images = [], []
    with io.staged_folder(out) as staging:
        def nifti(name, image):
            images.append((staging / name, image))
            names.append(name)

        nifti(f"warped{ext}", io.nifti_image(result.warped.astype(np.float32), affine))
        nifti(f"flow_voxels{ext}", io.nifti_image(np.asarray(result.flow_voxels, np.float32), affine))
        nifti(f"flow_itk{ext}", itk_field_image(result.flow_voxels, affine))
        for path, volume, warped in zip(label_paths, labels, result.warped_labels):
            dtype = _label_dtype(path, volume.data)
            nifti(f"warped_labels_{_stem(path)}{ext}", io.nifti_image(warped.astype(dtype), affine))
        if inverse is not None:
            moving_affine = moving.affine
            nifti(f"flow_inverse_voxels{ext}", io.nifti_image(inverse.flow.astype(np.float32), moving_affine))
            nifti(f"flow_inverse_itk{ext}", itk_field_image(inverse.flow, moving_affine))
            nifti(f"warped_fixed{ext}", io.nifti_image(inverse.warped_fixed.astype(np.float32), moving_affine))
            for path, volume, warped in zip(fixed_label_paths, fixed_labels, inverse.warped_fixed_labels):
                nifti(f"warped_fixed_labels_{_stem(path)}{ext}",
                      io.nifti_image(warped.astype(_label_dtype(path, volume.data)), moving_affine))
        save_all(images, compression)
        (staging / "affine.json").write_text(json.dumps(result.affine, indent=2) + "\n")
        (staging / "affine.txt").write_text(itk_affine_text(result.affine["world_lps"]))
        settings = settings or RegistrationSettings()  # what register_volumes runs with None
        (staging / "settings.json").write_text(json.dumps(settings.to_json(), indent=2) + "\n")
        names += ["affine.json", "affine.txt", "settings.json"]
        if quality is not None:
            names += qc.write(staging, quality)
        for name in names:
            os.chmod(staging / name, 0o644)
    if quality is None and overwrite:  # a check left by an earlier registration would describe another one
        for name in qc.FILES:
            (out / name).unlink(missing_ok=True)
    written = [str(out / name) for name in names]
    log(f"wrote {len(written)} files to {out} (fixed image's grid and affine): " + ", ".join(names))
    return written


def save_all(images, compression):
    """Save ``(path, image)`` pairs, one thread per file up to the core count: gzip's deflate
    releases the GIL, so the fields compress side by side. The first error is raised."""
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(images), os.cpu_count() or 1))) as pool:
        largest_first = sorted(images, key=lambda item: -np.asarray(item[1].dataobj).nbytes)
        for future in [pool.submit(save_image, image, path, compression) for path, image in largest_first]:
            future.result()


def gzip_module(level):
    """The module that writes gzip ``level``: ISA-L's ``isal.igzip`` for levels 1-3 (its own
    levels 1-3; the same gzip format, much faster than zlib at a similar size,
    `docs/performance.md`), the standard ``gzip`` (zlib) for 4-9
    or where ``isal`` is not installed."""
    if level <= 3:
        try:
            from isal import igzip

            return igzip
        except ImportError:
            pass
    return gzip


def save_image(image, path, compression):
    """nibabel save with a chosen gzip level (0: uncompressed .nii)."""
    level = int(compression)
    if level == 0:
        nib.save(image, str(path))
        return
    with gzip_module(level).open(path, "wb", compresslevel=level) as stream:
        image.to_stream(stream)  # in blocks, never one bytes copy of the whole field (docs/performance.md)
