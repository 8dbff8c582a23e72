"""The completion record: what makes an output folder "complete, made with this model and
these settings", so that a batch run again skips it (``vtn-register --pairs``, resume).

``registration.json`` is written into the output folder **last**, after every output file is
in place (by a temporary file and a rename), and removed **first** before a folder is
written again; a process killed at any moment therefore leaves a folder either with a record
that tells the truth or without one. It holds::

    {"format": "vtn-tf-registration/1",
     "model": {"checkpoint": "ckpt-12", "sha256": "..."},   # model.json, preprocessing.json, weights index
     "settings": {...},                                      # everything that changes the outputs
     "inputs": {"fixed": ..., "moving": ..., "moving_labels": [...]},
     "outputs": ["warped.nii.gz", ...],
     "seconds": {"read": ..., "network": ..., ...}}

The model's identity is a hash of its contents, not its path: the same run directory copied to
another machine (a shard of a cohort) is the same model. A folder is complete when its record
reads, every listed output exists, and model, settings and inputs equal the expected ones
(:func:`status`).

This module does no tensor maths and imports no TensorFlow.
"""

import hashlib
import json
import os
import pathlib

from vtn_tf.io.staging import atomic_write_text

RECORD_NAME = "registration.json"
FORMAT = "vtn-tf-registration/1"
COMPLETE, ABSENT, INCOMPLETE, DIFFERENT = "complete", "absent", "incomplete", "different"


def model_identity(run_dir, checkpoint):
    """``{"checkpoint": name, "sha256": hex}`` of a run directory's model.

    Args:
      run_dir: the vtn-train run directory.
      checkpoint: the checkpoint prefix restored (``.../checkpoints/ckpt-12``).

    The hash covers ``model.json``, ``preprocessing.json`` (when present) and the checkpoint's
    ``.index`` file, which holds every weight tensor's checksum: another checkpoint, another
    architecture or another input contract give another hash.
    """
    digest = hashlib.sha256()
    checkpoint = os.fspath(checkpoint)
    for path in (pathlib.Path(run_dir) / "model.json", pathlib.Path(run_dir) / "preprocessing.json",
                 pathlib.Path(checkpoint + ".index")):
        digest.update(path.name.encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return {"checkpoint": os.path.basename(checkpoint), "sha256": digest.hexdigest()}


def _plain(value):
    """``value`` as JSON would give it back (tuples as lists), so records compare equal."""
    return json.loads(json.dumps(value, default=str))


def make_record(model, settings, inputs, outputs, seconds=None):
    """The record's dict. ``model``: :func:`model_identity`; ``settings``: a JSON-able dict of
    everything that changes the outputs; ``inputs``: the input paths; ``outputs``: file names."""
    return {"format": FORMAT, "model": _plain(model), "settings": _plain(settings), "inputs": _plain(inputs),
            "outputs": list(outputs), "seconds": _plain(seconds or {})}


def read_record(out):
    """The record in ``out``, or None when absent or unreadable."""
    try:
        record = json.loads((pathlib.Path(out) / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def clear(out):
    """Remove ``out``'s record before anything in ``out`` is rewritten."""
    try:
        os.remove(pathlib.Path(out) / RECORD_NAME)
    except FileNotFoundError:
        pass


def write(out, record):
    """Write the record into ``out`` (after every output), by a temporary file and a rename."""
    return atomic_write_text(pathlib.Path(out) / RECORD_NAME, json.dumps(record, indent=2) + "\n",
                                overwrite=True)


def recorded_state(out):
    """``(state, reason, record)`` of an output folder from its record alone: :data:`COMPLETE`
    when the record reads and every output it lists is there (made with whatever model)."""
    out = pathlib.Path(out)
    record = read_record(out)
    if record is None:
        if out.is_dir() and any(not name.startswith(".") for name in os.listdir(out)):
            return INCOMPLETE, "outputs without a completion record", None
        return ABSENT, "no outputs", None
    missing = [name for name in record.get("outputs", []) if not (out / name).is_file()]
    if missing:
        return INCOMPLETE, f"{missing[0]} is missing", record
    return COMPLETE, "complete", record


def status(out, model, settings, inputs):
    """``(state, reason)`` of an output folder against what would be written now.

    ``state`` is :data:`COMPLETE` (skip it), :data:`ABSENT` (no outputs and no record),
    :data:`INCOMPLETE` (outputs without a record, or a listed output missing: a run stopped
    part-way) or :data:`DIFFERENT` (made with another model, settings or inputs); ``reason``
    says which, in a few words.
    """
    state, reason, record = recorded_state(out)
    if state != COMPLETE:
        return state, reason
    if record.get("model", {}).get("sha256") != _plain(model).get("sha256"):
        return DIFFERENT, f"made with another model ({record.get('model', {}).get('checkpoint')})"
    for key, expected in (("settings", settings), ("inputs", inputs)):
        if record.get(key) != _plain(expected):
            return DIFFERENT, f"made with other {key} ({', '.join(_changed(record.get(key), _plain(expected)))})"
    return COMPLETE, "complete"


def _changed(recorded, expected, prefix=""):
    """The keys whose values differ, dotted into nested dicts (``network.passes``)."""
    if not (isinstance(recorded, dict) and isinstance(expected, dict)):
        return [prefix.rstrip(".") or "all"]
    keys = sorted(k for k in set(recorded) | set(expected) if recorded.get(k) != expected.get(k))
    return [name for k in keys for name in _changed(recorded.get(k), expected.get(k), f"{prefix}{k}.")]
