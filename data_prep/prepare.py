"""The preparation pipeline: read, fix, crop, resample, normalise, write, describe.

Per subject: (a) crop to a box around an organ, all labels or the intensity foreground, widened
by a margin in mm; (b) resample the box onto the network grid (trilinear for images, nearest
for labels), keeping world space through the affine; (c) normalise intensities to [0, 1]
(CT: window/level; MRI: per-volume percentile clipping) and match the histogram of the
reference subject (the first training subject); (d) carry landmarks into the new voxel grid;
(e) write ``images/ID.nii.gz`` (float32), ``labels/ID.nii.gz`` (int16), ``landmarks/ID.csv``.
Every repair made to the input is recorded as one line in ``preparation.fixes``.
"""

import dataclasses
import json
import os
import shutil
import time
import zlib

import numpy as np
from scipy import ndimage

from data_prep import layouts, synthetic
from vtn_tf import io
from vtn_tf.io import InputError
from vtn_tf.preprocessing import preparation

GRID_MULTIPLE = 64  # the VTN encoder halves every axis six times


@dataclasses.dataclass
class Settings:
    """Every option of a preparation run (stored verbatim in the manifest)."""

    layout: str
    input: str
    output: str
    images: str | None = None
    labels: str | None = None
    modality: str | None = None
    grid: tuple | None = None
    crop: str | None = None  # "labels", "foreground" or "none"; None: the layout's default
    crop_label: int | None = None
    margin_mm: float = 10.0
    foreground_threshold: float = 0.1
    window_width: float = 290.0
    window_level: float = 120.0
    percentiles: tuple = (0.5, 99.5)
    histogram_matching: bool = True
    landmarks: str | None = None
    landmark_coordinates: str = "voxel"  # of the original image: "voxel", "ras" or "lps" (mm)
    validation_count: int = 4
    evaluation_fraction: float = 0.2
    seed: int = 0
    limit: int | None = None
    overwrite: bool = False


@dataclasses.dataclass
class Prepared:
    image: np.ndarray
    labels: np.ndarray | None
    affine: np.ndarray
    landmarks: np.ndarray | None


def resolve(settings):
    """Fill layout defaults into ``settings`` and check them; returns (settings, layout)."""
    if settings.layout not in layouts.LAYOUTS:
        raise InputError(f"unknown layout {settings.layout!r}; choose one of "
                         + ", ".join(layouts.LAYOUTS))
    layout = layouts.LAYOUTS[settings.layout]
    updates = {"input": os.path.abspath(settings.input), "output": os.path.abspath(settings.output)}
    updates["modality"] = settings.modality or layout.modality
    if updates["modality"] not in ("CT", "MRI"):
        raise InputError(f"layout {layout.name} needs --modality CT or MRI")
    updates["grid"] = tuple(int(n) for n in (settings.grid or layout.grid))
    if len(updates["grid"]) != 3 or any(n <= 0 or n % GRID_MULTIPLE for n in updates["grid"]):
        raise InputError(f"--grid {updates['grid']} must be 3 sizes, each a multiple of "
                         f"{GRID_MULTIPLE} (the VTN encoder halves every axis 6 times)")
    crop_label = settings.crop_label if settings.crop_label is not None else layout.crop_label
    updates["crop_label"] = crop_label
    updates["crop"] = settings.crop or ("labels" if settings.crop_label is not None
                                        else layout.crop)
    if updates["crop"] not in ("labels", "foreground", "none"):
        raise InputError(f"--crop {updates['crop']!r} must be labels, foreground or none")
    if settings.margin_mm < 0:
        raise InputError(f"--margin-mm {settings.margin_mm} must be non-negative")
    low, high = settings.percentiles
    if not 0 <= low < high <= 100:
        raise InputError(f"--percentiles {low} {high} must satisfy 0 <= low < high <= 100")
    if settings.window_width <= 0:
        raise InputError(f"--window-width {settings.window_width} must be positive")
    if settings.landmark_coordinates not in ("voxel", "ras", "lps"):
        raise InputError("--landmark-coordinates must be voxel, ras or lps")
    if settings.landmarks and not os.path.isdir(settings.landmarks):
        raise InputError(f"landmark folder {settings.landmarks} does not exist")
    if settings.limit is not None and settings.limit < 1:
        raise InputError(f"--limit {settings.limit} must be at least 1")
    if not 0 <= settings.evaluation_fraction < 1:
        raise InputError(f"--evaluation-fraction {settings.evaluation_fraction} must be in [0, 1)")
    return dataclasses.replace(settings, **updates), layout


def discover(settings):
    """Sorted :class:`layouts.Subject` list for ``settings.layout``."""
    if settings.layout == "folder":
        return layouts.folder_subjects(settings.input, settings.images, settings.labels)
    return layouts.READERS[settings.layout](settings.input)


def plan_splits(settings, subject_ids, fixes):
    """``{"train", "validation", "evaluation"}`` id lists; validation only from training ids."""
    rng = np.random.default_rng(settings.seed)
    if settings.layout in layouts.FIXED_SPLITS:
        train, evaluation = layouts.FIXED_SPLITS[settings.layout](list(subject_ids))
    else:
        shuffled = list(rng.permutation(subject_ids))
        count = min(int(round(settings.evaluation_fraction * len(shuffled))), len(shuffled) - 1)
        evaluation, train = shuffled[:count], shuffled[count:]
    if not train:
        raise InputError(f"input {settings.input} has no training subjects for layout "
                         f"{settings.layout}")
    count = min(settings.validation_count, len(train) - 1)
    if count < settings.validation_count:
        fixes.append(f"validation split reduced from {settings.validation_count} to {count} "
                     f"subjects to keep at least one training subject")
    validation = list(rng.choice(train, size=count, replace=False)) if count > 0 else []
    splits = {"train": sorted(set(train) - set(validation)), "validation": sorted(validation),
              "evaluation": sorted(evaluation)}
    if settings.limit:
        splits = {name: ids[: settings.limit] for name, ids in splits.items()}
    return splits


def load_subject(subject, settings, fixes):
    """Read (or synthesise) one subject's image and labels, repairing what can be repaired."""
    labels = io.read_labels(subject.labels) if subject.labels else None
    if subject.image is None:
        seed = settings.seed + zlib.crc32(subject.id.encode())
        image = io.Volume(synthetic.synthesize_ct(labels.data, labels.spacing, seed),
                          labels.affine, labels.spacing, labels.path)
    else:
        image = io.read_volume(subject.image, "image")
        io.check_not_constant(image, "image")
        if subject.labels:
            labels = io.read_labels(subject.labels, reference=image)
    if labels is not None:
        negative = labels.data < 0
        if negative.any():
            values = ", ".join(str(v) for v in np.unique(labels.data[negative]))
            count = int(negative.sum())
            fixes.append(f"{subject.id} labels: {count} voxel{'s' * (count != 1)} of value "
                         f"{values} set to 0")
            labels.data[negative] = 0
    return image, labels


def contract_of(settings, reference=None):
    """The settings as a `vtn_tf.preprocessing.preparation.InputContract` (crop "labels" kept for data_prep:
    a contract is only asked of it when a model is trained)."""
    return preparation.InputContract(
        modality=settings.modality, grid=tuple(settings.grid),
        crop="none" if settings.crop == "none" else "foreground", margin_mm=settings.margin_mm,
        foreground_threshold=settings.foreground_threshold, percentiles=tuple(settings.percentiles),
        window_width=settings.window_width, window_level=settings.window_level,
        reference_quantiles=None if reference is None else tuple(reference))


def crop_box(image, labels, settings, subject_id):
    """The crop box (see `vtn_tf.preprocessing.preparation`) for this subject."""
    if settings.crop == "labels":
        if labels is None:
            raise InputError(f"subject {subject_id} has no labels to crop around; "
                             "use --crop foreground or --crop none")
        if settings.crop_label is None:
            mask, what = labels.data > 0, "any label"
        else:
            mask, what = labels.data == settings.crop_label, f"label {settings.crop_label}"
        box = preparation.bounding_box(mask, settings.margin_mm, image.spacing)
    else:
        what = "foreground"
        box = preparation.crop_box(image.data, image.spacing, contract_of(settings))
    if box is None:
        source = labels.path if settings.crop == "labels" else image.path
        raise InputError(f"{os.path.basename(source)} has no voxel of {what} to crop around "
                         f"(subject {subject_id})")
    return box


def resample(data, box, grid, order):
    """Resample ``data[box]`` onto ``grid`` (`vtn_tf.preprocessing.preparation.grid_map`; order 1 = trilinear,
    0 = nearest; edges clamped). Nearest output only holds input values, in the input dtype."""
    low, high = box
    if tuple(high - low) == tuple(grid):
        return np.array(data[low[0]:high[0], low[1]:high[1], low[2]:high[2]])
    matrix = preparation.grid_map(box, grid)
    output = np.float32 if order else data.dtype
    source = data.astype(np.float32) if order else data
    return ndimage.affine_transform(source, matrix[:3, :3], offset=matrix[:3, 3],
                                    output_shape=tuple(grid), output=output, order=order,
                                    mode="nearest")


def find_landmarks(settings, subject_id):
    for suffix in (".csv", ".txt"):
        candidate = os.path.join(settings.landmarks, subject_id + suffix)
        if os.path.isfile(candidate):
            return candidate
    return None


def landmarks_to_grid(points, settings, original_affine, new_affine):
    """Landmarks in the input's coordinates -> continuous voxel indices of the new grid."""
    if settings.landmark_coordinates == "voxel":
        world = preparation.voxel_to_world(points, original_affine)
    elif settings.landmark_coordinates == "lps":
        world = points * np.array([-1.0, -1.0, 1.0])
    else:
        world = points
    return preparation.world_to_voxel(world, new_affine)


def prepare_subject(subject, settings, fixes, reference=None):
    """Everything for one subject; ``reference``: quantiles to match (None: no matching)."""
    image, labels = load_subject(subject, settings, fixes)
    box = crop_box(image, labels, settings, subject.id)
    data = resample(image.data, box, settings.grid, order=1)
    intensity_map, mask = preparation.fit_intensity(data, contract_of(settings), reference)
    data = intensity_map(data)
    label_data = None
    if labels is not None:
        label_data = resample(labels.data, box, settings.grid, order=0)
    affine = np.asarray(image.affine, float) @ preparation.grid_map(box, settings.grid)
    points = None
    if settings.landmarks:
        path = find_landmarks(settings, subject.id)
        if path is None:
            fixes.append(f"{subject.id}: no landmark file in {settings.landmarks}; "
                         "landmarks set to null")
        else:
            points = landmarks_to_grid(io.read_landmarks(path), settings,
                                       image.affine, affine)
            outside = np.any((points < -0.5) | (points > np.array(settings.grid) - 0.5), axis=1)
            if outside.any():
                fixes.append(f"{subject.id}: {int(outside.sum())} landmark(s) fall outside "
                             "the cropped grid (kept, with out-of-grid coordinates)")
    return Prepared(data, label_data, affine, points), mask


def check_output_folder(settings):
    if os.path.exists(settings.output) and not os.path.isdir(settings.output):
        raise InputError(f"output {settings.output} exists and is not a folder")
    if os.path.isdir(settings.output) and os.listdir(settings.output) and not settings.overwrite:
        raise InputError(f"output folder {settings.output} is not empty; pass --overwrite "
                         "to write into it")
    parent = os.path.dirname(os.path.abspath(settings.output))
    while not os.path.exists(parent):  # missing parents are created too (like mkdir -p)
        parent = os.path.dirname(parent)
    if not os.path.isdir(settings.output) and not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        raise InputError(f"output folder {settings.output} cannot be created in {parent}")


def write_subject(subject_id, prepared, settings):
    """Write one prepared subject; returns its manifest paths (relative)."""
    entry = {"image": f"images/{subject_id}.nii.gz", "labels": None, "landmarks": None}
    io.write_volume(os.path.join(settings.output, entry["image"]),
                    prepared.image.astype(np.float32), prepared.affine, overwrite=True)
    if prepared.labels is not None:
        if prepared.labels.min() < -32768 or prepared.labels.max() > 32767:
            raise InputError(f"labels of {subject_id} hold ids beyond the int16 range")
        entry["labels"] = f"labels/{subject_id}.nii.gz"
        io.write_volume(os.path.join(settings.output, entry["labels"]),
                        prepared.labels.astype(np.int16), prepared.affine, overwrite=True)
    if prepared.landmarks is not None:
        entry["landmarks"] = f"landmarks/{subject_id}.csv"
        text = "x,y,z\n" + "".join(f"{x:.4f},{y:.4f},{z:.4f}\n" for x, y, z in prepared.landmarks)
        io.atomic_write_text(os.path.join(settings.output, entry["landmarks"]), text,
                             overwrite=True)
    return entry


def prepare_dataset(settings, log=print):
    """Run the whole pipeline; writes the output folder and returns the manifest dict."""
    settings, layout = resolve(settings)
    check_output_folder(settings)
    subjects = {s.id: s for s in discover(settings)}
    fixes = []
    splits = plan_splits(settings, sorted(subjects), fixes)
    order = list(dict.fromkeys(splits["train"] + splits["validation"] + splits["evaluation"]))
    created = _first_missing(settings.output)
    try:
        return _prepare_subjects(settings, layout, subjects, splits, order, fixes, log)
    except BaseException:
        if created:  # a failed run leaves no partial dataset behind (only what it created)
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(path):
    """The outermost folder of ``path`` that does not exist yet (None if ``path`` exists)."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def _prepare_subjects(settings, layout, subjects, splits, order, fixes, log):
    for folder in ("images", "labels") + (("landmarks",) if settings.landmarks else ()):
        os.makedirs(os.path.join(settings.output, folder), exist_ok=True)

    reference_id, reference = order[0], None
    entries, label_values = [], set()
    for subject_id in order:
        start = time.perf_counter()
        subject = subjects[subject_id]
        matching = reference if settings.histogram_matching else None
        prepared, mask = prepare_subject(subject, settings, fixes, reference=matching)
        if subject_id == reference_id:
            reference = preparation.reference_quantiles(prepared.image, mask)
        entry = {"id": subject_id, **write_subject(subject_id, prepared, settings)}
        entry["source"] = {"image": subject.image and os.path.abspath(subject.image),
                           "labels": subject.labels and os.path.abspath(subject.labels)}
        entry["spacing"] = [round(s, 6) for s in io.spacing_of(prepared.affine)]
        entries.append(entry)
        if prepared.labels is not None:
            label_values.update(int(v) for v in np.unique(prepared.labels) if v != 0)
        log(f"{subject_id}: {time.perf_counter() - start:.2f} s")

    manifest = build_manifest(settings, layout, entries, splits, sorted(label_values), fixes,
                              reference_id, reference)
    io.atomic_write_text(os.path.join(settings.output, "manifest.json"),
                         json.dumps(manifest, indent=2) + "\n", overwrite=True)
    for fix in fixes:
        log(f"fix: {fix}")
    return manifest


def build_manifest(settings, layout, entries, splits, label_values, fixes, reference_id, reference=None):
    manifest = {
        "format": io.MANIFEST_FORMAT,
        "name": layout.name,
        "synthetic": layout.synthetic,
    }
    if layout.synthetic:
        manifest["note"] = synthetic.NOTE
    manifest.update({
        "modality": settings.modality,
        "grid": list(settings.grid),
        "label_values": label_values,
    })
    if layout.label_names:
        present = {str(v) for v in label_values}
        manifest["label_names"] = {k: v for k, v in layout.label_names.items() if k in present}
    manifest.update({
        "atlas": layout.atlas if layout.atlas in {e["id"] for e in entries} else None,
        "subjects": entries,
        "splits": splits,
        "preparation": {
            "settings": {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(settings).items()},
            "fixes": fixes,
            "reference_subject": reference_id,
            "reference_quantiles": None if reference is None or not settings.histogram_matching
            else [round(float(q), 7) for q in reference],
        },
    })
    return manifest
