"""The settings of a registration: one dataclass per stage with its defaults in one place, the
named presets, ``section.field=value`` overrides, and the record written beside the outputs.

A model's validated test-time schedule lives in the ``register`` section of its experiment
config (and so of its run's ``config.json``), in the words of :data:`REGISTER_KEYS`. The presets:

* ``accurate`` (the default): that schedule, as validated (initial alignment, test-time passes,
  refinement); a model whose config has none registers with the defaults below.
* ``fast``: the network alone: the schedule's alignment and passes, no refinement.
* ``optimiser``: ``accurate`` without the network (``passes`` 0): the initial alignment and the
  refinement alone, the no-network baseline.
"""

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from vtn_tf.io import InputError
from vtn_tf.nn.spec import PRECISIONS, check_ncc_window
from vtn_tf.preprocessing.alignment import MODES

INIT_STEPS = 50  # the affine search after the initialiser (`vtn_tf.registration.affine_search`)
INTENSITIES = ("auto", "mri", "ct", "none")
COMPRESSION_LEVELS = tuple(range(10))  # gzip level; 0 writes uncompressed .nii
SIMILARITIES = ("ncc", "cc")
PRESETS = ("accurate", "fast", "optimiser")
DEFAULT_PRESET = "accurate"
# "auto" refinement levels, coarse to fine, as multiples of the network grid's spacing
# (docs/results.md has the validation of the choice and of the defaults below).
AUTO_LEVELS = (1.5, 1.0, 0.75)


@dataclasses.dataclass
class AlignmentSettings:
    """The initial world-space alignment before the network (`vtn_tf.preprocessing.alignment`).

    Attributes:
      init: ``moments`` (centres of mass and principal axes), ``com`` (centres of mass),
        ``best`` (whichever of the two correlates better on the network grid) or ``none``
        (trust the headers: no alignment, no search).
      steps: Adam steps of the affine search after the initialiser (global correlation on the
        network grid, as the ANTs and elastix affine stages; 0: the initialiser alone).
    """

    init: str = "best"
    steps: int = INIT_STEPS

    def __post_init__(self) -> None:
        if self.init not in MODES:
            raise ValueError(f"alignment.init must be one of {', '.join(MODES)}; got {self.init!r}")
        if int(self.steps) < 0:
            raise ValueError(f"alignment.steps must be >= 0; got {self.steps}")


@dataclasses.dataclass
class NetworkSettings:
    """The network pass (`vtn_tf.registration.network`).

    Attributes:
      passes: test-time recursion: the cascade run this many times, each on the previous pass's
        warped image, composing the flows (1: the paper; 0: the network is not run).
      precision: the network's compute type (weights, flows and warps stay float32):
        ``bfloat16`` is faster on CPUs with AVX512_BF16 or AMX, ``float16`` on GPUs.
      intensity: the normalisation before the network: ``auto`` (the model's input contract),
        ``mri`` (percentile clip and rescale), ``ct`` (window 290 / level 120 HU), ``none``.
      finetune_steps: Adam steps fine-tuning the network's weights on the pair before its
        field is taken (`vtn_tf.registration.finetune`, uniGradICON's instance optimisation;
        the weights return to the trained ones for the next pair; 0: none).
      finetune_rate: Adam's rate for those steps.
    """

    passes: int = 1
    precision: str = "float32"
    intensity: str = "auto"
    finetune_steps: int = 0
    finetune_rate: float = 1e-4

    def __post_init__(self) -> None:
        if int(self.passes) < 0:
            raise ValueError(f"network.passes must be >= 0; got {self.passes}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"network.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"network.intensity must be one of {', '.join(INTENSITIES)}; got {self.intensity!r}")
        if int(self.finetune_steps) < 0 or float(self.finetune_rate) <= 0:
            raise ValueError(f"network fine-tuning needs steps >= 0 and a positive rate; got "
                             f"{self.finetune_steps} steps at {self.finetune_rate}")


@dataclasses.dataclass
class OutputSettings:
    """What is written (`vtn_tf.registration.outputs`).

    Attributes:
      inverse: also the moving -> fixed field on the moving grid and the fixed image (and its
        label maps) in the moving space.
      compression: gzip level of the NIfTI outputs, 0-9 (0 writes uncompressed ``.nii``).
      qc: the quality check (`vtn_tf.qc`): ``qc.png`` and ``qc.json`` beside the outputs, the
        figures printed, and with ``--pairs`` the cohort report (``report.html``, ``report.csv``)
        in the pairs file's folder; ``false`` leaves all of it out.
    """

    inverse: bool = False
    compression: int = 1
    qc: bool = True

    def __post_init__(self) -> None:
        if int(self.compression) not in COMPRESSION_LEVELS:
            raise ValueError(f"output.compression must be a gzip level 0-9 (0: uncompressed .nii); "
                             f"got {self.compression}")


@dataclasses.dataclass
class RefineSettings:
    """The refinement of the field on the pair (`vtn_tf.registration.refinement.refine_field`).

    Attributes:
      steps: Adam steps on each level (0: no refinement), or one count per level, coarse to
        fine (as ANTs' ``--convergence 100x70x50x20``; as many as the levels).
      seconds: optional time budget; the optimisation stops at whichever of ``steps`` and
        ``seconds`` comes first (checked every 10 steps).
      rate: Adam's rate, in voxels of the fixed grid per step.
      similarity: ``"ncc"`` (squared local correlation in ``window``^3 cubes of ``L``)
        or ``"cc"`` (the paper's global correlation coefficient).
      window: cube side in voxels of ``L`` (odd; ANTs' CC radius r is a side of 2r + 1).
      smoothness: weight of the TV term (voxels of ``L``, squared).
      folding: weight of the penalty on negative Jacobian determinants (forward differences
        on ``L``); 0: none (the default's validation: docs/results.md).
      resolution: ``L``'s voxel count per axis as a fraction of ``F``'s (0.5: half), a
        sequence of them, coarse to fine (the levels; ``steps`` on each), or ``"auto"``:
        levels at :data:`AUTO_LEVELS` times the network grid's spacing, never finer than
        ``F`` (:meth:`resolved`; on 1 mm LPBA40 brains and a 64^3 network grid: 1/4, 1/3,
        1/2; on 1 mm 64^3 crops with a 64^3 network grid: 1/2, 1).
      crop: refine only the fixed image's foreground box ``B`` (the module's notes).
      anneal: lower the rate on each level along a half cosine, ``rate (1 + cos(pi k / n)) / 2``
        at its step ``k`` of ``n`` (Adam's steps keep about the rate's size however small the
        gradient, so at a constant rate the last ones jitter the field around the optimum).
    """

    steps: int | tuple[int, ...] = 60
    seconds: float | None = None
    rate: float = 0.3
    similarity: str = "ncc"
    window: int = 5
    smoothness: float = 2.0
    folding: float = 3.0
    resolution: float | tuple[float, ...] | str = "auto"
    crop: bool = True
    anneal: bool = False

    def __post_init__(self):
        counts = self.steps if isinstance(self.steps, (tuple, list)) else (self.steps,)
        if not counts or any(int(n) < 0 for n in counts):
            raise ValueError(f"refine steps must be >= 0; got {self.steps}")
        if isinstance(self.steps, list):
            self.steps = tuple(int(n) for n in self.steps)
        if self.seconds is not None and float(self.seconds) <= 0:
            raise ValueError(f"refine seconds must be positive; got {self.seconds}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"refine similarity must be one of {SIMILARITIES}; got {self.similarity!r}")
        if float(self.rate) <= 0 or float(self.smoothness) < 0 or float(self.folding) < 0:
            raise ValueError("refine rate must be positive, smoothness and folding weights non-negative")
        check_ncc_window(self.window)
        if self.resolution == "auto":
            return
        levels = self._levels()
        if isinstance(self.steps, tuple) and len(self.steps) != len(levels):
            raise ValueError(f"refine steps {'x'.join(map(str, self.steps))} name {len(self.steps)} levels; "
                             f"the resolution {self.resolution} has {len(levels)}")
        if not levels or any(not 0.0 < float(r) <= 1.0 for r in levels):
            raise ValueError(f"refine resolution must be in (0, 1]; got {self.resolution}")
        if any(float(a) > float(b) for a, b in zip(levels, levels[1:])):
            raise ValueError(f"refine resolutions go coarse to fine; got {self.resolution}")

    def _levels(self):
        """The explicit resolutions as a tuple (one number counts as one level)."""
        return tuple(self.resolution) if isinstance(self.resolution, (tuple, list)) else (self.resolution,)

    def resolved(self, network_spacing):
        """These settings with ``"auto"`` levels made explicit.

        Args:
          network_spacing: the network grid's voxel size in voxels of ``F`` (per axis or one
            number; the mean over axes is used).
        """
        if self.resolution != "auto":
            return self
        ratio = float(np.mean(network_spacing))
        factors = sorted({max(1, int(round(c * ratio))) for c in AUTO_LEVELS}, reverse=True)
        steps = self.steps
        if isinstance(steps, tuple) and len(steps) != len(factors):  # counts for the finest levels
            if len(steps) < len(factors):
                raise ValueError(f"refine steps {'x'.join(map(str, steps))} name {len(steps)} levels; the auto "
                                 f"levels here are {len(factors)} ({', '.join(f'1/{f}' for f in factors)})")
            steps = steps[len(steps) - len(factors):]
        return dataclasses.replace(self, resolution=tuple(1.0 / f for f in factors), steps=steps)

    @property
    def level_steps(self):
        """The Adam steps of each level, coarse to fine (explicit levels only)."""
        if isinstance(self.steps, tuple):
            return self.steps
        return (int(self.steps),) * len(self.factors)

    @property
    def active(self):
        """Whether any level takes a step."""
        counts = self.steps if isinstance(self.steps, tuple) else (self.steps,)
        return any(int(n) > 0 for n in counts)

    @property
    def factors(self):
        """The coarsening factor of each level, coarse to fine (``round(1 / resolution)``)."""
        if self.resolution == "auto":
            raise ValueError("refine resolution 'auto' needs the network grid: RefineSettings.resolved")
        return tuple(max(1, int(round(1.0 / float(r)))) for r in self._levels())


def no_refinement() -> RefineSettings:
    return RefineSettings(steps=0)


@dataclasses.dataclass
class RegistrationSettings:
    """Everything a registration is told, by stage; the defaults are the dataclasses'.

    ``vtn-register --set section.field=value`` names a field here (:meth:`with_overrides`), and
    ``settings.json`` beside the outputs records it (:meth:`to_json`), so that a registration can
    be repeated exactly.
    """

    alignment: AlignmentSettings = dataclasses.field(default_factory=AlignmentSettings)
    network: NetworkSettings = dataclasses.field(default_factory=NetworkSettings)
    refine: RefineSettings = dataclasses.field(default_factory=no_refinement)
    output: OutputSettings = dataclasses.field(default_factory=OutputSettings)

    def to_json(self) -> dict[str, dict[str, Any]]:
        """The settings as JSON-ready sections (tuples as lists)."""
        return {section.name: {name: list(value) if isinstance(value, tuple) else value
                               for name, value in dataclasses.asdict(getattr(self, section.name)).items()}
                for section in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, record: Mapping[str, Mapping[str, Any]]) -> "RegistrationSettings":
        """The settings :meth:`to_json` recorded (``settings.json``)."""
        return cls().with_values({f"{section}.{name}": value for section, fields in record.items()
                                  for name, value in fields.items()})

    def with_values(self, values: Mapping[str, Any]) -> "RegistrationSettings":
        """These settings with ``{"section.field": value}`` replaced (values coerced to the
        field's type: ``refine.steps`` takes ``"60x60x20"``, ``refine.resolution`` ``"0.5,1"``)."""
        sections = {section.name: dataclasses.asdict(getattr(self, section.name))
                    for section in dataclasses.fields(self)}
        for key, value in values.items():
            section, _, name = key.partition(".")
            if section not in sections or name not in sections[section]:
                known = ", ".join(f"{s}.{n}" for s, fields in sections.items() for n in fields)
                raise ValueError(f"unknown setting {key!r}; known: {known}")
            sections[section][name] = coerce(key, value, sections[section][name])
        return RegistrationSettings(alignment=AlignmentSettings(**sections["alignment"]),
                                    network=NetworkSettings(**sections["network"]),
                                    refine=RefineSettings(**sections["refine"]),
                                    output=OutputSettings(**sections["output"]))

    def with_overrides(self, items: Iterable[str]) -> "RegistrationSettings":
        """These settings with ``["refine.rate=0.5", "network.passes=2", ...]`` applied in order
        (a value is read as JSON when it parses, else as text)."""
        values: dict[str, Any] = {}
        for item in items:
            key, sep, text = item.partition("=")
            if not sep or "." not in key:
                raise ValueError(f"--set {item!r} must look like section.field=value (e.g. refine.rate=0.5)")
            try:
                values[key.strip()] = json.loads(text)
            except json.JSONDecodeError:
                values[key.strip()] = text
        return self.with_values(values)


def parse_steps(text: Any) -> int | tuple[int, ...]:
    """Refinement steps: ``"60"`` -> 60 (on every level), ``"60x60x20"`` -> (60, 60, 20)."""
    if isinstance(text, (list, tuple)):
        counts = tuple(int(n) for n in text)
    else:
        try:
            counts = tuple(int(part) for part in str(text).replace(",", "x").split("x"))
        except ValueError:
            raise ValueError(f"refine steps take a count or counts per level such as 60x60x20; got {text!r}") from None
    if any(n < 0 for n in counts):
        raise ValueError(f"refine steps must be >= 0; got {text!r}")
    return counts[0] if len(counts) == 1 else counts


def parse_resolution(value: Any) -> float | tuple[float, ...] | str:
    """Refinement levels: ``"auto"``, a number, ``"0.25,0.5"`` or a list of numbers."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        levels = tuple(float(v) for v in parts)
    except ValueError:
        raise ValueError(f"refine resolution takes auto or numbers; got {value!r}") from None
    return levels[0] if len(levels) == 1 else levels


def coerce(key: str, value: Any, current: Any) -> Any:
    """``value`` as the type of the field ``key`` (whose current value is ``current``)."""
    if key == "refine.steps":
        return parse_steps(value)
    if key == "refine.resolution":
        return parse_resolution(value)
    if key == "refine.seconds":
        return None if value in (None, "", "none", "None") else float(value)
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ValueError(f"{key} takes true or false; got {value!r}")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError(f"{key} takes a whole number; got {value!r}")
        return int(float(value))
    if isinstance(current, float):
        return float(value)
    return str(value)


# The words of a config's ``register`` section (as the command-line flags had them) -> settings.
REGISTER_KEYS = {
    "init": "alignment.init", "init_steps": "alignment.steps", "passes": "network.passes",
    "refine": "refine.steps", "refine_resolution": "refine.resolution", "refine_rate": "refine.rate",
    "refine_anneal": "refine.anneal", "refine_smoothness": "refine.smoothness",
    "refine_folding": "refine.folding", "refine_similarity": "refine.similarity", "refine_window": "refine.window",
}
# What the ``fast`` preset keeps of a register section: the alignment and the passes.
FAST_KEYS = ("init", "init_steps", "passes")


def from_register_section(section: Mapping[str, Any], keys: Iterable[str] = tuple(REGISTER_KEYS),
                          base: RegistrationSettings | None = None) -> RegistrationSettings:
    """``base`` (default: the defaults) with the ``register`` section's ``keys`` that are not
    None (None: the default) applied."""
    unknown = sorted(set(section) - set(REGISTER_KEYS))
    if unknown:
        raise ValueError(f"register section names {unknown[0]!r}; known: {', '.join(REGISTER_KEYS)}")
    chosen = {REGISTER_KEYS[key]: section[key] for key in keys if section.get(key) is not None}
    return (base or RegistrationSettings()).with_values(chosen)


def preset(name: str, section: Mapping[str, Any]) -> RegistrationSettings:
    """The preset ``name`` (:data:`PRESETS`) for a model whose config's ``register`` section is
    ``section`` (empty: none)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {name!r}")
    if name == "fast":
        return from_register_section(section, FAST_KEYS)
    settings = from_register_section(section)
    if name == "optimiser":
        settings = dataclasses.replace(settings, network=dataclasses.replace(settings.network, passes=0))
    return settings


def register_section(run_dir: str | pathlib.Path) -> dict[str, Any]:
    """The ``register`` section of a run's ``config.json`` ({} when it has none or no config)."""
    path = pathlib.Path(run_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        section = json.loads(path.read_text()).get("register") or {}
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(f"{path} cannot be read for its register section: {error}") from None
    if not isinstance(section, dict):
        raise InputError(f"{path}: the register section must be an object")
    return section


def resolve(run_dir: str | pathlib.Path | None, name: str = DEFAULT_PRESET, overrides: Iterable[str] = (),
            log: Callable[[str], Any] | None = None) -> RegistrationSettings:
    """The settings of a registration with the model in ``run_dir``: the preset ``name`` for its
    config's ``register`` section, then the ``--set`` ``overrides``. InputError names the file or
    the override that cannot be used."""
    section = register_section(run_dir) if run_dir else {}
    try:
        settings = preset(name, section)
    except ValueError as error:
        raise InputError(f"--preset {name}: {run_dir}/config.json: {error}") from None
    try:
        settings = settings.with_overrides(overrides)
    except (ValueError, TypeError) as error:
        raise InputError(f"--set: {error}") from None
    if log is not None:
        chosen = {k: v for k, v in section.items() if v is not None}
        log(f"preset {name}" + (f" from {run_dir}/config.json's register section {json.dumps(chosen)}" if chosen
                                else " (the model's config recommends no test-time settings: the defaults)")
            + (f", then --set {' '.join(overrides)}" if overrides else ""))
    return settings
