"""The figures of one registration (``qc.json``), computed from numpy arrays on the fixed grid.

Inputs, all on the fixed image's grid ``[X, Y, Z]`` unless said otherwise:

* ``fixed``: the fixed image (any intensities).
* ``moving_headers``: the moving image resampled onto the fixed grid through the headers
  alone (world coordinates, no registration; 0 outside the moving volume).
* ``warped``: the moving image after registration (``warped.nii.gz``).
* ``flow``: ``[X, Y, Z, 3]`` displacement in voxels of the fixed grid, pulling
  (``flow_voxels.nii.gz``: fixed voxel ``x`` corresponds to the world point
  ``A_f (x + u(x))``), the affine part included.
* ``fixed_affine``: 4x4 voxel -> RAS mm of the fixed grid (its column norms are the spacing).
* ``world_ras``: the affine part, 4x4, fixed point (mm) -> moving point (mm), as
  ``affine.json`` records it.

Numpy and scipy, with the project's forward-difference Jacobian (`vtn_tf.core.fields`).
"""

import math

import numpy as np
from scipy import ndimage

WINDOW = 5  # side of the local correlation's cubes (voxels of the fixed grid)
FOREGROUND = 0.1  # foreground: above this share of the 0.5-99.5 percentile range (the input contract's)
PERCENTILES = (0.5, 99.5)
_EPS = 1e-6


# ----- similarity ----------------------------------------------------------------------------
def foreground(image, threshold=FOREGROUND, percentiles=PERCENTILES):
    """Voxels above ``threshold`` of the image's own percentile range (boolean ``[X, Y, Z]``);
    the percentiles are read on every second voxel per axis (the same numbers to 3 digits)."""
    image = np.asarray(image, np.float32)
    low, high = np.percentile(image[::2, ::2, ::2], percentiles)
    if high <= low:
        high = low + 1.0
    return image > low + threshold * (high - low)


def _box(mask, margin):
    """The slices of ``mask``'s bounding box widened by ``margin`` voxels (all of it if empty)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    index = np.argwhere(mask)
    low = np.maximum(index.min(0) - margin, 0)
    high = np.minimum(index.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def correlation(fixed, image, mask):
    """Pearson's r of two images over the voxels of ``mask`` (0 when one is constant there)."""
    a = np.asarray(fixed, np.float32)[mask]
    b = np.asarray(image, np.float32)[mask]
    a = a - np.float32(a.mean(dtype=np.float64))
    b = b - np.float32(b.mean(dtype=np.float64))
    denominator = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.dot(a, b)) / denominator if denominator > 0 else 0.0


def _window_means(x, window, stride):
    """Means of ``x`` over ``window``³ cubes centred on every ``stride``-th voxel per axis (edge
    values repeated beyond the volume): separable, each axis filtered then decimated."""
    for axis in (2, 1, 0):  # the contiguous axis first: a third faster than the other way round
        x = ndimage.uniform_filter1d(x, window, axis=axis, mode="nearest")
        x = x[(slice(None),) * axis + (slice(None, None, stride),)]
    return x


def local_correlation(fixed, image, mask, window=WINDOW, stride=2):
    """Mean over ``mask`` of the correlation coefficient in ``window``³ cubes centred on its voxels.

    Cubes where either image is constant count as 0 (no structure to match: a warped image
    that is 0 beyond the moving volume scores nothing there). The cubes are centred on every
    ``stride``-th voxel of each axis (1: every voxel; 2, the default, estimates the same mean
    from an eighth of the cubes, 3 times faster on a brain), within ``mask``'s bounding box.
    """
    return local_correlations(fixed, [image], mask, window, stride)[0]


def local_correlations(fixed, images, mask, window=WINDOW, stride=2):
    """:func:`local_correlation` of each of ``images`` to ``fixed`` (the fixed image's window
    moments computed once; the images side by side in threads: numpy and scipy release the GIL)."""
    import concurrent.futures

    box = _box(mask, window // 2 + 1)
    inside = mask[box][::stride, ::stride, ::stride]

    def unit(image):  # float32 moments stay accurate for any intensity unit
        image = np.asarray(image, np.float32)[box]
        return image / max(float(np.abs(image).max()), _EPS)

    def moments(x):
        mean = _window_means(x, window, stride)
        return x, mean, _window_means(x * x, window, stride) - mean * mean

    def score(image, fixed_moments):
        a, mean_a, var_a = fixed_moments
        b, mean_b, var_b = moments(unit(image))
        cov = _window_means(a * b, window, stride) - mean_a * mean_b
        va, vb, cov = var_a[inside], var_b[inside], cov[inside]
        valid = (va > _EPS * _EPS) & (vb > _EPS * _EPS)
        cc = np.where(valid, cov / np.sqrt(np.maximum(va * vb, _EPS ** 4)), 0.0)
        return float(np.clip(cc, -1.0, 1.0).mean()) if cc.size else 0.0

    fixed_moments = moments(unit(fixed))
    if len(images) == 1:
        return [score(images[0], fixed_moments)]
    with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(lambda image: score(image, fixed_moments), images))


def similarity(fixed, images, mask, window=WINDOW):
    """``[{"cc": global correlation, "lcc": local correlation}]`` of each of ``images`` to
    ``fixed`` over ``mask``."""
    local = local_correlations(fixed, images, mask, window)
    return [{"cc": correlation(fixed, image, mask), "lcc": value} for image, value in zip(images, local)]


# ----- the field -----------------------------------------------------------------------------
ROWS = 4  # fixed-grid slices per step of the field figures: the temporaries stay in the CPU's cache


def jacobian_determinant(flow):
    """``det(I + ∇flow)`` with forward differences: ``[X-1, Y-1, Z-1]`` float32, as the evaluation
    counts folding (`vtn_tf.core.fields.forward_jacobian_determinant`, here a few slices at a
    time: 8 times faster on a brain than the whole volume at once).

    ``flow``: ``[X, Y, Z, 3]`` voxels, pulling (channel c along axis c).
    """
    from vtn_tf.core.fields import forward_jacobian_determinant

    flow = np.asarray(flow, np.float32)
    out = np.empty(tuple(n - 1 for n in flow.shape[:3]), np.float32)
    for start in range(0, out.shape[0], ROWS):
        stop = min(start + ROWS, out.shape[0])
        out[start:stop] = forward_jacobian_determinant(flow[start:stop + 1])
    return out


def spacing_of(affine):
    """Voxel size (mm) per axis of a 4x4 voxel -> mm affine."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def displacement_mm(flow, fixed_affine):
    """Lengths (mm) of a displacement ``[X, Y, Z, 3]`` in voxels of the grid with ``fixed_affine``."""
    linear = np.asarray(fixed_affine, np.float32)[:3, :3]
    return np.linalg.norm(np.asarray(flow, np.float32) @ linear.T, axis=-1)


def largest_displacement(flow, fixed_affine):
    """The longest displacement (mm) of a flow ``[X, Y, Z, 3]`` in voxels, a few slices at a time."""
    flow = np.asarray(flow, np.float32)
    linear = np.asarray(fixed_affine, np.float32)[:3, :3]
    largest = 0.0
    for start in range(0, flow.shape[0], 4 * ROWS):
        mm = flow[start:start + 4 * ROWS] @ linear.T
        largest = max(largest, float(np.einsum("...c,...c->...", mm, mm).max()))
    return math.sqrt(largest)


# ----- the affine part -------------------------------------------------------------------------
def euler_angles(rotation):
    """Angles (degrees) about x, y and z of ``rotation = Rz @ Ry @ Rx`` (3x3, det +1)."""
    R = np.asarray(rotation, float)
    y = math.asin(float(np.clip(-R[2, 0], -1.0, 1.0)))
    if abs(math.cos(y)) > 1e-9:
        x, z = math.atan2(R[2, 1], R[2, 2]), math.atan2(R[1, 0], R[0, 0])
    else:  # gimbal lock: the angle about z absorbs the one about x
        x, z = 0.0, math.atan2(-R[0, 1], R[1, 1])
    return [math.degrees(v) for v in (x, y, z)]


def decompose_affine(world, centre=None):
    """An affine map split into rotation, scales, shears and translation.

    ``world``: 4x4 (or 3x4), points in mm -> points in mm. The linear part is factored as
    ``L = R @ U``, ``R`` a rotation and ``U`` upper triangular with a positive diagonal (QR):
    ``U = diag(scales) @ [[1, xy, xz], [0, 1, yz], [0, 0, 1]]``. A mirror (``det L < 0``) is
    taken out of ``R`` as a negative scale along x and reported as ``reflection``.

    Returns a dict: ``rotation_degrees`` ``[about x, about y, about z]`` (``R = Rz Ry Rx``),
    ``rotation_angle_degrees`` (the single angle of ``R``), ``scales`` ``[x, y, z]``,
    ``shears`` ``{"xy", "xz", "yz"}``, ``determinant``, ``reflection``, ``translation_mm``: the
    displacement of ``centre`` (mm; default the origin, i.e. the matrix's translation column).
    """
    world = np.asarray(world, float)
    L, t = world[:3, :3], world[:3, 3]
    Q, U = np.linalg.qr(L)
    signs = np.sign(np.diag(U))
    signs[signs == 0] = 1.0
    Q, U = Q * signs, U * signs[:, None]
    reflection = bool(np.linalg.det(Q) < 0)
    if reflection:  # a rotation times a mirror along x
        Q[:, 0] *= -1.0
        U[0, :] *= -1.0
    scales = np.diag(U).copy()
    shears = {"xy": U[0, 1] / U[0, 0], "xz": U[0, 2] / U[0, 0], "yz": U[1, 2] / U[1, 1]}
    centre = np.zeros(3) if centre is None else np.asarray(centre, float)
    angle = math.degrees(math.acos(float(np.clip((np.trace(Q) - 1.0) / 2.0, -1.0, 1.0))))
    return {
        "rotation_degrees": euler_angles(Q), "rotation_angle_degrees": angle,
        "scales": [float(s) for s in scales], "shears": {k: float(v) for k, v in shears.items()},
        "determinant": float(np.linalg.det(L)), "reflection": reflection,
        "translation_mm": [float(v) for v in L @ centre + t - centre],
    }


# ----- intensities -----------------------------------------------------------------------------
def intensity_summary(image):
    """What the intensities look like (read on every second voxel per axis): percentiles 1 and
    99, and the percent of voxels below -500 (air in Hounsfield units: a CT) and below -50
    (fat or air: no CT lacks both, no MRI magnitude has either)."""
    sample = np.asarray(image, np.float32)[::2, ::2, ::2].ravel()
    p1, p99 = np.percentile(sample, [1, 99])
    return {"p1": float(p1), "p99": float(p99),
            "below_minus500_percent": float(100.0 * np.mean(sample < -500)),
            "below_minus50_percent": float(100.0 * np.mean(sample < -50))}


# ----- all of it -------------------------------------------------------------------------------
def _rounded(value, digits=4):
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else round(float(value), digits)
    if isinstance(value, np.integer):
        return int(value)
    return value


def compute(fixed, moving_headers, warped, flow, fixed_affine, world_ras=None, *, fixed_labels=(),
            warped_labels=(), headers_labels=(), inverse_consistency=None, seconds=None, modality=None, moving=None,
            moving_affine=None, jacobian=None, window=WINDOW):
    """Every figure of one registration, as a JSON-ready dict (``qc.json``).

    Args:
      fixed, moving_headers, warped, flow, fixed_affine, world_ras: see the module notes.
      fixed_labels, warped_labels: label maps on the fixed grid, paired one to one (Dice).
      headers_labels: the moving label maps placed by the headers alone (Dice before).
      inverse_consistency: ``(rms_mm, p95_mm)`` of ``|inverse(forward(x)) - x|``, or None.
      seconds: wall clock per part of the registration (copied).
      modality: the model's input contract modality (``"MRI"``, ``"CT"``), recorded for the
        failure rule with the intensities of ``fixed`` and ``moving``.
      moving, moving_affine: the moving image on its own grid and its affine: the intensity
        summary and the share of its foreground that lands in the fixed field of view.
      jacobian: the forward-difference determinant when already computed (else computed here).
    Returns:
      dict: ``similarity`` (``before``: headers alone, ``after``: registered; each ``cc`` and
      ``lcc``), ``field`` (``folding_percent``, ``jacobian_std``, ``jacobian_min``,
      ``largest_displacement_mm``), ``affine`` (:func:`decompose_affine`
      of ``world_ras`` with the translation of the fixed foreground's centre), ``coverage``,
      ``intensity``, ``dice``, ``inverse_consistency``, ``seconds``.
    """
    fixed = np.asarray(fixed, np.float32)
    mask = foreground(fixed)
    if not mask.any():
        mask = np.ones(fixed.shape, bool)
    before, after = similarity(fixed, [moving_headers, warped], mask, window)
    out = {"similarity": {"before": before, "after": after,
                          "window": int(window), "region": "the fixed image's foreground"}}
    det = jacobian_determinant(flow) if jacobian is None else jacobian
    field = {"folding_percent": 100.0 * float(np.count_nonzero(det <= 0)) / det.size,
             "jacobian_std": float(det.std(dtype=np.float64)), "jacobian_min": float(det.min()),
             "largest_displacement_mm": largest_displacement(flow, fixed_affine)}
    if world_ras is not None:
        centre_voxel = np.argwhere(mask[::2, ::2, ::2]).mean(0) * 2.0
        centre = (np.asarray(fixed_affine, float) @ np.r_[centre_voxel, 1.0])[:3]
        out["affine"] = decompose_affine(world_ras, centre)
    out["field"] = field
    if moving is not None and moving_affine is not None:
        out["coverage"] = coverage(warped, det, fixed_affine, moving, moving_affine)
    out["intensity"] = {"modality": modality, "fixed": intensity_summary(fixed)}
    if moving is not None:
        out["intensity"]["moving"] = intensity_summary(moving)
    if len(fixed_labels) and len(warped_labels):
        out["dice"] = dice(fixed_labels, warped_labels)
        if len(headers_labels):
            out["dice"]["before"] = dice(fixed_labels, headers_labels)["mean"]
    if inverse_consistency is not None:
        out["inverse_consistency"] = {"rms_mm": float(inverse_consistency[0]), "p95_mm": float(inverse_consistency[1])}
    if seconds:
        out["seconds"] = {k: float(v) for k, v in seconds.items()}
    return _rounded(out)


def coverage(warped, det, fixed_affine, moving, moving_affine):
    """How much of the moving image's foreground lands in the fixed field of view.

    A fixed voxel whose warped value is foreground carries ``vol_f * det(I + ∇u)`` mm³ of the
    moving image; their sum over the moving foreground's volume is the share that lands inside
    (100 % when the fixed grid covers the whole moving foreground).
    Returns ``{"moving_inside_percent"}``.
    """
    moving = np.asarray(moving, np.float32)
    low, high = np.percentile(moving[::2, ::2, ::2], PERCENTILES)
    threshold = low + FOREGROUND * (max(high, low + 1e-6) - low)
    moving_volume = float(np.count_nonzero(moving > threshold)) * float(np.prod(spacing_of(moving_affine)))
    inside = np.asarray(warped, np.float32)[:-1, :-1, :-1] > threshold
    carried = float(np.clip(det[inside], 0.0, None).sum()) * float(np.prod(spacing_of(fixed_affine)))
    share = 100.0 * min(carried / moving_volume, 1.0) if moving_volume > 0 else 0.0
    return {"moving_inside_percent": share}


def _label_codes(a, b):
    """Both label maps (flat) as codes ``0..n-1`` of their ids together, and the ids."""
    low, high = int(min(a.min(), b.min())), int(max(a.max(), b.max()))
    if high - low < 1 << 16:  # small ids (every atlas): counts and a lookup table, no sorting
        a, b = (np.asarray(x, np.int32).ravel() - np.int32(low) for x in (a, b))
        present = (np.bincount(a, minlength=high - low + 1) + np.bincount(b, minlength=high - low + 1)) > 0
        table = (np.cumsum(present) - 1).astype(np.int32)
        return table[a], table[b], np.flatnonzero(present) + low
    values, index = np.unique(np.concatenate([a.ravel(), b.ravel()]), return_inverse=True)
    return index[: a.size], index[a.size:], values


def dice(fixed_labels, warped_labels):
    """Mean Dice over the non-zero labels of each fixed map and its warped map (labels absent
    from both left out), from one joint histogram per pair of maps: ``{"mean", "per_map"}``."""
    scores = []
    for a, b in zip(fixed_labels, warped_labels):
        code_a, code_b, values = _label_codes(np.asarray(a), np.asarray(b))
        n = len(values)
        joint = np.bincount(code_a.astype(np.int64) * n + code_b, minlength=n * n).reshape(n, n)
        keep = values != 0
        inter = np.diag(joint)[keep].astype(float)
        total = joint.sum(1)[keep] + joint.sum(0)[keep]
        scores.append(float(np.mean(2.0 * inter / total)) if keep.any() else math.nan)
    finite = [s for s in scores if math.isfinite(s)]
    return {"mean": float(np.mean(finite)) if finite else math.nan, "per_map": scores}
