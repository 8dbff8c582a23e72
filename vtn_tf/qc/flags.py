"""The failure rule: when a registration is suspect, and why, in words.

A registration is **suspect** when any of these holds (thresholds in :class:`Thresholds`;
`docs/qc.md` explains each):

* ``similarity``: the local correlation with the fixed image rose by less than
  ``min_similarity_gain`` over the moving image placed by its headers alone, or fell; or it
  ends below ``min_local_correlation``;
* ``folding``: more than ``max_folding_percent`` of the voxels fold (Jacobian determinant ≤ 0);
* ``affine``: the affine part mirrors the image, rotates it by more than
  ``max_rotation_degrees``, or scales an axis outside ``scale_range``;
* ``intensity``: an image's intensities break the model's input contract: a CT (Hounsfield
  units: at least ``ct_air_percent`` of the voxels below -500, air) given to an MRI model, or
  an image without Hounsfield units (under ``ct_air_percent`` of the voxels below -50: neither
  air nor fat) given to a CT model;
* ``labels`` (with fixed labels): the mean Dice of the warped moving labels with the fixed
  labels is below ``min_dice``, or lower than with the moving labels placed by the headers
  alone;
* ``coverage``: less than ``min_inside_percent`` of the moving image's foreground lands in the
  fixed image's field of view (the network box is cut from the fixed image);
* ``cohort`` (batch reports only, :func:`cohort_flags`): the local correlation after
  registration, or the Dice, lies more than ``cohort_mads`` scaled median absolute deviations
  below the cohort's median.
"""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Thresholds:
    min_similarity_gain: float = 0.02
    min_local_correlation: float = 0.1
    max_folding_percent: float = 1.0
    max_rotation_degrees: float = 45.0
    scale_range: tuple = (0.67, 1.5)
    min_dice: float = 0.3
    ct_air_percent: float = 1.0
    min_inside_percent: float = 50.0
    cohort_mads: float = 3.0
    cohort_min_pairs: int = 5


THRESHOLDS = Thresholds()


def _flag(name, reason):
    return {"flag": name, "reason": reason}


def _intensity_flags(intensity, thresholds):
    modality = (intensity or {}).get("modality")
    found = []
    for role in ("fixed", "moving"):
        summary = (intensity or {}).get(role)
        if not summary or modality not in ("MRI", "CT"):
            continue
        air = summary["below_minus500_percent"]
        if modality == "MRI" and air >= thresholds.ct_air_percent:
            found.append(_flag("intensity", f"the {role} image looks like a CT, not the MRI this model was "
                                            f"trained on: {air:.0f} % of its voxels are below -500 (air in "
                                            "Hounsfield units)"))
        low = summary["below_minus50_percent"]
        if modality == "CT" and low < thresholds.ct_air_percent:
            found.append(_flag("intensity", f"the {role} image is not in Hounsfield units, as this CT model "
                                            f"expects: {low:.1f} % of its voxels are below -50 (no air, no "
                                            "fat); an MRI?"))
    return found


def flags(figures, thresholds=THRESHOLDS):
    """The flags of one registration: a list of ``{"flag", "reason"}`` (empty: nothing suspect).

    ``figures``: :func:`vtn_tf.qc.figures.compute`'s dict (missing parts are not judged).
    """
    t = thresholds
    found = []
    similarity = figures.get("similarity")
    if similarity:
        before, after = similarity["before"]["lcc"], similarity["after"]["lcc"]
        if after < before:
            found.append(_flag("similarity", f"the local correlation with the fixed image fell from {before:.3f} "
                                             f"(headers alone) to {after:.3f}: registration made it worse"))
        elif after - before < t.min_similarity_gain:
            found.append(_flag("similarity", f"the local correlation with the fixed image barely improved: "
                                             f"{before:.3f} -> {after:.3f} (less than +{t.min_similarity_gain})"))
        if after < t.min_local_correlation:
            found.append(_flag("similarity", f"the local correlation after registration is {after:.3f}, below "
                                             f"{t.min_local_correlation}: the images hardly match"))
    field = figures.get("field")
    if field and field["folding_percent"] > t.max_folding_percent:
        found.append(_flag("folding", f"{field['folding_percent']:.2f} % of the voxels fold (Jacobian "
                                      f"determinant <= 0), above {t.max_folding_percent} %"))
    affine = figures.get("affine")
    if affine:
        if affine["reflection"]:
            found.append(_flag("affine", "the affine part mirrors the image (negative determinant)"))
        angle = affine["rotation_angle_degrees"]
        if angle > t.max_rotation_degrees:
            found.append(_flag("affine", f"the affine part rotates by {angle:.0f} degrees, more than "
                                         f"{t.max_rotation_degrees:.0f}"))
        low, high = t.scale_range
        bad = [(axis, s) for axis, s in zip("xyz", affine["scales"]) if not low <= abs(s) <= high]
        if bad:
            found.append(_flag("affine", "the affine part scales " + ", ".join(f"{axis} by {abs(s):.2f}"
                                                                               for axis, s in bad)
                               + f", outside {low}-{high}"))
    overlap = figures.get("dice")
    if overlap and math.isfinite(overlap.get("mean", math.nan)):
        after, before = overlap["mean"], overlap.get("before", math.nan)
        if after < t.min_dice:
            found.append(_flag("labels", f"the warped labels hardly overlap the fixed labels: mean Dice {after:.3f}, "
                                         f"below {t.min_dice}"))
        if math.isfinite(before) and after < before:
            found.append(_flag("labels", f"registration lowered the mean Dice with the fixed labels from {before:.3f} "
                                         f"(headers alone) to {after:.3f}"))
    found += _intensity_flags(figures.get("intensity"), t)
    coverage = figures.get("coverage")
    if coverage and coverage["moving_inside_percent"] < t.min_inside_percent:
        found.append(_flag("coverage", f"only {coverage['moving_inside_percent']:.0f} % of the moving image's "
                                       f"foreground lands in the fixed image's field of view (below "
                                       f"{t.min_inside_percent:.0f} %)"))
    return found


def cohort_flags(values, thresholds=THRESHOLDS, what="the local correlation after registration"):
    """Per pair, a cohort flag or None: ``values`` (one per pair; by default the local correlation
    after registration) more than ``cohort_mads`` scaled MADs (1.4826 MAD, a standard deviation
    for normal data) below the cohort's median. Needs ``cohort_min_pairs`` finite values; NaN
    values get None."""
    values = np.asarray(values, float)
    finite = values[np.isfinite(values)]
    out = [None] * len(values)
    if len(finite) < thresholds.cohort_min_pairs:
        return out
    median = float(np.median(finite))
    spread = max(1.4826 * float(np.median(np.abs(finite - median))), 0.01)
    floor = median - thresholds.cohort_mads * spread
    for k, value in enumerate(values):
        if math.isfinite(value) and value < floor:
            out[k] = _flag("cohort", f"{what}, {value:.3f}, is far below the cohort's (median {median:.3f}, "
                                     f"limit {floor:.3f})")
    return out
