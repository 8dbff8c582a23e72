"""Evaluation on the original files, at the fixed image's native resolution (the user's path).

The prepared 64^3 volumes are a fast development proxy. This protocol takes the *original*
scans a prepared dataset was made from (its manifest's ``source`` paths), registers them
through the same code as ``vtn-register`` (:class:`vtn_tf.registration.pipeline.Registrar`) and
scores on the fixed image's own grid:

* ``dice``, ``iou``, ``dice_<label>``: the moving labels carried onto the fixed grid
  (nearest neighbour) against the fixed labels;
* ``folding_percent``: voxels whose Jacobian determinant of ``x + u(x)`` is ≤ 0, counted with
  forward differences (`vtn_tf.core.metrics.forward_jacobian_determinant`), and
  ``folding_central_percent`` with central differences; ``jacobian_std`` (forward);
* ``seconds``: the registration of the pair (read and write excluded; for VTN the
  preprocessing, network, field, refinement and resampling).

Methods: ``vtn``, ``identity`` (the headers alone: the moving labels resampled onto the
fixed grid through world coordinates), ``ants`` (``ants.registration(type_of_transform=
"SyN")``, antspyx defaults, on the original files) and ``elastix`` (stock affine + B-spline
maps, itk-elastix, on the original files).

Misaligned pairs (``misalign``): each moving subject is moved in world space by a known
random transform written into its header (the voxels untouched), so every method sees a
scan in another position and orientation; the labels move with it, so the scores stay
exact. ``rigid``: a rotation of ``MISALIGN_DEGREES`` about a random axis through the image
centre and a shift of ``MISALIGN_MM`` in a random direction; ``affine``: the same, then
per-axis scaling within ±10 % and shear within ±0.05.
"""

import os
import tempfile
import time

import nibabel as nib
import numpy as np

from vtn_tf import io
from vtn_tf.core import metrics
from vtn_tf.evaluation import baselines, protocols
from vtn_tf.preprocessing import alignment
from vtn_tf.registration import inverse, pipeline, resampling
from vtn_tf.registration.settings import AUTO_LEVELS, RegistrationSettings
from vtn_tf.training import data

MISALIGN_MODES = ("rigid", "affine")
MISALIGN_DEGREES = 20.0
MISALIGN_MM = 25.0
COLUMNS_EXTRA = ("folding_central_percent",)
INVERSE_COLUMNS = ("inverse_dice", "inverse_rms_mm", "inverse_p95_mm")


def misalignment(mode, seed, centre):
    """A 4x4 world transform (RAS mm) moving a scan's content about ``centre`` (mm)."""
    rng = np.random.default_rng(seed)
    linear = alignment.rotation_about(rng.normal(size=3), MISALIGN_DEGREES)
    if mode == "affine":
        shear = np.eye(3) + np.triu(rng.uniform(-0.05, 0.05, (3, 3)), 1)
        linear = linear @ np.diag(rng.uniform(0.9, 1.1, 3)) @ shear
    direction = rng.normal(size=3)
    shift = MISALIGN_MM * direction / np.linalg.norm(direction)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre + shift
    return matrix


def moved_copy(path, matrix, folder, role):
    """Write ``path`` with its header moved by ``matrix`` (world) into ``folder``; returns the path."""
    image = nib.load(os.fspath(path))
    affine = matrix @ image.affine
    moved = io.nifti_image(np.asanyarray(image.dataobj), affine, image.header)
    target = os.path.join(folder, f"{role}_{os.path.basename(os.fspath(path))}")
    nib.save(moved, target)
    return target


def field_metrics(flow):
    """Folding (forward and central differences, %) and the std of the forward Jacobian."""
    forward = metrics.forward_jacobian_determinant(np.asarray(flow, np.float32))
    central = metrics.jacobian_determinant(np.asarray(flow, np.float32)).numpy()
    return {"folding_percent": 100.0 * float(np.mean(forward <= 0)),
            "folding_central_percent": 100.0 * float(np.mean(central <= 0)),
            "jacobian_std": float(np.std(forward))}


def _flow_from_itk(field_lps, fixed_affine):
    """An ITK displacement ``[X, Y, Z, 3]`` (LPS mm, fixed -> moving point) as fixed voxels."""
    ras = np.asarray(field_lps, np.float64) * np.array([-1.0, -1.0, 1.0])
    return (ras @ np.linalg.inv(np.asarray(fixed_affine, float)[:3, :3]).T).astype(np.float32)


def _ants(fixed_path, moving_path, labels_path, fixed_affine):
    ants = baselines._import("ants")
    fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=os.path.join(folder, "a_"))
        seconds = time.perf_counter() - start
        warped = ants.apply_transforms(fixed, ants.image_read(labels_path), result["fwdtransforms"],
                                       interpolator="nearestNeighbor").numpy()
        composed = ants.apply_transforms(fixed, moving, result["fwdtransforms"],
                                         compose=os.path.join(folder, "c_"))
        field = ants.image_read(composed).numpy()
    return np.rint(warped).astype(np.int32), _flow_from_itk(field, fixed_affine), seconds


def _elastix(fixed_path, moving_path, labels_path, fixed_affine):
    itk = baselines._import("elastix")
    fixed = itk.imread(fixed_path, itk.F)
    moving = itk.imread(moving_path, itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=parameters,
                                                       log_to_console=False, output_directory=folder)
        seconds = time.perf_counter() - start
    for index in range(transform.GetNumberOfParameterMaps()):
        transform.SetParameter(index, "FinalBSplineInterpolationOrder", "0")
        transform.SetParameter(index, "ResampleInterpolator", "FinalNearestNeighborInterpolator")
    warped = itk.transformix_filter(itk.imread(labels_path, itk.F), transform)
    with tempfile.TemporaryDirectory() as folder:
        field = itk.transformix_deformation_field(moving, transform, output_directory=folder)
    warped = np.rint(itk.array_from_image(warped)).astype(np.int32).transpose(2, 1, 0)
    field = np.asarray(itk.array_from_image(field), np.float64).transpose(2, 1, 0, 3)
    return warped, _flow_from_itk(field, fixed_affine), seconds


def run(manifest, out, methods=("vtn", "identity"), model_dir=None, split="evaluation", protocol="atlas",
        atlas=None, max_pairs=None, overwrite=False, log=print, settings=None, misalign=None, misalign_seed=0):
    """``vtn-evaluate --native``: register the original files of ``split`` and score them.

    ``settings``: VTN's :class:`~vtn_tf.registration.settings.RegistrationSettings` (None: the
    defaults; ``output.inverse`` adds the inverse's columns). Returns ``(rows, summary_markdown)``;
    writes the CSV and the summary like `vtn_tf.evaluation.protocols.run_protocol`.
    """
    settings = settings or RegistrationSettings()
    protocols.check_output(out, overwrite)
    names = protocols.parse_methods(methods if isinstance(methods, str) else ",".join(methods))
    if misalign not in (None,) + MISALIGN_MODES:
        raise io.InputError(f"misalign must be one of {', '.join(MISALIGN_MODES)}; got {misalign!r}")
    where = os.fspath(manifest)
    manifest = io.load_manifest(manifest)
    pairs = native_pairs(manifest, where, split, protocol, atlas or manifest.get("atlas"), max_pairs)
    registrar = pipeline.Registrar(model_dir, settings, lambda *_: None) if "vtn" in names else None
    for name in [n for n in names if n in baselines.METHODS]:
        reason = baselines.unavailable(name)
        if reason:
            log(reason)
            names.remove(name)
    label_values = [int(v) for v in manifest["label_values"]]
    entries = {s["id"]: s for s in manifest["subjects"]}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        inputs = [pair_files(entries, fixed_id, moving_id, k, misalign, misalign_seed, folder)
                  for k, (fixed_id, moving_id) in enumerate(pairs)]
        for name in names:
            for k, (fixed_id, moving_id, fixed_image, fixed_labels, moving_image, moving_labels) in enumerate(inputs):
                row = _score(name, registrar, fixed_image, fixed_labels, moving_image, moving_labels, label_values)
                row.update({"fixed": fixed_id, "moving": moving_id, "method": name, "device": "CPU"})
                rows.append(row)
                log(f"{name} {k + 1}/{len(inputs)} {fixed_id} <- {moving_id}: Dice {row['dice']:.4f}, "
                    f"folding {row['folding_percent']:.3f}% (central {row['folding_central_percent']:.3f}%), "
                    f"{row['seconds']:.2f} s")
    header = (f"# {manifest['name']}: original files, {split} split, {protocol} protocol, {len(pairs)} pairs"
              f"{f', moved by random {misalign} transforms in their headers' if misalign else ''}\n\n"
              "Scored on the fixed image's native grid; folding with forward differences. "
              f"VTN: {describe_settings(settings)}; "
              f"ANTs SyN (antspyx defaults) and elastix (affine + B-spline) on the same files, "
              f"{baselines.THREADS} threads.")
    inverse = settings.output.inverse
    extra = COLUMNS_EXTRA + (INVERSE_COLUMNS if inverse else ())
    for row in rows:
        row.update({name: row.get(name, float("nan")) for name in extra})
    summary = protocols.write_results(rows, out, label_values, overwrite, header, extra=extra)
    if inverse:
        summary += inverse_summary([r for r in rows if r["method"] == "vtn"])
    return rows, summary


def native_pairs(manifest, where, split, protocol, atlas, max_pairs):
    """The ``(fixed id, moving id)`` pairs of ``split``; InputError when the split, its pairs or
    an original file is missing."""
    if split not in manifest["splits"]:
        raise io.InputError(f"manifest {where} has no split {split!r}; its splits: "
                            f"{', '.join(manifest['splits'])}")
    pairs = data.evaluation_pairs(sorted(manifest["splits"][split]), protocol, atlas=atlas, max_pairs=max_pairs)
    if not pairs:
        raise io.InputError(f"split {split!r} of manifest {where} gives no {protocol} pairs")
    entries = {s["id"]: s for s in manifest["subjects"]}
    for subject in {i for pair in pairs for i in pair}:
        source = entries[subject].get("source") or {}
        for key in ("image", "labels"):
            if not source.get(key) or not os.path.isfile(source[key]):
                raise io.InputError(f"subject {subject}: original {key} file {source.get(key)} of manifest "
                                    f"{where} is missing; --native needs the original scans")
    return pairs


def pair_files(entries, fixed_id, moving_id, k, misalign, misalign_seed, folder):
    """``(fixed id, moving id, fixed image, fixed labels, moving image, moving labels)`` paths of
    pair ``k``, the moving files moved by a known random transform in their headers with
    ``misalign`` (copies in ``folder``)."""
    fixed_src, moving_src = entries[fixed_id]["source"], entries[moving_id]["source"]
    moving_image, moving_labels = moving_src["image"], moving_src["labels"]
    if misalign:
        header = nib.load(moving_image)
        centre = header.affine[:3, :3] @ ((np.array(header.shape[:3]) - 1) / 2) + header.affine[:3, 3]
        matrix = misalignment(misalign, misalign_seed * 1000 + k, centre)
        moving_image = moved_copy(moving_image, matrix, folder, f"image{k}")
        moving_labels = moved_copy(moving_labels, matrix, folder, f"labels{k}")
    return fixed_id, moving_id, fixed_src["image"], fixed_src["labels"], moving_image, moving_labels


def inverse_summary(mine):
    """The summary's line on the inverse (VTN's rows ``mine``)."""
    return (f"\nInverse (vtn, moving space): Dice of the fixed labels carried into the moving space "
            f"{np.mean([r['inverse_dice'] for r in mine]):.4f} (forward {np.mean([r['dice'] for r in mine]):.4f}); "
            f"inverse consistency inside the fixed labels: RMS {np.mean([r['inverse_rms_mm'] for r in mine]):.3f} mm, "
            f"p95 {np.mean([r['inverse_p95_mm'] for r in mine]):.3f} mm (mean over pairs)\n")


def describe_settings(settings):
    """The header's words for VTN's settings."""
    alignment, network, refine = settings.alignment, settings.network, settings.refine
    words = (f"init {alignment.init}{'' if alignment.init == 'none' else f' + {alignment.steps} affine search steps'}, "
             f"{f'{network.passes} pass(es)' if network.passes else 'no network (the optimiser alone)'}")
    if network.finetune_steps:
        words += f", network fine-tuned {network.finetune_steps} steps at rate {network.finetune_rate:g}"
    if not refine.active:
        return words
    steps = "x".join(map(str, refine.steps)) + " steps" if isinstance(refine.steps, tuple) \
        else f"{refine.steps} steps per level"
    terms = f", rate {refine.rate:g}{' annealed' if refine.anneal else ''}, smoothness {refine.smoothness:g}" \
        + (f", folding {refine.folding:g}" if refine.folding else "") \
        + (f", {refine.window}^3 windows" if refine.similarity == "ncc" and refine.window != 5 else "")
    return words + f", refine {steps} ({_levels(refine)}{terms}{'' if refine.crop else ', whole grid'})"


def _levels(refine):
    if refine.resolution == "auto":
        return f"levels at {', '.join(f'{c:g}' for c in AUTO_LEVELS)} network voxels"
    return "levels " + ", ".join(f"1/{f}" for f in refine.factors)


def _score(name, registrar, fixed_image, fixed_labels, moving_image, moving_labels, label_values):
    fixed_labels_volume = io.read_labels(fixed_labels, role="fixed labels")
    affine = fixed_labels_volume.affine
    if name == "vtn":
        fixed, moving, labels = pipeline.read_inputs(fixed_image, moving_image, [moving_labels])
        result = registrar.register(fixed, moving, labels)
        warped, flow = result.warped_labels[0], result.flow_voxels
        seconds = sum(result.seconds.values())
        if registrar.settings.output.inverse:
            inverse.invert(result, fixed, moving, [fixed_labels_volume], lambda *_: None)
            inverse_row = {"inverse_dice": metrics.overlap_table(labels[0].data.astype(np.int32),
                                                                 result.inverse.warped_fixed_labels[0].astype(np.int32),
                                                                 label_values)[1]}
            inverse_row["inverse_rms_mm"], inverse_row["inverse_p95_mm"] = inverse.inverse_consistency(
                flow, result.inverse.flow, fixed.affine, moving.affine, fixed_labels_volume.data > 0)
    elif name == "identity":
        moving_volume = io.read_labels(moving_labels, role="moving labels")
        matrix = np.linalg.inv(moving_volume.affine) @ affine
        warped = resampling.resample_through(moving_volume.data, matrix, fixed_labels_volume.data.shape,
                                               "nearest", "zero")
        flow, seconds = np.zeros(fixed_labels_volume.data.shape + (3,), np.float32), 0.0
    else:
        register = _ants if name == "ants" else _elastix
        warped, flow, seconds = register(fixed_image, moving_image, moving_labels, affine)
    per_label, dice, iou = metrics.overlap_table(fixed_labels_volume.data.astype(np.int32),
                                                 np.asarray(warped).astype(np.int32), label_values)
    row = {"dice": dice, "iou": iou, **{f"dice_{v}": per_label[v] for v in per_label},
           "landmark_mm": float("nan"), "landmark_voxels": float("nan"), "seconds": float(seconds)}
    row.update(field_metrics(flow))
    if name == "vtn" and registrar.settings.output.inverse:
        row.update(inverse_row)
    return row
