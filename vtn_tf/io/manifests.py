"""Prepared-dataset manifests (``vtn-tf-dataset/1``) and landmark files."""

import json
import os

import numpy as np

from vtn_tf.io.errors import InputError, error_line

MANIFEST_FORMAT = "vtn-tf-dataset/1"


def load_manifest(path):
    """Read and check a prepared-dataset manifest (format ``vtn-tf-dataset/1``).

    Returns the manifest dict, with every subject's ``image``, ``labels`` and ``landmarks``
    path made absolute (relative paths are relative to the manifest's folder). Raises
    InputError naming the manifest if the format is unknown, a key is missing, a split names
    an unknown subject or a listed file does not exist.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    name = f"manifest {path}"
    if not os.path.isfile(path):
        raise InputError(f"{name} does not exist")
    try:
        with open(path, encoding="utf-8") as stream:
            manifest = json.load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{name} is not valid JSON ({error_line(error)[:160]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise InputError(f"{name} has format {found!r}; expected {MANIFEST_FORMAT!r}")
    for key in ("name", "modality", "grid", "label_values", "subjects", "splits"):
        if key not in manifest:
            raise InputError(f"{name} has no {key!r} entry")
    root = os.path.dirname(os.path.abspath(path))
    ids = set()
    for subject in manifest["subjects"]:
        if "id" not in subject or "image" not in subject:
            raise InputError(f"{name} lists a subject without 'id' or 'image'")
        ids.add(subject["id"])
        for key in ("image", "labels", "landmarks"):
            if subject.get(key) is None:
                continue
            resolved = os.path.join(root, subject[key])
            if not os.path.isfile(resolved):
                raise InputError(f"{name}: {key} of subject {subject['id']} "
                                 f"({subject[key]}) does not exist")
            subject[key] = resolved
    for split, members in manifest["splits"].items():
        unknown = [m for m in members if m not in ids]
        if unknown:
            raise InputError(f"{name}: split {split!r} names unknown subject {unknown[0]!r}")
    return manifest


def read_landmarks(path):
    """``[N, 3]`` float64 point coordinates from a CSV/TXT file (one ``x, y, z`` per line).

    Comma, semicolon or space separated; blank lines, ``#`` comments and one header
    line are skipped. The coordinates' frame (voxels, RAS or LPS mm) is the caller's.
    """
    rows = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            fields = line.replace(",", " ").replace(";", " ").split()
            if not fields or line.lstrip().startswith("#"):
                continue
            try:
                values = [float(f) for f in fields]
            except ValueError:
                if rows:
                    raise InputError(f"landmarks {path} line {number} is not numeric") from None
                continue  # header
            if len(values) != 3:
                raise InputError(f"landmarks {path} line {number} has {len(values)} values; "
                                 "x, y, z are required")
            rows.append(values)
    if not rows:
        raise InputError(f"landmarks {path} holds no points")
    return np.array(rows)
