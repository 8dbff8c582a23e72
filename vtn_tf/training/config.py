"""Experiment configuration: one JSON file per experiment in ``experiments/``.

A config has three sections for training, ``model`` (arguments of `vtn_tf.VTN`), ``data``
and ``train``, and one for after it, ``register``: the test-time settings chosen for models of
the config on validation pairs (the flags of ``vtn-register`` and ``vtn-evaluate`` without their
``--``, as a flag would take them; None: the flag's own default), which ``--recommended`` reads
from a run's ``config.json``. A file may start from another with ``"extends": "other.json"``
(relative to its own folder); its sections then override field by field. Any
field can be overridden from the command line as ``section.field=value`` (value
parsed as JSON, else taken as a string). Unknown sections or fields are errors:
a typo never silently falls back to a default.

Paper defaults live here and in ``experiments/paper-*.json``, nowhere else.
"""

import copy
import json
import pathlib

from vtn_tf.io.errors import InputError
from vtn_tf.nn.spec import MODEL_DEFAULTS, parse_spec

DEFAULTS = {
    "model": dict(MODEL_DEFAULTS),
    "data": {
        "manifest": None,             # prepared dataset (data_prep's manifest.json)
        "pair_mode": "pairwise",      # "pairwise": all ordered pairs; "atlas": atlas fixed
        "atlas": None,                # subject id of the atlas (atlas mode)
        "augment": True,              # random cubic B-spline field on the moving image
        "control_points": 5,
        "max_displacement": 12.0,     # voxels
        "affine_augment": False,      # also a random affine on the moving image (not in the paper)
        "rotation_degrees": 15.0,     # about each axis, uniform in ±
        "scale": 0.1,                 # relative, per axis: factors in 1 ± scale
        "shear": 0.05,                # shear coefficients, uniform in ±
        "translation_mm": 20.0,       # per axis, uniform in ±
        "validation_pairs": 8,        # validation pairs scored for Dice during training
    },
    "train": {
        "batch_size": 8,
        "learning_rate": 1e-4,
        "steps_per_epoch": 20000,
        "epochs": 5,
        "halve_after_epoch": 4,       # the rate halves every epoch after this one
        "checkpoint_every": 1000,     # steps
        "validate_every": 1000,       # steps
        "log_every": 50,              # steps between TensorBoard scalar writes
        "keep_checkpoints": 3,
        "seed": 0,
        "mixed_precision": False,     # float16 compute on GPUs; losses and warps stay float32
        "distribute": "auto",         # "auto", "none", "mirrored", "multiworker"
        "on_nonfinite": "stop",       # "stop" or "skip" a batch whose loss is NaN/Inf
        "init_from": None,            # a run directory: start from its weights where the layers match
    },
    "register": {name: None for name in (
        "init", "init_steps", "passes", "refine", "refine_resolution", "refine_rate", "refine_anneal",
        "refine_smoothness", "refine_folding", "refine_similarity", "refine_window")},
}
# Sections that do not change what training computes: a run may be resumed with other values.
TEST_TIME = ("register",)


class ConfigError(InputError):
    """A config file or override that cannot be used."""


def _merge(base, update, where):
    merged = copy.deepcopy(base)
    for section, fields in update.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{where}: unknown section {section!r}; expected one of {sorted(DEFAULTS)}.")
        if not isinstance(fields, dict):
            raise ConfigError(f"{where}: section {section!r} must be an object.")
        for field, value in fields.items():
            if field not in DEFAULTS[section]:
                raise ConfigError(f"{where}: unknown field {section}.{field}; "
                                  f"known: {', '.join(sorted(DEFAULTS[section]))}.")
            merged[section][field] = value
    return merged


def read_config_file(path, _seen=()):
    """Read a JSON config (following ``extends``) merged over `DEFAULTS`."""
    path = pathlib.Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'extends' loops back on itself.")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config {path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config {path} is not valid JSON: {error}.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must hold a JSON object.")
    base = DEFAULTS
    parent = raw.pop("extends", None)
    raw.pop("description", None)
    if parent:
        base = read_config_file(path.parent / parent, _seen + (path.resolve(),))
    return _merge(base, raw, str(path))


def apply_overrides(config, overrides):
    """Apply ``["train.batch_size=4", "model.spec=ADD", ...]``."""
    for item in overrides or ():
        key, sep, text = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r} must look like section.field=value.")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        config = _merge(config, {section: {field: value}}, f"override {item!r}")
    return config


def load_config(path=None, overrides=()):
    """The effective config: defaults, then the file, then the overrides."""
    config = read_config_file(path) if path else copy.deepcopy(DEFAULTS)
    config = apply_overrides(config, overrides)
    validate(config)
    return config


def validate(config):
    train, data = config["train"], config["data"]
    if train["init_from"] is not None and not isinstance(train["init_from"], str):
        raise ConfigError(f"train.init_from must be a run directory's path or null; got {train['init_from']!r}.")
    for field in ("batch_size", "steps_per_epoch", "epochs", "checkpoint_every", "validate_every", "log_every"):
        if not isinstance(train[field], int) or train[field] <= 0:
            raise ConfigError(f"train.{field} must be a positive integer; got {train[field]!r}.")
    if train["distribute"] not in ("auto", "none", "mirrored", "multiworker"):
        raise ConfigError(f"train.distribute must be auto, none, mirrored or multiworker; got {train['distribute']!r}.")
    if train["on_nonfinite"] not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be 'stop' or 'skip'; got {train['on_nonfinite']!r}.")
    if data["pair_mode"] not in ("pairwise", "atlas"):
        raise ConfigError(f"data.pair_mode must be 'pairwise' or 'atlas'; got {data['pair_mode']!r}.")
    if data["pair_mode"] == "atlas" and not data["atlas"]:
        raise ConfigError("data.pair_mode is 'atlas' but data.atlas names no subject.")
    if not isinstance(data["affine_augment"], bool):
        raise ConfigError(f"data.affine_augment must be true or false; got {data['affine_augment']!r}.")
    from vtn_tf.preprocessing.augment import (  # TensorFlow: only when validating
        AFFINE_RANGES,
        check_affine_ranges,
    )

    try:
        check_affine_ranges(**{field: data[field] for field in AFFINE_RANGES})
    except ValueError as error:
        raise ConfigError(f"data.{error}") from None
    try:
        parse_spec(config["model"]["spec"])
    except ValueError as error:
        raise ConfigError(f"model.spec: {error}") from None


def learning_rate_at(config, step):
    """The paper's schedule: constant, then halved every epoch after ``halve_after_epoch``.

    Args:
      config: a config (only its ``train`` section's ``learning_rate``, ``steps_per_epoch``
        and ``halve_after_epoch`` are read).
      step: optimizer steps taken so far (0 = the first batch), an int or a floating-point
        tensor (the Keras schedule `vtn_tf.training.loop.PaperSchedule` passes one).
    Returns:
      the learning rate for that step (epochs count from 1).
    """
    train = config["train"]
    epoch = step // train["steps_per_epoch"] + 1
    excess = epoch - train["halve_after_epoch"]
    halvings = (excess + abs(excess)) // 2  # max(0, excess), also for tensors
    return train["learning_rate"] * 0.5 ** halvings
