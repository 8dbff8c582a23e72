"""Evaluation metrics (paper §V): overlap, Jacobian statistics, landmark distance.

Overlap metrics work on label maps (numpy arrays or tensors) of integer ids, stored as
integers or as floats with whole values (nibabel's ``get_fdata``). Field
metrics take flows in voxels, pulling, as in `vtn_tf.core`.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from vtn_tf.core import fields
from vtn_tf.core.fields import forward_jacobian_determinant  # noqa: F401 - a metric of this module too


def _label_ids(name, labels):
    """``labels`` as an integer array: integer dtypes as they are, floating point ones (what
    nibabel's ``get_fdata`` returns) converted when every value is a whole number."""
    if np.issubdtype(labels.dtype, np.integer):
        return labels
    if not np.issubdtype(labels.dtype, np.floating):
        raise ValueError(f"{name} must hold integer label ids; got {labels.dtype}.")
    whole = np.isfinite(labels) & (labels == np.round(labels))
    if not whole.all():
        bad = labels[~whole]
        raise ValueError(f"{name} must hold integer label ids; {bad.size} of its {labels.size} "
                         f"{labels.dtype} values are not whole numbers (e.g. {bad.flat[0]:g}): "
                         "a label map resampled with linear interpolation? Use nearest neighbour.")
    return labels.astype(np.int64)


def _label_arrays(fixed_labels, warped_labels):
    a, b = np.asarray(fixed_labels), np.asarray(warped_labels)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}.")
    return _label_ids("fixed_labels", a), _label_ids("warped_labels", b)


def _overlap(fixed_labels, warped_labels, label_values, score):
    a, b = _label_arrays(fixed_labels, warped_labels)
    if label_values is None:
        label_values = sorted(set(np.unique(a).tolist()) - {0})
    per_label = {}
    for value in label_values:
        in_a, in_b = a == value, b == value
        intersection = np.count_nonzero(in_a & in_b)
        sizes = np.count_nonzero(in_a), np.count_nonzero(in_b)
        per_label[int(value)] = score(intersection, *sizes) if sum(sizes) else float("nan")
    values = [v for v in per_label.values() if not np.isnan(v)]
    return per_label, (float(np.mean(values)) if values else float("nan"))


def dice(fixed_labels: Any, warped_labels: Any,
         label_values: Sequence[int] | None = None) -> tuple[dict[int, float], float]:
    """Dice overlap ``2|A∩B| / (|A|+|B|)`` per label and its mean.

    Args:
      fixed_labels, warped_labels: label maps of the same shape: integer ids, stored as
        integers or as floats with whole values (as ``nibabel``'s ``get_fdata`` gives them).
      label_values: labels to score; default every non-zero label of ``fixed_labels``.
    Returns:
      ``(per_label: dict[int, float], mean: float)``; a label absent from both maps
      scores NaN and is left out of the mean.
    Raises:
      ValueError: maps of different shapes, or a value that is not a whole number (NaN,
        infinite or fractional, e.g. labels resampled with linear interpolation).
    """
    return _overlap(fixed_labels, warped_labels, label_values,
                    lambda inter, na, nb: 2.0 * inter / (na + nb))


def jaccard(fixed_labels: Any, warped_labels: Any,
            label_values: Sequence[int] | None = None) -> tuple[dict[int, float], float]:
    """Jaccard index (the paper's Seg. IoU) ``|A∩B| / |A∪B|``; same contract as `dice`."""
    return _overlap(fixed_labels, warped_labels, label_values,
                    lambda inter, na, nb: inter / (na + nb - inter))


jacobian_determinant = fields.jacobian_determinant


def folding_fraction(flow: Any) -> float:
    """Share of voxels where ``x ↦ x + flow(x)`` folds (Jacobian determinant ≤ 0).

    Args:
      flow: ``[B, X, Y, Z, 3]`` or ``[X, Y, Z, 3]``, voxels, pulling.
    Returns:
      float in [0, 1] (over all voxels of all batch elements).
    """
    det = fields.jacobian_determinant(flow)
    return float(tf.reduce_mean(tf.cast(det <= 0.0, tf.float32)))


def landmark_distance(flow: Any, fixed_points: np.ndarray, moving_points: np.ndarray,
                      spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, Any]:
    """Distance between fixed landmarks carried through the flow and moving landmarks.

    A fixed landmark ``p`` maps to ``p + flow(p)`` in the moving image (points go
    the opposite way from images); the flow is sampled trilinearly at ``p``.

    Args:
      flow: ``[X, Y, Z, 3]`` (or ``[1, X, Y, Z, 3]``), voxels of the fixed grid, pulling.
      fixed_points: ``[N, 3]`` voxel coordinates in the fixed image.
      moving_points: ``[N, 3]`` matching voxel coordinates in the moving image.
      spacing: voxel size in mm (both images on the same prepared grid).
    Returns:
      dict with ``mean_mm``, ``mean_voxels`` and per-point arrays ``mm`` and ``voxels``.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim == 5:
        if flow.shape[0] != 1:
            raise ValueError(f"landmark_distance takes one flow; got batch {flow.shape[0]}.")
        flow = flow[0]
    fixed_points = np.asarray(fixed_points, dtype=np.float64)
    moving_points = np.asarray(moving_points, dtype=np.float64)
    if fixed_points.shape != moving_points.shape or fixed_points.ndim != 2 or fixed_points.shape[1] != 3:
        raise ValueError(
            f"fixed_points {fixed_points.shape} and moving_points {moving_points.shape} must both be [N, 3].")
    mapped = fixed_points + _sample_points(flow, fixed_points)
    difference = mapped - moving_points
    voxels = np.linalg.norm(difference, axis=1)
    mm = np.linalg.norm(difference * np.asarray(spacing, dtype=np.float64), axis=1)
    return {"mean_mm": float(mm.mean()), "mean_voxels": float(voxels.mean()), "mm": mm, "voxels": voxels}


def _sample_points(field, points):
    """Trilinear sample of ``field [X, Y, Z, C]`` at ``points [N, 3]`` (edge-clamped)."""
    size = np.array(field.shape[:3])
    points = np.clip(points, 0, size - 1)
    lower = np.floor(points).astype(int)
    upper = np.minimum(lower + 1, size - 1)
    frac = points - lower
    out = np.zeros((len(points), field.shape[3]))
    for corner in np.ndindex(2, 2, 2):
        pick = np.where(corner, upper, lower)
        weight = np.prod(np.where(corner, frac, 1 - frac), axis=1)
        out += weight[:, None] * field[pick[:, 0], pick[:, 1], pick[:, 2]]
    return out


def overlap_table(fixed_labels, warped_labels, label_values):
    """Dice and Jaccard per label in one pass (a joint histogram), for large native grids.

    Returns ``(dice_per_label, dice_mean, jaccard_mean)``; labels absent from both maps are
    NaN and left out of the means, as in `dice` / `jaccard`.
    """
    a, b = _label_arrays(fixed_labels, warped_labels)
    values = np.unique(np.asarray([int(v) for v in label_values if int(v) != 0], np.int64))

    def index(x):  # 1 + the position of each voxel's label in ``values``, 0 for any other id
        x = np.asarray(x).ravel()
        if not len(values):
            return np.zeros(x.shape, np.int64)
        where = np.minimum(np.searchsorted(values, x), len(values) - 1)
        return np.where(values[where] == x, where + 1, 0)
    n = len(values) + 1
    joint = np.bincount(index(a) * n + index(b), minlength=n * n).reshape(n, n)
    inter = np.diag(joint)[1:].astype(float)
    size_a, size_b = joint.sum(1)[1:].astype(float), joint.sum(0)[1:].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(size_a + size_b > 0, 2 * inter / (size_a + size_b), np.nan)
        jac = np.where(size_a + size_b > 0, inter / (size_a + size_b - inter), np.nan)
    per_label = {int(v): float(d) for v, d in zip(values, dice)}
    return per_label, float(np.nanmean(dice)), float(np.nanmean(jac))
