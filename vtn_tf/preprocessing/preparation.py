"""The input contract of a model: how its training volumes were made, applied to new scans.

`data_prep` prepares every training subject with these functions, and registration applies
them to new scans, so the two cannot drift apart. A model's :class:`InputContract` is
stored in its run directory (``preprocessing.json``) and in an exported SavedModel.

Per volume (the same steps in both places):

1. **Crop box** on the volume's own grid (:func:`crop_box`): around the intensity
   foreground (percentile-scaled intensity above ``foreground_threshold``), widened by
   ``margin_mm``, or the whole volume (``"none"``). Never around labels at registration.
2. **Grid map** (:func:`grid_map`): the box resampled onto the network grid with voxel
   *cells* aligned at the box edges: new index ``j`` sits at old index
   ``low + s * j + (s - 1) / 2``, ``s = box_size / grid``; the new affine is
   ``old_affine @ grid_map``.
3. **Intensities** (:class:`IntensityMap`), fitted on the volume resampled onto the grid:
   CT window/level (width, level in HU) or MRI clipping to the volume's own percentiles,
   both to [0, 1], then histogram matching of the foreground to the contract's reference
   quantiles (the first training subject's). The map is pointwise and monotone, so it can be
   applied to the volume at any resolution.

This module is numpy only (no TensorFlow, no I/O).
"""

import dataclasses
import math

import numpy as np

MATCH_QUANTILES = np.linspace(0.0, 1.0, 101)
MODALITIES = ("MRI", "CT")
CROPS = ("foreground", "none")


# ----- intensities ------------------------------------------------------------------------
def window_level(data, width, level):
    """CT window: ``[level - width/2, level + width/2]`` HU -> [0, 1], clipped outside."""
    low = level - width / 2.0
    return np.clip((np.asarray(data, np.float32) - low) / width, 0.0, 1.0).astype(np.float32)


def percentile_bounds(data, low_percentile, high_percentile):
    """The volume's own ``(low, high)`` intensity percentiles (``high > low`` always)."""
    low, high = np.percentile(np.asarray(data, np.float32), [low_percentile, high_percentile])
    return float(low), float(high if high > low else low + 1.0)


def percentile_scale(data, low_percentile, high_percentile):
    """Clip to the volume's own percentiles and rescale to [0, 1] (MRI: arbitrary units)."""
    low, high = percentile_bounds(data, low_percentile, high_percentile)
    return np.clip((np.asarray(data, np.float32) - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _increasing(values):
    """Make a non-decreasing sequence strictly increasing (np.interp needs that)."""
    values = np.maximum.accumulate(np.asarray(values, float))
    return values + np.arange(len(values)) * 1e-9


def reference_quantiles(data, mask):
    """Quantiles (at :data:`MATCH_QUANTILES`) of the reference subject's ``mask`` voxels."""
    return np.quantile(data[mask], MATCH_QUANTILES)


def matching_curve(data, mask, reference):
    """``(source, target)`` knots of the piecewise-linear monotone map taking the quantiles of
    ``data[mask]`` onto ``reference``, anchored so 0 -> 0 and 1 -> 1; None if the mask holds
    fewer than 2 voxels."""
    if mask.sum() < 2:
        return None
    source = _increasing(np.r_[0.0, _increasing(np.quantile(data[mask], MATCH_QUANTILES)), 1.0])
    target = np.maximum.accumulate(np.r_[0.0, np.asarray(reference, float), 1.0])
    return source, target


def match_histogram(data, reference, mask):
    """Map ``data`` so the quantiles of its ``mask`` voxels match ``reference`` (see
    :func:`matching_curve`); voxels outside the mask follow the same curve."""
    curve = matching_curve(data, mask, reference)
    if curve is None:
        return data
    return np.clip(np.interp(np.asarray(data, np.float64), *curve), 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass
class IntensityMap:
    """A pointwise map of raw intensities to the network's [0, 1] (see the module notes).

    ``low``/``high``: the raw values mapped to 0 and 1 before matching (CT: the window;
    MRI: the volume's percentiles); ``curve``: histogram-matching knots or None.
    """

    low: float | None
    high: float | None
    curve: tuple | None = None

    def __call__(self, data):
        """``data`` (any shape, raw units) -> float32 in [0, 1] (``low`` None: unchanged)."""
        if self.low is None:
            return np.asarray(data, np.float32)
        scaled = np.clip((np.asarray(data, np.float32) - self.low) / (self.high - self.low), 0.0, 1.0)
        if self.curve is None:
            return scaled.astype(np.float32)
        return np.clip(np.interp(scaled.astype(np.float64), *self.curve), 0.0, 1.0).astype(np.float32)


def fit_intensity(data, contract, reference=None):
    """The :class:`IntensityMap` of a volume resampled onto the network grid.

    Args:
      data: ``[X, Y, Z]`` raw intensities on the network grid (after crop and resampling).
      contract: an :class:`InputContract` (modality, window, percentiles, threshold).
      reference: quantiles to match; default the contract's (None: no matching).
    Returns:
      ``(map, mask)``: the map and the voxels its histogram matching used (CT: inside the
      window; MRI: scaled intensity above the foreground threshold).
    """
    reference = contract.reference_quantiles if reference is None else reference
    if contract.modality == "none":  # already in [0, 1]: kept as it is
        return IntensityMap(None, None), np.ones(np.shape(data), bool)
    if contract.modality == "CT":
        low = contract.window_level - contract.window_width / 2.0
        bounds = (low, low + contract.window_width)
    else:
        bounds = percentile_bounds(data, *contract.percentiles)
    scaled = IntensityMap(*bounds)(data)
    mask = (scaled > 0) & (scaled < 1) if contract.modality == "CT" else scaled > contract.foreground_threshold
    curve = matching_curve(scaled, mask, reference) if reference is not None else None
    return IntensityMap(*bounds, curve), mask


# ----- crop boxes and grid maps -----------------------------------------------------------
def bounding_box(mask, margin_mm, spacing):
    """Box around the ``True`` voxels of ``mask``, widened by ``margin_mm`` and clipped.

    Returns ``(low, high)`` int arrays (high exclusive), or None if the mask is empty.
    """
    if not mask.any():
        return None
    low, high = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        pad = int(math.ceil(margin_mm / spacing[axis]))
        low.append(max(present[0] - pad, 0))
        high.append(min(present[-1] + 1 + pad, mask.shape[axis]))
    return np.array(low), np.array(high)


def full_box(shape):
    return np.zeros(3, int), np.array(shape, int)


def foreground_mask(data, contract):
    """Voxels whose percentile-scaled intensity exceeds the contract's threshold (no labels)."""
    threshold = contract.foreground_threshold
    if not 0.0 <= threshold < 1.0:
        return percentile_scale(data, *contract.percentiles) > threshold
    low, high = percentile_bounds(data, *contract.percentiles)  # the same test without the clipped copy
    return (np.asarray(data, np.float32) - low) / (high - low) > threshold


def crop_box(data, spacing, contract):
    """The contract's crop box ``(low, high)`` of a volume ``[X, Y, Z]`` (voxel size ``spacing``
    mm); None when the foreground is empty."""
    if contract.crop == "none":
        return full_box(np.shape(data))
    return bounding_box(foreground_mask(data, contract), contract.margin_mm, spacing)


def grid_map(box, grid):
    """4x4 map from new voxel indices to old voxel indices for ``box`` resampled to ``grid``."""
    low, high = box
    scale = (np.asarray(high) - np.asarray(low)) / np.asarray(grid, float)
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(scale)
    matrix[:3, 3] = np.asarray(low) + (scale - 1) / 2
    return matrix


def world_to_voxel(points, affine):
    """``(N, 3)`` RAS-mm points -> continuous voxel indices of the grid with ``affine``."""
    points = np.asarray(points, float).reshape(-1, 3)
    return (np.linalg.inv(affine) @ np.c_[points, np.ones(len(points))].T).T[:, :3]


def voxel_to_world(points, affine):
    """``(N, 3)`` continuous voxel indices -> RAS-mm points."""
    points = np.asarray(points, float).reshape(-1, 3)
    return (affine @ np.c_[points, np.ones(len(points))].T).T[:, :3]


# ----- the contract -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InputContract:
    """How a model's training volumes were prepared (what new scans must go through).

    Attributes:
      modality: ``"MRI"`` or ``"CT"`` (``"none"``: intensities already in [0, 1], kept).
      grid: the network grid ``(X, Y, Z)``.
      crop: ``"foreground"`` (intensity foreground box plus ``margin_mm``) or ``"none"``.
      margin_mm, foreground_threshold, percentiles, window_width, window_level: as in
        `data_prep` (threshold on percentile-scaled intensity; percentiles in %; HU).
      reference_quantiles: histogram-matching target (101 values in [0, 1]) or None.
    """

    modality: str
    grid: tuple
    crop: str = "foreground"
    margin_mm: float = 10.0
    foreground_threshold: float = 0.1
    percentiles: tuple = (0.5, 99.5)
    window_width: float = 290.0
    window_level: float = 120.0
    reference_quantiles: tuple | None = None

    def to_json(self):
        out = dataclasses.asdict(self)
        out["grid"] = [int(n) for n in self.grid]
        out["percentiles"] = [float(p) for p in self.percentiles]
        if self.reference_quantiles is not None:
            out["reference_quantiles"] = [round(float(q), 7) for q in self.reference_quantiles]
        return out

    @classmethod
    def from_json(cls, values, where="preprocessing"):
        """From :meth:`to_json`'s dict; ValueError naming ``where`` when it is unusable."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown or "modality" not in values or "grid" not in values:
            raise ValueError(f"{where} is not an input contract (unknown fields {unknown} or no "
                             "modality / grid)")
        values = dict(values)
        values["grid"] = tuple(int(n) for n in values["grid"])
        values["percentiles"] = tuple(float(p) for p in values.get("percentiles", (0.5, 99.5)))
        if values.get("reference_quantiles") is not None:
            values["reference_quantiles"] = tuple(float(q) for q in values["reference_quantiles"])
        contract = cls(**values)
        if contract.modality not in MODALITIES or contract.crop not in CROPS:
            raise ValueError(f"{where}: modality must be one of {MODALITIES} and crop one of {CROPS}; "
                             f"got {contract.modality!r}, {contract.crop!r}")
        return contract


def contract_from_settings(settings, grid, reference=None):
    """The contract of a `data_prep` run from its settings dict (the manifest's
    ``preparation.settings``). A run that cropped around labels has no contract a new scan
    can follow: ValueError."""
    crop = settings.get("crop", "none")
    if crop not in CROPS:
        raise ValueError(f"the training volumes were cropped around labels ({crop!r}); a new scan "
                         "has none: prepare the data with --crop foreground or --crop none")
    return InputContract(
        modality=settings.get("modality", "MRI"), grid=tuple(int(n) for n in grid), crop=crop,
        margin_mm=float(settings.get("margin_mm", 10.0)),
        foreground_threshold=float(settings.get("foreground_threshold", 0.1)),
        percentiles=tuple(float(p) for p in settings.get("percentiles", (0.5, 99.5))),
        window_width=float(settings.get("window_width", 290.0)),
        window_level=float(settings.get("window_level", 120.0)),
        reference_quantiles=None if reference is None else tuple(float(q) for q in reference))
