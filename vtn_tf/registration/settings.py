"""The settings of a registration: one dataclass per stage with its defaults in one place, named
presets, ``section.field=value`` overrides, and the record written beside the outputs."""

import dataclasses

import numpy as np

from vtn_tf.nn import losses

INIT_STEPS = 50  # the affine search after the initialiser (`vtn_tf.registration.affine_search`)


SIMILARITIES = ("ncc", "cc")


# "auto" refinement levels, coarse to fine, as multiples of the network grid's spacing, and the
# defaults below: chosen on the LPBA40 validation pairs S19 <- S25, S28, S33 (`make train-brain`
# model: one level at half resolution, 100 steps at rate 0.1, 0.689; 1/4, 1/3, 1/2 at 60 steps
# each, rate 0.3: 0.707 in a quarter of the time) and on hippocampus validation and training
# pairs (`make train-hippocampus` model), where smoothness 1 folded 2 % of the voxels and 2 kept
# it to 0.3 % (LPBA40: 0.704, folding 0.001 %). docs/results.md has the tables.
AUTO_LEVELS = (1.5, 1.0, 0.75)


@dataclasses.dataclass
class RefineSettings:
    """Options of :func:`refine_field` (the ``--refine*`` flags).

    Attributes:
      steps: Adam steps on each level (0: no refinement), or one count per level, coarse to
        fine (as ANTs' ``--convergence 100x70x50x20``; as many as the levels).
      seconds: optional time budget; the optimisation stops at whichever of ``steps`` and
        ``seconds`` comes first (checked every 10 steps).
      learning_rate: Adam's rate, in voxels of the fixed grid per step.
      similarity: ``"ncc"`` (squared local correlation in ``ncc_window``^3 cubes of ``L``)
        or ``"cc"`` (the paper's global correlation coefficient).
      ncc_window: cube side in voxels of ``L`` (odd).
      smoothness: weight of the TV term (voxels of ``L``, squared).
      folding: weight of the penalty on negative Jacobian determinants (forward differences
        on ``L``); 0: none. The default, 3, cut folding 3-5 times at the same Dice on the
        validation pairs of LPBA40 and the hippocampus crops (docs/results.md).
      resolution: ``L``'s voxel count per axis as a fraction of ``F``'s (0.5: half), a
        sequence of them, coarse to fine (the levels; ``steps`` on each), or ``"auto"``:
        levels at :data:`AUTO_LEVELS` times the network grid's spacing, never finer than
        ``F`` (:meth:`resolved`; on 1 mm LPBA40 brains and a 64^3 network grid: 1/4, 1/3,
        1/2; on 1 mm 64^3 crops with a 64^3 network grid: 1/2, 1).
      network_steps: Adam steps fine-tuning the network's weights on the pair before its
        field is taken (:func:`finetuned`, uniGradICON's instance optimisation; 0: none).
      network_rate: Adam's rate for those steps.
      crop: refine only the fixed image's foreground box ``B`` (the module's notes).
      anneal: lower the rate on each level along a half cosine, ``rate (1 + cos(pi k / n)) / 2``
        at its step ``k`` of ``n`` (Adam's steps keep about the rate's size however small the
        gradient, so at a constant rate the last ones jitter the field around the optimum).
    """

    steps: int | tuple = 60
    seconds: float | None = None
    learning_rate: float = 0.3
    similarity: str = "ncc"
    ncc_window: int = 5
    smoothness: float = 2.0
    folding: float = 3.0
    resolution: float | tuple | str = "auto"
    network_steps: int = 0
    network_rate: float = 1e-4
    crop: bool = True
    anneal: bool = False

    def __post_init__(self):
        counts = self.steps if isinstance(self.steps, (tuple, list)) else (self.steps,)
        if not counts or any(int(n) < 0 for n in counts):
            raise ValueError(f"refine steps must be >= 0; got {self.steps}")
        if isinstance(self.steps, list):
            self.steps = tuple(int(n) for n in self.steps)
        if int(self.network_steps) < 0 or float(self.network_rate) <= 0:
            raise ValueError(f"network fine-tuning needs steps >= 0 and a positive rate; got "
                             f"{self.network_steps} steps at {self.network_rate}")
        if self.seconds is not None and float(self.seconds) <= 0:
            raise ValueError(f"refine seconds must be positive; got {self.seconds}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"refine similarity must be one of {SIMILARITIES}; got {self.similarity!r}")
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
        if float(self.learning_rate) <= 0 or float(self.smoothness) < 0 or float(self.folding) < 0:
            raise ValueError("refine learning rate must be positive, smoothness and folding weights non-negative")
        losses.check_ncc_window(self.ncc_window)

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
