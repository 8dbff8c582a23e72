"""Prepared datasets in memory, registration pairs, and deterministic ``tf.data`` pipelines.

A prepared dataset is a folder with ``manifest.json`` (format ``vtn-tf-dataset/1``, written
by ``data_prep``) and NIfTI images and label maps on one common grid.

Shapes and dtypes:

* ``PreparedDataset.images[id]``: ``[X, Y, Z]`` float32 numpy (intensities in [0, 1]);
  ``labels[id]``: ``[X, Y, Z]`` int32 numpy, or None where the subject has none.
* :func:`pair_dataset` and :func:`evaluation_batches` yield dicts
  ``{"fixed": [B, X, Y, Z, 1] float32, "moving": [B, X, Y, Z, 1] float32}`` plus, when
  labels are asked for, ``"fixed_labels"`` and ``"moving_labels"`` ``[B, X, Y, Z, 1]`` int32.
  Pairs are ``(fixed_id, moving_id)``; only the moving image (and its labels) is augmented.

Determinism: :func:`pair_dataset` is ``Dataset.range(start_step, 2**62).map(make_batch)``
where batch k draws its pairs and its augmentation fields from stateless generators seeded
with ``(seed, k)`` only. The same seed gives the same stream on any run, independent of
threading and prefetching, and training resumed at step S uses
``pair_dataset(..., start_step=S)`` to see exactly the batches it would have seen.

Memory: every loaded volume is held in memory (numpy, then once more as one tensor
``[N, X, Y, Z, 1]`` per pipeline): 180 subjects at 64^3 are 180 · 64^3 · 4 B ≈ 190 MB of
float32 (another 190 MB for int32 labels); at 128^3 multiply by 8.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from vtn_tf import io
from vtn_tf.preprocessing import preparation
from vtn_tf.preprocessing.augment import augment_moving, check_affine_ranges

PAIR_MODES = ("pairwise", "atlas")
EVALUATION_MODES = ("pairwise", "consecutive", "atlas")


@dataclasses.dataclass
class PreparedDataset:
    """Subjects of a prepared dataset, loaded into memory.

    Attributes:
      manifest_path: the manifest file read.
      name, modality: from the manifest.
      synthetic: whether the data are synthetic.
      grid: ``(X, Y, Z)`` voxels, shared by every volume.
      label_values: the label ids in use (background included if the manifest lists it).
      atlas: the manifest's atlas id, or None.
      splits: the manifest's full split lists ``{name: [ids]}`` (loaded or not).
      loaded_splits: names of the splits that were loaded.
      subjects: ``{id: manifest entry}`` of the loaded subjects (absolute paths, and
        ``spacing``, the voxel size in mm per array axis: the manifest's, else the image
        header's).
      images: ``{id: [X, Y, Z] float32}``.
      labels: ``{id: [X, Y, Z] int32 or None}``.
    """

    manifest_path: str
    name: str
    modality: str
    synthetic: bool
    grid: tuple
    label_values: list
    atlas: object
    splits: dict
    loaded_splits: tuple
    subjects: dict
    images: dict
    labels: dict

    @property
    def has_labels(self):
        """Whether every loaded subject has a label map."""
        return bool(self.labels) and all(v is not None for v in self.labels.values())

    def ids(self, split):
        """Subject ids of a loaded split, in manifest order."""
        if split not in self.loaded_splits:
            raise ValueError(f"split {split!r} of manifest {self.manifest_path} was not loaded "
                             f"(loaded: {', '.join(self.loaded_splits) or 'none'}); pass it "
                             "to load_prepared(splits=...)")
        return list(self.splits[split])


def load_prepared(manifest_path, splits=("train", "validation"), extra_subjects=()):
    """Load every subject of the requested splits (and the atlas) into memory.

    Args:
      manifest_path: ``manifest.json`` of a prepared dataset, or its folder.
      splits: split names to load.
      extra_subjects: further subject ids to load (e.g. an atlas from another split).
        The manifest's own ``atlas`` is always loaded when it has one.
    Returns:
      :class:`PreparedDataset`.
    Raises:
      io.InputError (a ValueError) naming the manifest: unknown split, missing or
      unreadable file, a volume whose grid differs from the manifest's ``grid``, labels
      that do not match their image.
    """
    manifest = io.load_manifest(manifest_path)
    path = os.fspath(manifest_path)
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    where = f"manifest {path}"
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    for split in splits:
        if split not in manifest["splits"]:
            raise io.InputError(f"{where} has no split {split!r} "
                                f"(it has: {', '.join(manifest['splits']) or 'none'})")
    entries = {subject["id"]: subject for subject in manifest["subjects"]}
    wanted = [i for split in splits for i in manifest["splits"][split]]
    wanted += list(extra_subjects)
    if manifest.get("atlas") is not None:
        wanted.append(manifest["atlas"])
    wanted = list(dict.fromkeys(wanted))  # unique, order kept
    unknown = [i for i in wanted if i not in entries]
    if unknown:
        raise io.InputError(f"{where} has no subject {unknown[0]!r}")
    grid = tuple(int(n) for n in manifest["grid"])
    images, labels = {}, {}
    for subject_id in wanted:
        images[subject_id], labels[subject_id], spacing = _read_subject(
            entries[subject_id], grid, where)
        if entries[subject_id].get("spacing") is None:  # not in the manifest: the header's
            entries[subject_id]["spacing"] = [float(s) for s in spacing]
    return PreparedDataset(
        manifest_path=path, name=manifest["name"], modality=manifest["modality"],
        synthetic=bool(manifest.get("synthetic", False)), grid=grid,
        label_values=list(manifest["label_values"]), atlas=manifest.get("atlas"),
        splits={k: list(v) for k, v in manifest["splits"].items()}, loaded_splits=splits,
        subjects={i: entries[i] for i in wanted}, images=images, labels=labels)


def _read_subject(entry, grid, where):
    """Image float32, labels int32 (or None) and the image's voxel spacing (mm) of one
    manifest entry, checked against grid."""
    subject_id = entry["id"]
    image = io.read_volume(entry["image"], role=f"image of subject {subject_id}")
    _check_grid(image.data.shape, grid, entry["image"], where)
    labels = None
    if entry.get("labels") is not None:
        labels = io.read_labels(entry["labels"], reference=image,
                                role=f"labels of subject {subject_id}").data
    return np.ascontiguousarray(image.data, np.float32), labels, image.spacing


def _check_grid(shape, grid, file, where):
    if tuple(shape) != grid:
        found = "x".join(map(str, shape))
        expected = "x".join(map(str, grid))
        raise io.InputError(f"{where}: {os.path.basename(file)} has grid {found}; "
                            f"the manifest's grid is {expected}")


def training_pairs(dataset, split="train", mode="pairwise", atlas=None):
    """Ordered ``(fixed_id, moving_id)`` training pairs of one loaded split.

    Args:
      dataset: :class:`PreparedDataset`.
      split: the split the subjects come from.
      mode: ``"pairwise"``: every ordered pair of distinct subjects, n(n-1) pairs;
        ``"atlas"``: the atlas fixed against every other subject of the split.
      atlas: atlas id for ``"atlas"`` mode (default: the manifest's); it may belong to any
        split, but must be loaded.
    Returns:
      list of ``(fixed_id, moving_id)``.
    """
    ids = dataset.ids(split)
    if mode == "pairwise":
        pairs = [(fixed, moving) for fixed in ids for moving in ids if fixed != moving]
    elif mode == "atlas":
        atlas = _atlas(dataset, atlas)
        pairs = [(atlas, moving) for moving in ids if moving != atlas]
    else:
        raise ValueError(f"mode must be one of {PAIR_MODES}; got {mode!r}.")
    if not pairs:
        raise io.InputError(f"split {split!r} of manifest {dataset.manifest_path} gives no "
                         f"{mode} pairs ({len(ids)} subjects)")
    return pairs


def _atlas(dataset, atlas):
    atlas = dataset.atlas if atlas is None else atlas
    if atlas is None:
        raise io.InputError(f"atlas mode needs an atlas: manifest {dataset.manifest_path} names "
                         "none, so pass atlas=<subject id>")
    if atlas not in dataset.images:
        raise io.InputError(f"atlas {atlas!r} is not loaded from manifest {dataset.manifest_path}; "
                         "pass it to load_prepared(extra_subjects=...)")
    return atlas


def evaluation_pairs(ids, mode="pairwise", atlas=None, max_pairs=None):
    """Deterministic ``(fixed_id, moving_id)`` pairs for validation or evaluation.

    Args:
      ids: subject ids.
      mode: ``"consecutive"``: sorted ids paired (2k fixed, 2k+1 moving), an odd last id
        left out; ``"atlas"``: ``atlas`` fixed, every other id (in the given order) moving;
        ``"pairwise"``: every ordered pair of distinct ids, in the given order.
      atlas: the atlas id for ``"atlas"`` mode.
      max_pairs: keep only the first ``max_pairs`` pairs (None: all).
    Returns:
      list of ``(fixed_id, moving_id)``.
    """
    ids = list(ids)
    if mode == "consecutive":
        ordered = sorted(ids)
        pairs = list(zip(ordered[0::2], ordered[1::2]))
    elif mode == "atlas":
        if atlas is None:
            raise ValueError("atlas mode needs atlas=<subject id>.")
        pairs = [(atlas, moving) for moving in ids if moving != atlas]
    elif mode == "pairwise":
        pairs = [(fixed, moving) for fixed in ids for moving in ids if fixed != moving]
    else:
        raise ValueError(f"mode must be one of {EVALUATION_MODES}; got {mode!r}.")
    return pairs if max_pairs is None else pairs[:int(max_pairs)]


def _stack(dataset, pairs, include_labels):
    """Volumes of every subject in ``pairs`` as tensors, and the pairs as index tensors."""
    if not pairs:
        raise ValueError("no pairs given.")
    ids = sorted({i for pair in pairs for i in pair})
    missing = [i for i in ids if i not in dataset.images]
    if missing:
        raise ValueError(f"subject {missing[0]!r} is not loaded from manifest "
                         f"{dataset.manifest_path}")
    index = {subject_id: k for k, subject_id in enumerate(ids)}
    images = tf.constant(np.stack([dataset.images[i] for i in ids])[..., None])
    labels = None
    if include_labels:
        unlabelled = [i for i in ids if dataset.labels.get(i) is None]
        if unlabelled:
            raise ValueError(f"subject {unlabelled[0]!r} of manifest {dataset.manifest_path} "
                             "has no labels; pass include_labels=False")
        labels = tf.constant(np.stack([dataset.labels[i] for i in ids])[..., None])
    fixed = tf.constant([index[f] for f, _ in pairs], tf.int32)
    moving = tf.constant([index[m] for _, m in pairs], tf.int32)
    return images, labels, fixed, moving


def _batch(images, labels, fixed_index, moving_index):
    batch = {"fixed": tf.gather(images, fixed_index), "moving": tf.gather(images, moving_index)}
    if labels is not None:
        batch["fixed_labels"] = tf.gather(labels, fixed_index)
        batch["moving_labels"] = tf.gather(labels, moving_index)
    return batch


def pair_dataset(dataset, pairs, batch_size, seed=0, start_step=0, augment=True,
                 include_labels=False, max_displacement=12.0, control_points=5,
                 rotation_degrees=0.0, scale=0.0, shear=0.0, translation_mm=0.0, one_hot=None):
    """Infinite stream of training batches; batch k depends only on ``(seed, k)``.

    Pairs are drawn uniformly with replacement from ``pairs``; with ``augment`` the moving
    image (and its labels) of each pair is deformed by its own random field
    (:func:`vtn_tf.preprocessing.augment.augment_moving`): a cubic B-spline field, then, when an affine
    range is non-zero, a random affine drawn in millimetres with the **moving subject's**
    voxel spacing (``dataset.subjects[id]["spacing"]``). The image and labels are
    resampled once. The fixed image is never augmented.

    Args:
      dataset: :class:`PreparedDataset` holding every subject named in ``pairs``.
      pairs: list of ``(fixed_id, moving_id)``.
      batch_size: pairs per batch (B).
      seed: integer; the stream is a function of it.
      start_step: index k of the first batch yielded (resume training at step S with S).
      augment: apply the random spatial augmentation (B-spline and affine).
      include_labels: add ``"fixed_labels"`` and ``"moving_labels"`` (int32).
      max_displacement: augmentation bound per flow component, voxels.
      control_points: augmentation lattice points per axis.
      rotation_degrees, scale, shear, translation_mm: affine ranges (degrees about each
        axis, relative scale fraction, shear coefficient, mm along each axis), as in
        :func:`vtn_tf.preprocessing.augment.random_affine_parameters`; all 0 (the default): no affine,
        the stream is exactly the B-spline-only one.
      one_hot: None, or the label values to keep (foreground structures): with
        ``include_labels``, the labels (after augmentation) become float32 one-hot maps
        ``[B, X, Y, Z, K]``, channel k for ``one_hot[k]`` (`one_hot_labels`), as the
        ``label_dice`` training loss takes them.
    Returns:
      ``tf.data.Dataset`` of dicts with static shapes ``[B, X, Y, Z, 1]`` (see module notes;
      ``[B, X, Y, Z, K]`` for one-hot labels).
    """
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1; got {batch_size}.")
    if one_hot is not None and not include_labels:
        raise ValueError("one_hot labels need include_labels=True.")
    images, labels, fixed, moving = _stack(dataset, pairs, include_labels)
    count = len(pairs)
    seed = tf.constant(int(seed), tf.int64)
    shape = [batch_size, *dataset.grid, 1]
    affine = dict(rotation_degrees=rotation_degrees, scale=scale, shear=shear,
                  translation_mm=translation_mm)
    check_affine_ranges(**affine)
    moving_spacing = None
    if augment and any(value != 0 for value in affine.values()):
        moving_spacing = tf.constant([_spacing(dataset, m) for _, m in pairs], tf.float64)

    def make_batch(step):
        pair_seed, augment_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.stack([seed, step]), 2))
        choice = tf.random.stateless_uniform([batch_size], pair_seed, minval=0, maxval=count,
                                             dtype=tf.int32)
        batch = _batch(images, labels, tf.gather(fixed, choice), tf.gather(moving, choice))
        if augment:
            spacing = None if moving_spacing is None else tf.gather(moving_spacing, choice)
            batch["moving"], moved_labels = augment_moving(
                batch["moving"], batch.get("moving_labels"), augment_seed,
                control_points=control_points, max_displacement=max_displacement,
                spacing=spacing, **affine)
            if moved_labels is not None:
                batch["moving_labels"] = moved_labels
        for tensor in batch.values():
            tensor.set_shape(shape)
        if one_hot is not None:
            for name in ("fixed_labels", "moving_labels"):
                batch[name] = one_hot_labels(batch[name], one_hot)
        return batch

    steps = tf.data.Dataset.range(int(start_step), 2**62)
    return steps.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=True).prefetch(tf.data.AUTOTUNE)


def one_hot_labels(labels, values):
    """``[..., 1]`` integer label maps → ``[..., K]`` float32 one-hot maps, channel k being
    1 where the label is ``values[k]``; a voxel of any other value (background, stray ids)
    is 0 in every channel."""
    values = [int(v) for v in values]
    if not values:
        raise ValueError("one_hot_labels needs at least one label value.")
    labels = tf.cast(labels[..., 0], tf.int32)
    low, high = min(values), max(values)
    table = np.full(high - low + 1, -1, np.int32)
    table[np.asarray(values) - low] = np.arange(len(values), dtype=np.int32)
    inside = (labels >= low) & (labels <= high)
    index = tf.where(inside, tf.gather(tf.constant(table), tf.clip_by_value(labels - low, 0, high - low)), -1)
    return tf.one_hot(index, len(values), dtype=tf.float32)


def foreground_values(label_values):
    """The label values of a dataset without the background (0)."""
    return [int(v) for v in label_values if int(v) != 0]


def _spacing(dataset, subject_id):
    """Voxel size in mm per array axis of a loaded subject (see ``PreparedDataset.subjects``)."""
    spacing = dataset.subjects[subject_id].get("spacing")
    if spacing is None or len(spacing) != 3:
        raise ValueError(f"subject {subject_id!r} of manifest {dataset.manifest_path} has no "
                         "3-element 'spacing'; the affine augmentation needs its voxel size")
    return [float(s) for s in spacing]


def evaluation_batches(dataset, pairs, include_labels=True):
    """Finite, unaugmented batches of one pair each, in the order of ``pairs``.

    Batch i is ``pairs[i]``: dicts as in the module notes with B = 1 (labels when
    ``include_labels``; every subject must then have labels).
    """
    images, labels, fixed, moving = _stack(dataset, pairs, include_labels)
    shape = [1, *dataset.grid, 1]

    def make_batch(fixed_index, moving_index):
        batch = _batch(images, labels, fixed_index[None], moving_index[None])
        for tensor in batch.values():
            tensor.set_shape(shape)
        return batch

    return tf.data.Dataset.from_tensor_slices((fixed, moving)).map(make_batch).prefetch(
        tf.data.AUTOTUNE)


def input_contract(manifest_path):
    """The :class:`vtn_tf.preprocessing.preparation.InputContract` of a prepared dataset: how its volumes
    were cropped, resampled and normalised, so new scans can follow the same steps.

    The histogram-matching reference comes from the manifest (``preparation.
    reference_quantiles``) or, for manifests without it, from the reference subject's
    prepared image (it is the unmatched reference, so its quantiles are reproducible).
    Raises ValueError when the volumes were cropped around labels (no new scan has them).
    """
    manifest = io.load_manifest(manifest_path)
    recorded = manifest.get("preparation") or {}
    settings = dict(recorded.get("settings") or {})
    settings.setdefault("modality", manifest.get("modality"))
    reference = recorded.get("reference_quantiles")
    if reference is None and settings.get("histogram_matching", True) and preparation.get("reference_subject"):
        entry = next(s for s in manifest["subjects"] if s["id"] == preparation["reference_subject"])
        image = io.read_volume(entry["image"], "reference image")
        scaled = image.data.astype(np.float32)
        mask = (scaled > 0) & (scaled < 1) if settings["modality"] == "CT" else \
            scaled > float(settings.get("foreground_threshold", 0.1))
        reference = preparation.reference_quantiles(scaled, mask)
    return preparation.contract_from_settings(settings, manifest["grid"], reference)
