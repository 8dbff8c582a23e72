"""Register new image files in world space with a trained VTN run directory.

`register_files(run_dir, fixed, moving, out)` (the library of ``vtn-register``) reads two
3-D volumes of any size, spacing and orientation, runs the network on its own grid and writes
the result in the **fixed image's world space, on the fixed image's grid, with its affine**.

Grids (all affines map voxel indices to RAS mm, as in `vtn_tf.io`):

* ``F``: the fixed image's grid, affine ``A_f``. ``M``: the moving image's grid, ``A_m``.
* ``N``: the network grid (the run's ``image_shape``, e.g. 64^3) covering the fixed image's
  field of view with voxel *cells* aligned at the edges (as `data_prep` resamples): network
  index ``n`` sits at fixed index ``x = s * n + (s - 1) / 2`` with ``s = F_size / N_size`` per
  axis. This map is the 4x4 ``G`` below; the network grid's affine is ``A_f @ G``.
* The fixed image is resampled onto ``N`` (trilinear, edge-clamped); the moving image is
  sampled onto ``N`` **through world coordinates**, at moving index ``A_m^-1 A_f G n``, so its
  own orientation, spacing and field of view are honoured (0 outside it). Both are
  normalised on their own voxels before resampling (``mri``: clip to the 0.5/99.5
  percentiles and rescale to [0, 1], as `data_prep`; ``ct``: window 290 / level 120 HU;
  ``none``: as they are).

The network's flow ``f_N`` (voxels of ``N``, pulling) is brought onto the fixed grid by
trilinear interpolation at ``G^-1 x`` (edge-clamped) and scaled by ``s`` per axis.

Outputs (``out/``):

* ``flow_voxels.nii.gz``: float32 ``[X, Y, Z, 3]`` (Learn2Reg layout), displacement **in
  voxels of the fixed grid**, pulling, channel c along array axis c: fixed voxel ``x``
  corresponds to the world point ``A_f (x + u(x))``, i.e. to moving voxel
  ``A_m^-1 A_f (x + u(x))``. When both images share one grid (``A_m = A_f``) this is the
  usual Learn2Reg meaning ``moving_voxel = x + u(x)``.
* ``flow_itk.nii.gz``: float32 ``[X, Y, Z, 1, 3]`` NIfTI, intent 1007 (vector), the fixed
  affine; vectors in physical **LPS millimetres** ``d(p)`` so that a fixed point ``p`` maps
  to the moving point ``p + d(p)`` (ITK/ANTs displacement field: ``antsApplyTransforms -t``,
  ``sitk.DisplacementFieldTransform``). ``d = diag(-1, -1, 1) A_f[:3, :3] u`` (NIfTI
  affines are RAS, ITK vectors LPS).
* ``warped.nii.gz``: float32, the moving image in its original intensities resampled at
  ``A_m^-1 A_f (x + u(x))`` (trilinear; 0 beyond half a voxel outside the moving volume).
* ``warped_labels_<name>.nii.gz``: each moving label map, same positions, nearest neighbour,
  ids unchanged, integer dtype of the input file (int32 if it stored floats).
* ``affine.json`` / ``affine.txt`` (models with an affine stage): the affine stage alone.
  JSON: ``A`` (3x3) and ``b`` (voxels) acting on centred network coordinates
  ``c = n - (N_size - 1) / 2`` (sampled position ``A c + b``), the network grid and its
  affine, and ``world_ras`` / ``world_lps``, the 4x4 maps taking a fixed-image point (mm) to
  the corresponding moving-image point (pull direction, like the fields). The text file is
  the same LPS map as an ITK transform file (``AffineTransform_double_3_3``), readable by
  ``sitk.ReadTransform`` and ``antsApplyTransforms``.

Every input is read and checked, the model restored and all results computed before the
first file is written; each file is written atomically (`vtn_tf.io`), and existing outputs
are refused unless ``overwrite``.
"""

import dataclasses
import gzip
import json
import os
import pathlib

import nibabel as nib
import numpy as np
from scipy import ndimage

from vtn_tf import io

INTENSITY_MODES = ("mri", "ct", "none")
MRI_PERCENTILES = (0.5, 99.5)  # data_prep's defaults
CT_WINDOW = (290.0, 120.0)  # width, level (HU): the authors' liver demo
_LPS = np.diag([-1.0, -1.0, 1.0])
_LPS4 = np.diag([-1.0, -1.0, 1.0, 1.0])
_SLAB = 16  # fixed-grid slices resampled at a time (bounds the coordinate arrays' memory)


# ----- grids -------------------------------------------------------------------------------
def network_to_fixed(fixed_shape, network_shape):
    """4x4 map ``G`` from network voxel indices to fixed voxel indices (cells aligned).

    ``x = s * n + (s - 1) / 2`` per axis, ``s = fixed_size / network_size``: the network
    grid's first and last cells share their outer edges with the fixed grid's.
    """
    scale = np.asarray(fixed_shape, float) / np.asarray(network_shape, float)
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(scale)
    matrix[:3, 3] = (scale - 1.0) / 2.0
    return matrix


def _apply(matrix, points):
    """``matrix`` (4x4) applied to points ``[..., 3]``."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _grid_points(shape, axis0):
    """Voxel indices ``[len(axis0), Y, Z, 3]`` for slices ``axis0`` of a grid of ``shape``."""
    return np.stack(np.meshgrid(np.asarray(axis0, float), np.arange(shape[1], dtype=float),
                                np.arange(shape[2], dtype=float), indexing="ij"), axis=-1)


def sample(data, positions, order, outside="zero"):
    """Values of ``data`` at continuous voxel ``positions`` ``[..., 3]``.

    ``order`` 1 is trilinear (float32 out), 0 nearest (``data``'s dtype). Positions are clamped
    to the volume; with ``outside="zero"``, those more than half a voxel outside it (beyond the
    voxel cells, as ITK decides) give 0 instead, with ``"clamp"`` the nearest edge value.
    """
    shape = np.asarray(data.shape, float)
    clamped = np.clip(positions, 0.0, shape - 1.0)
    if order == 0:
        index = np.floor(clamped + 0.5).astype(np.intp)  # round half up, as ITK
        index = np.minimum(index, np.asarray(data.shape) - 1)
        values = data[index[..., 0], index[..., 1], index[..., 2]]
    else:
        values = ndimage.map_coordinates(
            data.astype(np.float32, copy=False), np.moveaxis(clamped, -1, 0), order=1,
            mode="nearest", output=np.float32)
    if outside == "zero":
        inside = np.all((positions >= -0.5) & (positions < shape - 0.5), axis=-1)
        values = np.where(inside, values, np.zeros((), values.dtype))
    return values


def normalise(data, mode):
    """Intensities -> float32 for the network: ``mri``, ``ct`` or ``none`` (see module doc)."""
    data = np.asarray(data, np.float32)
    if mode == "mri":
        low, high = np.percentile(data, MRI_PERCENTILES)
        if high <= low:
            high = low + 1.0
        return np.clip((data - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if mode == "ct":
        width, level = CT_WINDOW
        return np.clip((data - (level - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)
    if mode == "none":
        return data
    raise io.InputError(f"intensity must be one of {', '.join(INTENSITY_MODES)}; got {mode!r}")


def to_network_grid(fixed, moving, network_shape, intensity="mri"):
    """Fixed and moving images on the network grid, ``[X, Y, Z]`` float32 each.

    Args:
      fixed, moving: :class:`vtn_tf.io.Volume` (any grids, RAS affines).
      network_shape: ``(X, Y, Z)`` of the network.
      intensity: normalisation mode, applied to each volume on its own voxels.
    Returns:
      ``(fixed_net, moving_net, G)``; ``G`` maps network to fixed voxel indices.
    """
    G = network_to_fixed(fixed.data.shape, network_shape)
    net_to_moving = np.linalg.inv(moving.affine) @ fixed.affine @ G
    points = _grid_points(network_shape, range(network_shape[0]))
    fixed_net = sample(normalise(fixed.data, intensity), _apply(G, points), 1, outside="clamp")
    moving_net = sample(normalise(moving.data, intensity), _apply(net_to_moving, points), 1)
    return fixed_net, moving_net, G


# ----- fields ------------------------------------------------------------------------------
def flow_to_fixed_grid(network_flow, fixed_shape):
    """The network's flow as a displacement on the fixed grid (``flow_voxels``).

    Args:
      network_flow: ``[Xn, Yn, Zn, 3]`` float, voxels of the network grid, pulling.
      fixed_shape: ``(X, Y, Z)`` of the fixed grid.
    Returns:
      ``[X, Y, Z, 3]`` float32 in voxels of the fixed grid, pulling: fixed voxel ``x`` goes
      to the fixed-grid position ``x + u(x)``. Trilinear in between network voxels,
      edge-clamped beyond them.
    """
    network_flow = np.asarray(network_flow, np.float32)
    G = network_to_fixed(fixed_shape, network_flow.shape[:3])
    to_network = np.linalg.inv(G)
    out = np.empty(tuple(fixed_shape) + (3,), np.float32)
    for start in range(0, fixed_shape[0], _SLAB):
        rows = range(start, min(start + _SLAB, fixed_shape[0]))
        positions = _apply(to_network, _grid_points(fixed_shape, rows))
        for c in range(3):
            out[rows.start:rows.stop, ..., c] = sample(network_flow[..., c], positions, 1, "clamp") * G[c, c]
    return out


def itk_displacement(flow_voxels, fixed_affine):
    """ITK/ANTs displacement ``[X, Y, Z, 1, 3]`` float32, LPS mm, fixed point -> moving point."""
    ras = np.asarray(flow_voxels, np.float64) @ np.asarray(fixed_affine, float)[:3, :3].T
    return (ras @ _LPS.T).astype(np.float32)[:, :, :, None, :]


def itk_field_nifti_bytes(flow_voxels, fixed_affine, compress=True):
    """The bytes of ``flow_itk.nii.gz``: 5-D NIfTI, intent vector (1007), fixed affine."""
    image = nib.Nifti1Image(itk_displacement(flow_voxels, fixed_affine), fixed_affine)
    image.set_qform(fixed_affine, code=1)
    image.set_sform(fixed_affine, code=1)
    image.header.set_intent("vector")
    image.header.set_xyzt_units("mm")
    payload = image.to_bytes()
    return gzip.compress(payload, compresslevel=6) if compress else payload


def moving_positions(flow_voxels, fixed_affine, moving_affine, rows):
    """Moving voxel positions ``A_m^-1 A_f (x + u(x))`` for fixed slices ``rows``."""
    fixed_to_moving = np.linalg.inv(moving_affine) @ fixed_affine
    points = _grid_points(flow_voxels.shape[:3], rows) + flow_voxels[rows.start:rows.stop]
    return _apply(fixed_to_moving, points)


def resample_moving(data, flow_voxels, fixed_affine, moving_affine, order):
    """``data`` (on the moving grid) resampled onto the fixed grid through the field."""
    shape = flow_voxels.shape[:3]
    data = data.astype(np.float32, copy=False) if order else data  # convert once, not per slab
    out = np.empty(shape, np.float32 if order else data.dtype)
    for start in range(0, shape[0], _SLAB):
        rows = range(start, min(start + _SLAB, shape[0]))
        out[rows.start:rows.stop] = sample(
            data, moving_positions(flow_voxels, fixed_affine, moving_affine, rows), order)
    return out


def affine_description(A, b, network_shape, G, fixed_affine):
    """The affine stage as JSON-ready numbers, with its world-space (RAS and LPS) 4x4 maps."""
    A, b = np.asarray(A, float), np.asarray(b, float)
    centre = (np.asarray(network_shape, float) - 1.0) / 2.0
    network = np.eye(4)  # network index n -> sampled network index A (n - c) + b + c
    network[:3, :3] = A
    network[:3, 3] = b + centre - A @ centre
    to_world = fixed_affine @ G
    world_ras = to_world @ network @ np.linalg.inv(to_world)
    world_lps = _LPS4 @ world_ras @ _LPS4

    def rows(matrix):
        return [[float(v) for v in row] for row in np.asarray(matrix)]

    return {
        "convention": "pull: maps a point of the fixed image to the corresponding point of the "
                      "moving image. A, b act on centred network voxel coordinates "
                      "c = n - (network_size - 1) / 2 (sampled position A c + b, b in network "
                      "voxels); world_ras / world_lps are 4x4 maps of physical points in mm.",
        "A": rows(A), "b": [float(v) for v in b],
        "network_shape": [int(n) for n in network_shape], "network_centre": [float(v) for v in centre],
        "network_affine_ras": rows(to_world), "network_to_fixed_voxels": rows(G),
        "world_ras": rows(world_ras), "world_lps": rows(world_lps),
    }


def itk_affine_text(world_lps):
    """An ITK transform file (``AffineTransform_double_3_3``, LPS, centre 0) for ``world_lps``."""
    world_lps = np.asarray(world_lps, float)
    parameters = list(world_lps[:3, :3].ravel()) + list(world_lps[:3, 3])
    return ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            "Parameters: " + " ".join(repr(float(v)) for v in parameters) + "\n"
            "FixedParameters: 0 0 0\n")


# ----- the whole registration ------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """Everything `register_volumes` computed, on the fixed grid (see the module doc)."""

    flow_voxels: np.ndarray
    warped: np.ndarray
    warped_labels: list
    affine: dict | None
    network_flow: np.ndarray


def register_volumes(model, network_shape, fixed, moving, moving_labels=(), intensity="mri", log=print,
                     passes=1):
    """Register ``moving`` to ``fixed`` (both :class:`vtn_tf.io.Volume`) with ``model``.

    Args:
      model: a VTN, or any callable taking ``{"fixed", "moving"}`` ``[1, X, Y, Z, 1]`` on the
        network grid and returning a dict with ``flow`` (``[1, X, Y, Z, 3]``, network voxels,
        pulling) and, for an affine stage, ``affine_matrix`` / ``affine_translation``.
      network_shape: ``(X, Y, Z)`` of the network grid.
      moving_labels: :class:`vtn_tf.io.Volume` label maps on the moving grid.
      passes: test-time recursion passes (:meth:`vtn_tf.model.VTN.register`); needs a VTN when > 1.
    Returns:
      :class:`Result`.
    """
    fixed_net, moving_net, G = to_network_grid(fixed, moving, network_shape, intensity)
    net_spacing = np.asarray(fixed.spacing) * np.diag(G)[:3]
    log(f"network grid {_shape(network_shape)} over the fixed field of view "
        f"({_mm(net_spacing)} mm voxels); moving sampled there through world coordinates")
    inputs = (fixed_net[None, ..., None], moving_net[None, ..., None])
    if passes > 1:
        out = model.register(*inputs, passes=passes)
    else:
        out = model({"fixed": inputs[0], "moving": inputs[1]})
    network_flow = np.asarray(out["flow"])[0]
    flow_voxels = flow_to_fixed_grid(network_flow, fixed.data.shape)
    warped = resample_moving(moving.data, flow_voxels, fixed.affine, moving.affine, order=1)
    labels = [resample_moving(v.data, flow_voxels, fixed.affine, moving.affine, order=0) for v in moving_labels]
    affine = None
    if out.get("affine_matrix") is not None:
        affine = affine_description(np.asarray(out["affine_matrix"])[0], np.asarray(out["affine_translation"])[0],
                                    network_shape, G, fixed.affine)
    magnitude = np.linalg.norm(flow_voxels * np.asarray(fixed.spacing, np.float32), axis=-1)
    log(f"displacement on the fixed grid: mean {magnitude.mean():.2f} mm, max {magnitude.max():.2f} mm")
    return Result(flow_voxels, warped, labels, affine, network_flow)


def _shape(shape):
    return "x".join(str(int(n)) for n in shape)


def _mm(values):
    return "x".join(f"{float(v):.3g}" for v in values)


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


def load_model(run_dir, precision="float32"):
    """``(model, network_shape, checkpoint)`` from a run directory; InputError when it is
    missing or corrupt. ``precision``: see `vtn_tf.training.restore_model`."""
    from vtn_tf import checkpoints  # TensorFlow only when a model is needed

    if not os.path.isdir(run_dir):
        raise io.InputError(f"model {run_dir} does not exist (a vtn-train run directory is required)")
    try:
        model, shape, checkpoint = checkpoints.restore_model(run_dir, precision)
    except (OSError, ValueError, KeyError, TypeError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise io.InputError(f"model {run_dir} cannot be used: {message}") from None
    return model, tuple(int(n) for n in shape), checkpoint


def output_names(label_paths, with_affine=True):
    names = ["warped.nii.gz", "flow_voxels.nii.gz", "flow_itk.nii.gz"]
    names += [f"warped_labels_{_stem(p)}.nii.gz" for p in label_paths]
    if with_affine:
        names += ["affine.json", "affine.txt"]
    return names


def check_outputs(out, label_paths, overwrite):
    """Refuse before any work: ``out`` a file, clashing label names, or existing outputs."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise io.InputError(f"output {out} is a file; an output folder is required")
    names = output_names(label_paths)
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise io.InputError(f"two label files would both be written as {clashes[0]}; rename one")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise io.InputError(f"output {out / existing[0]} already exists; pass --overwrite to replace it")
    parent = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise io.InputError(f"output {out} is inside {parent}, which is a file; an output folder is required")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise io.InputError(f"output folder {parent} is not writable")


def read_inputs(fixed_path, moving_path, label_paths=()):
    """Read and check the images (3-D, finite, not constant) and the moving label maps."""
    fixed = io.read_volume(fixed_path, "fixed image")
    io.check_not_constant(fixed, "fixed image")
    moving = io.read_volume(moving_path, "moving image")
    io.check_not_constant(moving, "moving image")
    labels = [io.read_labels(p, reference=moving, role="moving labels") for p in label_paths]
    return fixed, moving, labels


def describe(role, volume):
    orientation = "".join(nib.aff2axcodes(volume.affine))
    return (f"{role} {os.path.basename(volume.path)}: {_shape(volume.data.shape)} voxels of "
            f"{_mm(volume.spacing)} mm, {orientation} orientation, {volume.data.dtype}")


def register_files(run_dir, fixed_path, moving_path, out, moving_labels=(), intensity="mri",
                   overwrite=False, log=print, passes=1, precision="float32"):
    """Register two files with a run directory's model and write the outputs into ``out``.

    See the module docstring for the grids and the exact meaning of every output. Returns
    the list of written paths. Raises :class:`vtn_tf.io.InputError` (before writing
    anything) for unreadable, non-3-D, NaN or constant images, labels off the moving grid,
    a missing or corrupt model, or existing outputs without ``overwrite``.
    ``precision``: the network's compute type (`vtn_tf.training.restore_model`).
    """
    label_paths = [os.fspath(p) for p in moving_labels]
    if intensity not in INTENSITY_MODES:
        raise io.InputError(f"intensity must be one of {', '.join(INTENSITY_MODES)}; got {intensity!r}")
    check_outputs(out, label_paths, overwrite)
    fixed, moving, labels = read_inputs(fixed_path, moving_path, label_paths)
    model, network_shape, checkpoint = load_model(os.fspath(run_dir), precision)
    log(describe("fixed", fixed))
    log(describe("moving", moving))
    log(f"model {run_dir} ({checkpoint}), spec {getattr(model, 'spec', '?')}, grid {_shape(network_shape)}; "
        f"intensities: {intensity}{f'; network in {precision}' if precision != 'float32' else ''}")
    if passes > 1:
        log(f"test-time recursion: {passes} passes of the cascade")
    result = register_volumes(model, network_shape, fixed, moving, labels, intensity, log, passes)
    return write_result(result, fixed, label_paths, labels, out, overwrite, log)


def write_result(result, fixed, label_paths, labels, out, overwrite=False, log=print):
    """Write a :class:`Result` into ``out`` (created if missing); see the module doc."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    affine = fixed.affine
    written = [io.write_volume(out / "warped.nii.gz", result.warped.astype(np.float32), affine, overwrite),
               io.write_volume(out / "flow_voxels.nii.gz", result.flow_voxels, affine, overwrite),
               io.atomic_write_bytes(out / "flow_itk.nii.gz", itk_field_nifti_bytes(result.flow_voxels, affine),
                                     overwrite)]
    for path, volume, warped in zip(label_paths, labels, result.warped_labels):
        dtype = _label_dtype(path, volume.data)
        written.append(io.write_volume(out / f"warped_labels_{_stem(path)}.nii.gz", warped.astype(dtype),
                                       affine, overwrite))
    if result.affine is not None:
        written.append(io.atomic_write_text(out / "affine.json", json.dumps(result.affine, indent=2) + "\n",
                                            overwrite))
        written.append(io.atomic_write_text(out / "affine.txt", itk_affine_text(result.affine["world_lps"]),
                                            overwrite))
    else:
        log("the model has no affine stage: no affine.json / affine.txt")
    log(f"wrote {len(written)} files to {out} (fixed image's grid and affine): "
        + ", ".join(os.path.basename(p) for p in written))
    return written
