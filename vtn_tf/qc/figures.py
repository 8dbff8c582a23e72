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

Numpy alone, each figure in one pass over the fixed grid, a slab of planes at a time: the
similarity over the fixed foreground's bounding box, the field's figures over the whole grid.
"""

import concurrent.futures
import math

import numpy as np

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
    out = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not present.size:
            return tuple(slice(0, n) for n in mask.shape)
        out.append(slice(max(int(present[0]) - margin, 0), min(int(present[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(out)


def _rows(axis, index):
    """An index of ``index`` along ``axis`` (all of the axes before it)."""
    return (slice(None),) * axis + (index,)


def _window_sums(x, axis, window, stride):
    """Sums of ``x`` over ``window`` consecutive entries along ``axis``, centred on every
    ``stride``-th entry from the first, the edge entries repeated beyond the ends: float32,
    ``(n - 1) // stride + 1`` entries along ``axis``.

    Each of the ``window`` offsets is one strided slice added to the sums; the few centres whose
    window passes an end add the end's entry instead."""
    n, half = x.shape[axis], window // 2
    count = (n - 1) // stride + 1
    last = stride * (count - 1)
    total = x[_rows(axis, slice(0, last + 1, stride))].astype(np.float32, copy=True)
    for offset in range(-half, window - half):
        if offset == 0:
            continue
        lo = min(count, (-offset + stride - 1) // stride) if offset < 0 else 0  # the first centre inside
        hi = count if last + offset <= n - 1 else max(lo, (n - 1 - offset) // stride + 1)
        if hi > lo:
            begin = stride * lo + offset
            total[_rows(axis, slice(lo, hi))] += x[_rows(axis, slice(begin, begin + stride * (hi - lo - 1) + 1,
                                                                     stride))]
        if lo > 0:
            total[_rows(axis, slice(0, lo))] += x[_rows(axis, slice(0, 1))]
        if hi < count:
            total[_rows(axis, slice(hi, count))] += x[_rows(axis, slice(n - 1, n))]
    return total


def _window_means(x, window, stride):
    """Means of ``x`` over ``window``³ cubes centred on every ``stride``-th voxel per axis (edge
    values repeated beyond the volume). Separable: each axis summed and decimated, axis 0 first
    (whole planes at a time), so that each pass reads less than the one before."""
    for axis in range(3):
        x = _window_sums(x, axis, window, stride)
    return x * np.float32(1.0 / window ** 3)


def similarity(fixed, images, mask, window=WINDOW, stride=2):
    """``[{"cc": global correlation, "lcc": local correlation}]`` of each of ``images`` to
    ``fixed`` over the voxels of ``mask`` (``[X, Y, Z]`` arrays).

    ``cc``: Pearson's r over ``mask`` (0 when an image is constant there). ``lcc``: the mean
    over ``mask`` of the correlation coefficient in ``window``³ cubes (edge values repeated
    beyond the volume); cubes where either image is constant count as 0 (no structure to
    match: a warped image that is 0 beyond the moving volume scores nothing there). The cubes
    are centred on every ``stride``-th voxel of each axis (1: every voxel; 2, the default,
    estimates the same mean from an eighth of the cubes).

    Each image is scaled to its largest magnitude over ``mask``'s bounding box (the threshold
    of a constant cube means the same in any intensity unit); the window moments are float32
    box sums, decimated axis by axis (the fixed image's once for all images).
    """
    statistics = fixed_statistics(fixed, mask, window, stride)
    return [similarity_to(statistics, image) for image in images]


def fixed_statistics(fixed, mask, window=WINDOW, stride=2):
    """What :func:`similarity` computes of the fixed image once for every image compared to it."""
    box = _box(mask, window // 2 + 1)
    region = mask[box]
    kept = region[::stride, ::stride, ::stride]
    inside = np.flatnonzero(region)
    a = _scaled(fixed, box)
    mean_a = _window_means(a, window, stride)[kept]
    var_a = _window_means(a * a, window, stride)[kept] - mean_a * mean_a
    return {"box": box, "kept": kept, "inside": inside, "a": a, "centred_a": _centred(a.ravel().take(inside)),
            "mean_a": mean_a, "var_a": var_a, "window": window, "stride": stride}


def similarity_to(statistics, image):
    """``{"cc", "lcc"}`` of ``image`` to the fixed image of :func:`fixed_statistics`."""
    box, kept, a, mean_a, var_a = (statistics[k] for k in ("box", "kept", "a", "mean_a", "var_a"))

    def means(x):
        return _window_means(x, statistics["window"], statistics["stride"])[kept]

    b = _scaled(image, box)
    mean_b = means(b)
    var_b = means(b * b) - mean_b * mean_b
    cov = means(a * b) - mean_a * mean_b
    valid = (var_a > _EPS * _EPS) & (var_b > _EPS * _EPS)
    cc = np.where(valid, cov / np.sqrt(np.maximum(var_a * var_b, _EPS ** 4)), 0.0)
    local = float(np.clip(cc, -1.0, 1.0).mean(dtype=np.float64)) if cc.size else 0.0
    centred_a, centred_b = statistics["centred_a"], _centred(b.ravel().take(statistics["inside"]))
    denominator = math.sqrt(float(np.dot(centred_a, centred_a)) * float(np.dot(centred_b, centred_b)))
    return {"cc": float(np.dot(centred_a, centred_b)) / denominator if denominator > 0 else 0.0, "lcc": local}


def _scaled(image, box):
    """``image[box]`` float32, contiguous, scaled to its largest magnitude 1."""
    view = np.asarray(image, np.float32)[box]
    return view * np.float32(1.0 / max(float(view.max()), -float(view.min()), _EPS))


def _centred(values):
    """``values`` minus their mean, the mean taken in float64 (the correlation's products of
    centred float32 values do not cancel)."""
    return values - np.float32(values.mean(dtype=np.float64)) if values.size else values


# ----- the field -----------------------------------------------------------------------------
SLAB_VOXELS = 1 << 17  # fixed-grid voxels per step of the field's pass: its temporaries stay in cache


def jacobian_determinant(flow):
    """``det(I + ∇flow)`` with forward differences: ``[X-1, Y-1, Z-1]`` float32, as the evaluation
    counts folding (`vtn_tf.core.fields.forward_jacobian_determinant`: the same products in the
    same order, without the cofactors the determinant does not need).

    ``flow``: ``[X, Y, Z, 3]`` voxels, pulling (channel c along axis c).
    """
    components = np.moveaxis(np.asarray(flow, np.float32), -1, 0)
    return _determinant(np.ascontiguousarray(components))


def _determinant(components):
    """:func:`jacobian_determinant` of ``[3, X, Y, Z]`` contiguous displacement components."""
    base = components[:, :-1, :-1, :-1]
    J = [[components[k, 1:, :-1, :-1] - base[k], components[k, :-1, 1:, :-1] - base[k],
          components[k, :-1, :-1, 1:] - base[k]] for k in range(3)]
    for k in range(3):
        J[k][k] += np.float32(1.0)
    return (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1]) + J[0][1] * (J[1][2] * J[2][0] - J[1][0] * J[2][2])
            + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))


def field_figures(flow, fixed_affine, warped=None, threshold=None):
    """The figures of a flow in one pass, a slab of planes at a time (:data:`SLAB_VOXELS`).

    Args:
      flow: ``[X, Y, Z, 3]`` voxels of the grid with ``fixed_affine``, pulling.
      warped, threshold: with both, also ``carried_voxels``: the sum of the positive Jacobian
        determinants over the voxels whose ``warped`` value is above ``threshold``
        (:func:`coverage`).
    Returns:
      dict: ``folding_percent`` (determinant ≤ 0), ``jacobian_std``, ``jacobian_min`` (of the
      forward-difference determinant, :func:`jacobian_determinant`) and
      ``largest_displacement_mm`` (the longest ``u(x)``, mm).
    """
    flow = np.asarray(flow, np.float32)
    linear = np.asarray(fixed_affine, np.float64)[:3, :3]
    gram = linear.T @ linear  # |L u|² = u·(LᵀL)u
    X = flow.shape[0]
    rows = max(1, SLAB_VOXELS // max(1, flow.shape[1] * flow.shape[2]))
    folded, total, smallest, largest = 0, 0, math.inf, 0.0
    shift, sums = None, [0.0, 0.0]  # of det - shift and its square (shift: the first slab's mean, no cancellation)
    carried = 0.0
    for start in range(0, X - 1, rows):
        stop = min(start + rows, X - 1)
        components = np.ascontiguousarray(np.moveaxis(flow[start:stop + 1], -1, 0))
        det = _determinant(components)
        low = float(det.min())
        folded += int(np.count_nonzero(det <= 0)) if low <= 0 else 0
        total += det.size
        smallest = min(smallest, low)
        shift = float(det.mean(dtype=np.float64)) if shift is None else shift
        deviation = (det - np.float32(shift)).ravel()
        sums[0] += float(deviation.sum(dtype=np.float64))
        sums[1] += float(np.dot(deviation, deviation))
        if warped is not None and threshold is not None:
            inside = np.asarray(warped[start:stop, :-1, :-1]) > threshold
            carried += float((np.maximum(det, 0.0) if low <= 0 else det)[inside].sum(dtype=np.float64))
        u = components[:, :stop - start + (1 if stop == X - 1 else 0)]
        squared = sum(np.float32(gram[i, i]) * u[i] * u[i] for i in range(3))
        for i, j in ((0, 1), (0, 2), (1, 2)):
            if gram[i, j] != 0:
                squared += np.float32(2.0 * gram[i, j]) * u[i] * u[j]
        largest = max(largest, float(squared.max()))
    if X < 2:  # no forward differences: the displacement alone
        largest = float(displacement_mm(flow, fixed_affine).max()) ** 2 if flow.size else 0.0
    total = max(total, 1)
    mean = sums[0] / total
    spread = math.sqrt(max(sums[1] / total - mean * mean, 0.0))
    out = {"folding_percent": 100.0 * folded / total, "jacobian_std": spread, "jacobian_min": smallest,
           "largest_displacement_mm": math.sqrt(largest)}
    if warped is not None and threshold is not None:
        out["carried_voxels"] = carried
    return out


def spacing_of(affine):
    """Voxel size (mm) per axis of a 4x4 voxel -> mm affine."""
    return np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)


def displacement_mm(flow, fixed_affine):
    """Lengths (mm) of a displacement ``[X, Y, Z, 3]`` in voxels of the grid with ``fixed_affine``."""
    linear = np.asarray(fixed_affine, np.float32)[:3, :3]
    return np.linalg.norm(np.asarray(flow, np.float32) @ linear.T, axis=-1)


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


THREAD_VOXELS = 1 << 21  # from this many fixed voxels on, the field's figures run beside the similarities


def compute(fixed, moving_headers, warped, flow, fixed_affine, world_ras=None, *, fixed_labels=(),
            warped_labels=(), headers_labels=(), inverse_consistency=None, seconds=None, modality=None, moving=None,
            moving_affine=None, mask=None, window=WINDOW):
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
      mask: the fixed image's :func:`foreground` when already computed (else computed here).
    Returns:
      dict: ``similarity`` (``before``: headers alone, ``after``: registered; each ``cc`` and
      ``lcc``), ``field`` (``folding_percent``, ``jacobian_std``, ``jacobian_min``,
      ``largest_displacement_mm``), ``affine`` (:func:`decompose_affine`
      of ``world_ras`` with the translation of the fixed foreground's centre), ``coverage``,
      ``intensity``, ``dice``, ``inverse_consistency``, ``seconds``.
    """
    fixed = np.asarray(fixed, np.float32)
    mask = foreground(fixed) if mask is None else mask
    if not mask.any():
        mask = np.ones(fixed.shape, bool)
    rest = (fixed, warped, flow, fixed_affine, world_ras, mask, fixed_labels, warped_labels, headers_labels,
            modality, moving, moving_affine)
    if fixed.size < THREAD_VOXELS:
        statistics = fixed_statistics(fixed, mask, window)
        before, after = (similarity_to(statistics, image) for image in (moving_headers, warped))
        out = _field_and_labels(*rest)
    else:  # the field's figures beside the similarities: numpy lets go of the lock, both cores work
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            field = pool.submit(_field_and_labels, *rest)
            statistics = fixed_statistics(fixed, mask, window)
            similar = pool.submit(similarity_to, statistics, moving_headers)
            after = similarity_to(statistics, warped)
            before, out = similar.result(), field.result()
    out = {"similarity": {"before": before, "after": after, "window": int(window),
                          "region": "the fixed image's foreground"}, **out}
    if inverse_consistency is not None:
        out["inverse_consistency"] = {"rms_mm": float(inverse_consistency[0]), "p95_mm": float(inverse_consistency[1])}
    if seconds:
        out["seconds"] = {k: float(v) for k, v in seconds.items()}
    return _rounded(out)


def _field_and_labels(fixed, warped, flow, fixed_affine, world_ras, mask, fixed_labels, warped_labels,
                      headers_labels, modality, moving, moving_affine):
    """:func:`compute`'s figures other than the similarity (a dict in ``qc.json``'s order)."""
    out = {}
    covered = moving is not None and moving_affine is not None
    threshold = moving_threshold(moving) if covered else None
    field = field_figures(flow, fixed_affine, warped if covered else None, threshold)
    carried = field.pop("carried_voxels", 0.0)
    if world_ras is not None:
        centre_voxel = _mean_index(mask[::2, ::2, ::2]) * 2.0
        centre = (np.asarray(fixed_affine, float) @ np.r_[centre_voxel, 1.0])[:3]
        out["affine"] = decompose_affine(world_ras, centre)
    out["field"] = field
    if covered:
        out["coverage"] = coverage(moving, moving_affine, threshold, carried, fixed_affine)
    out["intensity"] = {"modality": modality, "fixed": intensity_summary(fixed)}
    if moving is not None:
        out["intensity"]["moving"] = intensity_summary(moving)
    if len(fixed_labels) and len(warped_labels):
        out["dice"] = dice(fixed_labels, warped_labels)
        if len(headers_labels):
            out["dice"]["before"] = dice(fixed_labels, headers_labels)["mean"]
    return out


def _mean_index(mask):
    """The mean voxel index of ``mask`` (``[3]`` float), from its counts along each axis."""
    total = max(int(np.count_nonzero(mask)), 1)
    return np.array([float(np.dot(np.arange(mask.shape[a]), mask.sum(axis=tuple(b for b in range(3) if b != a))))
                     / total for a in range(3)])


def moving_threshold(moving):
    """The moving image's foreground threshold (as :func:`foreground`'s, on its own grid)."""
    low, high = np.percentile(np.asarray(moving, np.float32)[::2, ::2, ::2], PERCENTILES)
    return low + FOREGROUND * (max(high, low + 1e-6) - low)


def coverage(moving, moving_affine, threshold, carried_voxels, fixed_affine):
    """How much of the moving image's foreground lands in the fixed field of view.

    A fixed voxel whose warped value is above the moving image's foreground ``threshold``
    (:func:`moving_threshold`) carries ``vol_f * det(I + ∇u)`` mm³ of the moving image;
    ``carried_voxels`` is the sum of those determinants (the positive ones:
    :func:`field_figures`), and its volume over the moving foreground's is the share that
    lands inside (100 % when the fixed grid covers the whole moving foreground).
    Returns ``{"moving_inside_percent"}``.
    """
    moving_volume = float(np.count_nonzero(np.asarray(moving) > threshold)) * float(np.prod(spacing_of(moving_affine)))
    carried = carried_voxels * float(np.prod(spacing_of(fixed_affine)))
    share = 100.0 * min(carried / moving_volume, 1.0) if moving_volume > 0 else 0.0
    return {"moving_inside_percent": share}


SMALL_IDS = 1 << 10  # ids 0..SMALL_IDS-1 (every atlas): one joint histogram of the ids themselves


def _joint_histogram(a, b):
    """``(joint, ids)``: ``joint[i, j]`` the voxels with ``a == ids[i]`` and ``b == ids[j]``, over
    the ids present in either flat map."""
    low, high = int(min(a.min(), b.min())), int(max(a.max(), b.max()))
    if low >= 0 and high < SMALL_IDS:  # the ids as they are: two passes and one count
        m = high + 1
        codes = a.astype(np.intp)
        codes *= m
        codes += b if b.dtype.kind in "iub" else b.astype(np.intp)
        joint = np.bincount(codes, minlength=m * m).reshape(m, m)
        present = np.flatnonzero(joint.any(1) | joint.any(0))
        return joint[np.ix_(present, present)], present
    code_a, code_b, values = _label_codes(a, b, low, high)
    n = len(values)
    return np.bincount(code_a.astype(np.int64) * n + code_b, minlength=n * n).reshape(n, n), values


def _label_codes(a, b, low, high):
    """Both label maps (flat) as codes ``0..n-1`` of their ids together, and the ids
    (``low``, ``high``: the smallest and largest id of both)."""
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
        joint, values = _joint_histogram(np.asarray(a).ravel(), np.asarray(b).ravel())
        keep = values != 0
        inter = np.diag(joint)[keep].astype(float)
        total = joint.sum(1)[keep] + joint.sum(0)[keep]
        scores.append(float(np.mean(2.0 * inter / total)) if keep.any() else math.nan)
    finite = [s for s in scores if math.isfinite(s)]
    return {"mean": float(np.mean(finite)) if finite else math.nan, "per_map": scores}
