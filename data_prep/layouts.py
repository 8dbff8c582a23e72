"""Dataset layouts: where each subject's image and labels live, fixed splits, defaults.

A layout turns an input folder into a sorted list of :class:`Subject` and, for datasets
with published splits (/work/shared/data/README.md), names the evaluation and training ids.
"""

import dataclasses
import glob
import os
import re

from data_prep.synthetic import ORGANS
from vtn_tf.io import InputError

NIFTI_PATTERNS = ("*.nii.gz", "*.nii")


@dataclasses.dataclass
class Subject:
    id: str
    image: str | None  # None: synthesised from the labels
    labels: str | None


@dataclasses.dataclass
class Layout:
    """Per-dataset facts and defaults (command-line flags override the defaults)."""

    name: str
    modality: str | None
    grid: tuple = (128, 128, 128)
    crop: str = "labels"  # "labels", "foreground" or "none"
    crop_label: int | None = None
    label_names: dict | None = None
    atlas: str | None = None
    synthetic: bool = False


def _strip(name):
    for suffix in (".nii.gz", ".nii", ".mhd", ".mha", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _niftis(folder):
    files = []
    for pattern in NIFTI_PATTERNS:
        files += glob.glob(os.path.join(folder, pattern))
    return sorted(files)


def _require_folder(folder, what):
    if not os.path.isdir(folder):
        raise InputError(f"{what} folder {folder} does not exist")


def _pair_by_name(image_folder, label_folder):
    _require_folder(image_folder, "image")
    images = {_strip(os.path.basename(p)): p for p in _niftis(image_folder)}
    if not images:
        raise InputError(f"image folder {image_folder} holds no .nii or .nii.gz files")
    if label_folder is None:
        return [Subject(i, images[i], None) for i in sorted(images)]
    _require_folder(label_folder, "label")
    labels = {_strip(os.path.basename(p)): p for p in _niftis(label_folder)}
    subjects = []
    for subject_id in sorted(images):
        if subject_id not in labels:
            raise InputError(f"image {images[subject_id]} has no matching label file in "
                             f"{label_folder}")
        subjects.append(Subject(subject_id, images[subject_id], labels[subject_id]))
    return subjects


def _pair_by_pattern(folder, image_regex, label_formats, id_format):
    """Pair files named like ``image_regex`` (group 1 = number) with the first existing
    label file among ``label_formats`` (each formatted with that number)."""
    _require_folder(folder, "input")
    subjects = []
    for name in sorted(os.listdir(folder)):
        match = re.fullmatch(image_regex, name)
        if not match:
            continue
        number = match.group(1)
        candidates = [os.path.join(folder, f.format(number)) for f in label_formats]
        label = next((c for c in candidates if os.path.exists(c)), None)
        if label is None:
            raise InputError(f"image {os.path.join(folder, name)} has no matching label "
                             f"file {os.path.basename(candidates[0])}")
        subjects.append(Subject(id_format.format(number), os.path.join(folder, name), label))
    if not subjects:
        raise InputError(f"input folder {folder} holds no files named like {image_regex}")
    return sorted(subjects, key=lambda s: s.id)


def folder_subjects(input_dir, images=None, labels=None):
    images = images or os.path.join(input_dir, "images")
    if labels is None and os.path.isdir(os.path.join(input_dir, "labels")):
        labels = os.path.join(input_dir, "labels")
    return _pair_by_name(images, labels)


def lits_subjects(input_dir):
    return _pair_by_pattern(input_dir, r"volume-(\d+)\.nii(?:\.gz)?",
                            ("segmentation-{}.nii", "segmentation-{}.nii.gz"), "lits_{:0>3}")


def sliver07_subjects(input_dir):
    return _pair_by_pattern(input_dir, r"liver-orig(\d+)\.mhd", ("liver-seg{}.mhd",),
                            "sliver07_{}")


def lpba40_subjects(input_dir):
    return _pair_by_name(os.path.join(input_dir, "images"), os.path.join(input_dir, "labels"))


def hippocampus_subjects(input_dir):
    return _pair_by_name(os.path.join(input_dir, "images"), os.path.join(input_dir, "labels"))


def abdomen_subjects(input_dir):
    _require_folder(input_dir, "input")
    files = _niftis(input_dir)
    if not files:
        raise InputError(f"input folder {input_dir} holds no .nii.gz label maps")
    return [Subject(_strip(os.path.basename(p)), None, p) for p in files]


def lpba40_splits(ids):
    evaluation = [i for i in ids if i in {f"S{n:02d}" for n in range(1, 11)}]
    return [i for i in ids if i not in evaluation], evaluation


def hippocampus_splits(ids):
    ids = sorted(ids)
    return ids[:-40], ids[-40:]


def abdomen_splits(ids):
    evaluation = [i for i in ids if i.isdigit() and 1 <= int(i) <= 10]
    training = [i for i in ids if i.isdigit() and 21 <= int(i) <= 40]
    return training, evaluation


LAYOUTS = {
    "folder": Layout("folder", modality=None),
    "lits": Layout("lits", modality="CT", crop="foreground", label_names={"1": "liver", "2": "tumour"}),
    "sliver07": Layout("sliver07", modality="CT", crop="foreground", label_names={"1": "liver"}),
    "lpba40": Layout("lpba40", modality="MRI", crop="foreground", atlas="S01"),
    "hippocampus": Layout("hippocampus", modality="MRI", grid=(64, 64, 64), crop="none",
                          label_names={"1": "anterior", "2": "posterior"}),
    "abdomen-synthetic": Layout("abdomen-synthetic", modality="CT", crop="foreground",
                                synthetic=True,
                                label_names={str(k): v[0] for k, v in ORGANS.items()}),
}
READERS = {
    "lits": lits_subjects,
    "sliver07": sliver07_subjects,
    "lpba40": lpba40_subjects,
    "hippocampus": hippocampus_subjects,
    "abdomen-synthetic": abdomen_subjects,
}
# Published splits: ids -> (training ids, evaluation ids). Other layouts split by seed.
FIXED_SPLITS = {
    "lpba40": lpba40_splits,
    "hippocampus": hippocampus_splits,
    "abdomen-synthetic": abdomen_splits,
}
