"""Instance optimisation: refine the network's field on one pair, at (a fraction of) native resolution.

The cascade predicts its field on a coarse network grid (64^3 for the CPU-scale models, so
2.5-3 mm voxels on a brain). Starting from that field on the fixed image's grid, a
displacement is optimised on the pair itself with Adam, on the model's own similarity
(local or global correlation) plus the smoothness term (eq. 8), as the Learn2Reg leaders
and uniGradICON do after their networks.

Grids and units:

* ``F``: the fixed grid ``[X, Y, Z]``, affine ``A_f``. The field being refined is
  ``flow_voxels`` (`vtn_tf.registration`): ``[X, Y, Z, 3]``, voxels of ``F``, pulling; fixed
  voxel ``x`` corresponds to moving voxel ``A_m^-1 A_f (x + u(x))``.
* ``B``: the box of ``F`` that is refined, the fixed image's foreground (normalised
  intensity above 0) widened by the coarsest level's factor plus one voxel, low corner ``o``
  (the whole of ``F`` for an image without background, or with ``crop=False``). Outside
  ``B`` the change is the one at ``B``'s nearest border voxel (edge-clamped).
* ``L``: a refinement grid, ``B`` coarsened by ``factor = round(1 / resolution)`` per axis
  with voxel cells aligned (index ``l`` sits at fixed index ``o + factor * l + (factor - 1) / 2``).
  Both images are box-averaged onto ``L`` (the moving one on its own whole grid, coarsened the
  same way), and the displacement is optimised there, in voxels of ``F``.
* Levels, coarse to fine (a pyramid, as the ANTs and elastix multi-resolution schedules):
  each level starts from the network's field at its voxels plus the change the coarser
  levels made (trilinear), and runs its own Adam steps.
* The change the optimisation made is brought back to ``F`` by trilinear interpolation and
  added to the network's field, which keeps the network field's own fine detail.

Loss per step: ``similarity(fixed_L, moving_L(positions)) + smoothness * TV((u - a) / factor)
+ folding * mean(relu(-det(I + D(u / factor))))`` (TV in voxels of ``L``, the training loss's
units; ``a`` the initial alignment's own displacement ``K x - x``, so that a scan moved in its
header refines as the unmoved one; ``D`` forward differences, the folding measure of the
results). The moving image is read through its corner table (`vtn_tf.core.sampling.sample_mapped`,
below :data:`TABLE_BYTES`), and the sampling and the two regularisers (:func:`regularisers`)
form their gradients in the forward pass. Deterministic on the CPU (no scatter ops).
"""

import time

import numpy as np
import tensorflow as tf

from vtn_tf.core import fields, geometry, grids, sampling
from vtn_tf.nn import losses
from vtn_tf.preprocessing import preparation
from vtn_tf.registration import kernels
from vtn_tf.registration.optimiser import adam_loop, coarse_to_fine, coarsened, progress

# The largest moving-image corner table (`vtn_tf.core.sampling.corner_table`, 32 bytes a voxel of the
# level's moving grid) a level builds; beyond it (a full-resolution level of a 256^3 or larger
# scan) the level samples the image itself, at a slower step (docs/performance.md).
TABLE_BYTES = 2 ** 29


def foreground_box(fixed, margin):
    """``(low, high)`` int arrays (high exclusive): the box of the voxels of ``fixed``
    ``[X, Y, Z]`` above 0, widened by ``margin`` voxels and clipped; the whole grid when
    nothing or everything is above 0."""
    box = preparation.bounding_box(np.asarray(fixed) > 0, float(margin), (1.0, 1.0, 1.0))
    return box if box is not None else preparation.full_box(np.shape(fixed))


def smoothness(d):
    """:func:`vtn_tf.nn.losses.total_variation_loss` of one field ``d`` ``[X, Y, Z, 3]`` (voxels):
    ``(1/3) Σ_axes mean ‖d(x + e_axis) − d(x)‖²``, a scalar, with its gradient written out
    (:func:`regularisers` without the folding term)."""
    return regularisers(d, 0.0, 1.0, 1.0)


def regularisers(u, aligned, factor, smooth, fold=None):
    """``smooth * smoothness((u - aligned) / factor) + fold * mean(relu(-det(I + D(u / factor))))``
    of a field ``u`` ``[X, Y, Z, 3]`` (voxels; ``D`` forward differences,
    :func:`vtn_tf.core.fields.forward_jacobian_determinant`),
    a scalar, with its gradient with respect to ``u`` written out.

    Both terms are functions of the forward differences ``D_a`` along each axis, so the gradient
    is one transpose: ``(1/factor) Σ_a D_a^T G_a`` with ``G_a`` the derivative with respect to
    ``D_a``: ``2 smooth D_a((u - a)/factor) / (3 count_a)`` from the smoothness term (``count_a``
    its differences along ``a``) plus, where the determinant is negative, ``-fold / n`` times the
    cofactors of column ``a`` of the Jacobian ``I + D(u/factor)`` (``n`` the voxels of
    ``[X-1, Y-1, Z-1]``). Formed in the forward pass from the same differences: about half
    the time of automatic differentiation under XLA (`benchmarks/bench_refine.py`).
    ``fold`` None (a static choice): no folding term (nor on a grid one voxel thick).
    """
    shape = [int(n) for n in u.shape[:3]]

    @tf.custom_gradient
    def value_and_gradient(u):
        d = u / factor
        s = (u - aligned) / factor
        value, parts, columns = 0.0, [], []
        for axis in range(3):
            n = shape[axis]
            upper, lower = [slice(None)] * 4, [slice(None)] * 4
            upper[axis], lower[axis] = slice(1, n), slice(0, n - 1)
            count = float(np.prod(shape) // n * (n - 1))
            diff = s[tuple(upper)] - s[tuple(lower)]
            value += smooth * tf.reduce_sum(tf.square(diff)) / (3.0 * count) if n > 1 else 0.0
            parts.append((2.0 * smooth / (3.0 * count)) * diff if n > 1 else None)
            if fold is not None and min(shape) > 1:  # d u / d axis on the [X-1, Y-1, Z-1] cells
                cells = tuple(slice(None) if b == axis else slice(0, shape[b] - 1) for b in range(3))
                columns.append((d[tuple(upper)] - d[tuple(lower)])[cells])
        if columns:
            C, determinant = fields.cofactors(columns)  # of J = d (x + u/factor) / d x
            cells = float(np.prod([n - 1 for n in shape]))
            value += fold * tf.reduce_sum(tf.nn.relu(-determinant)) / cells
            negative = tf.cast(determinant < 0.0, tf.float32) * (-fold / cells)
            for axis in range(3):
                cofactors = tf.stack([negative * C[k][axis] for k in range(3)], -1)
                cofactors = tf.pad(cofactors, [[0, 0] if b == axis else [0, 1] for b in range(3)] + [[0, 0]])
                parts[axis] = cofactors if parts[axis] is None else parts[axis] + cofactors
        grad = tf.zeros_like(u)
        for axis, part in enumerate(parts):
            if part is None:
                continue
            before, after = [[0, 0]] * 4, [[0, 0]] * 4
            before[axis], after[axis] = [1, 0], [0, 1]
            grad += tf.pad(part, before) - tf.pad(part, after)
        return value, lambda upstream: upstream * grad / factor

    return value_and_gradient(u)


def refinement_loss(u, fixed_image, moving_image, grid_fine, aligned, matrix, factor, weights, similarity, window):
    """Refinement loss of the field ``u`` ``[L..., 3]`` (fixed voxels) on the grid ``L``.

    ``fixed_image``: for ``"ncc"``, :func:`vtn_tf.nn.losses.local_ncc_fixed_statistics` of the
    fixed image on ``L`` (computed once per refinement); for ``"cc"`` the image ``[1, L..., 1]``.
    ``moving_image``: the moving image on its level grid, ``[1, X', Y', Z', 1]``, or its
    `vtn_tf.core.sampling.corner_table` ``[X', Y', Z', 8]`` (:data:`TABLE_BYTES`).
    ``aligned``: ``[L..., 3]`` the initial alignment's own displacement at ``L``'s voxels (fixed
    voxels), which the smoothness term does not penalise."""
    if len(moving_image.shape) == 4:  # a corner table
        warped = sampling.sample_mapped(moving_image, grid_fine + u, matrix)[None, ..., None]
    else:
        warped = sampling.sample(moving_image, grids.map_points(grid_fine + u, matrix)[None], "linear", "zero")
    if similarity == "ncc":
        value = losses.local_ncc_loss_to_fixed(fixed_image, warped, window)[0]
    else:
        value = losses.correlation_coefficient_loss(fixed_image, warped)[0]
    # (smoothness, folding) or (smoothness,): a static choice
    return value + regularisers(u, aligned, factor, weights[0], weights[1] if weights.shape[0] > 1 else None)


def adam_steps_eager(u, m, v, t, count, rate, anneal, fixed_image, moving_image, grid_fine, aligned, matrix, factor,
                      weights, similarity, window):
    """``count`` Adam steps on the field ``u`` (``m``, ``v``: Adam's moments, ``t``: its step);
    returns the new ``(u, m, v, t)``, the loss at the first step and before the last."""
    def loss_of(x, _):
        return refinement_loss(x, fixed_image, moving_image, grid_fine, aligned, matrix, factor, weights, similarity,
                               window)

    return adam_loop(loss_of, u, m, v, t, count, rate, anneal)


adam_steps = tf.function(adam_steps_eager, jit_compile=True, autograph=False)  # one trace per grid size (static shapes)


def axis_reads_of(matrix, out_shape, in_shape):
    """`vtn_tf.core.grids.axis_reads` of each axis for an axis-aligned map.

    ``matrix``: 4x4 numpy, output index -> input index, a scaling and a shift per axis; output
    index ``i`` along axis ``a`` reads the input at ``matrix[a, a] i + matrix[a, 3]``.
    Returns three ``(lower, upper, weight)``, for ``out_shape`` from ``in_shape``."""
    matrix = np.asarray(matrix, np.float64)
    if np.count_nonzero(matrix[:3, :3] - np.diag(np.diag(matrix[:3, :3]))):
        raise ValueError("axis_reads_of needs an axis-aligned map (a scaling and a shift per axis)")
    return tuple(grids.axis_reads(matrix[a, a] * np.arange(int(out_shape[a])) + matrix[a, 3], int(in_shape[a]))
                 for a in range(3))


def separable_resample(values, reads):
    """``values`` ``[a, b, c, C]`` read where :func:`axis_reads_of` says: a linear interpolation
    along each axis in turn (the trilinear weights of an axis-aligned map are a product of
    per-axis ones), ``[X, Y, Z, C]``: two gathers of whole rows per axis instead of 8 gathers
    per output voxel."""
    for axis, read in enumerate(reads):
        values = grids.lerp_axis(values, *read, axis)
    return values


@tf.function(jit_compile=True, autograph=False)
def level_start(box, moving, flow, change, to_fine, start_reads, change_reads, alignment, factor, similarity,
                 window, table):
    """One level's inputs, in one compiled call (one trace per level and grid size).

    ``box``: ``[bx, by, bz]`` the fixed image's box ``B``; ``moving`` ``[X', Y', Z']``; ``flow``
    ``[X, Y, Z, 3]`` the network's field on ``F``; ``change``: the coarser level's change on its
    own grid ``[l..., 3]`` (None on the first level); ``to_fine``: 4x4 ``L`` -> ``F`` indices;
    ``start_reads``, ``change_reads``: :func:`axis_reads_of` of ``to_fine`` on ``F`` and of ``L``
    -> the coarser level's indices on its grid; ``alignment``: ``K``; ``factor``: the level's
    (Python int); ``table``: whether to give the moving image as its corner table.
    Returns ``(fixed statistics or image, moving image [1, m..., 1] or its table [m..., 8],
    L's voxels as F indices, K's displacement there, the network's field there, the start u)``."""
    fixed_image = coarsened(box, factor)[None, ..., None]
    moving_image = coarsened(moving, factor)
    moving_image = sampling.corner_table(moving_image) if table else moving_image[None, ..., None]
    if similarity == "ncc":
        fixed_image = losses.local_ncc_fixed_statistics(fixed_image, window)
    grid = grids.identity_grid([-(-int(n) // factor) for n in box.shape])  # L: ceil(B / factor) per axis
    grid_fine = grids.map_points(grid, to_fine)
    aligned = grids.map_points(grid_fine, alignment) - grid_fine
    start = separable_resample(flow, start_reads)
    u = start if change is None else start + separable_resample(change, change_reads)
    return fixed_image, moving_image, grid_fine, aligned, start, u


@tf.function(autograph=False)  # graph mode: faster than XLA for these memory-bound gathers of whole rows
def finish_slab(flow, change, reads):
    """``flow`` ``[rows, Y, Z, 3]`` plus the last level's ``change`` brought onto those rows of
    ``F`` (``reads``: :func:`axis_reads_of` of ``F`` -> that level's indices, axis 0 cut to the
    rows; edge-clamped trilinear), and the largest change there (voxels)."""
    upsampled = separable_resample(change, reads)
    return flow + upsampled, tf.sqrt(tf.reduce_max(tf.reduce_sum(tf.square(upsampled), -1)))


def finish(flow, change, reads):
    """:func:`finish_slab` over the slabs of ``F``'s rows (`vtn_tf.registration.kernels.slabs`,
    which bound the temporaries beside the field): the refined ``[X, Y, Z, 3]`` and the largest
    change (voxels)."""
    parts, largest = [], []
    for rows in kernels.slabs(flow.shape[:3]):
        along_x = tuple(read[rows.start:rows.stop] for read in reads[0])
        part, big = finish_slab(flow[rows.start:rows.stop], change, (along_x,) + tuple(reads[1:]))
        parts.append(part)
        largest.append(big)
    return kernels.joined(parts), tf.reduce_max(tf.stack(largest))


def refine_field(fixed, fixed_affine, moving, moving_affine, flow_voxels, settings, log=print, alignment=None):
    """Optimise ``flow_voxels`` on the pair; returns ``(refined [X, Y, Z, 3] tf float32, history)``.

    Coarse to fine: ``settings.level_steps`` Adam steps on the levels of
    ``settings.resolution`` (explicit: :meth:`RefineSettings.resolved`); Adam restarts on each,
    and the change found on a coarser grid is interpolated onto the next.

    Args:
      fixed: ``[X, Y, Z]`` normalised fixed image (the network's intensities), grid ``F``.
      fixed_affine, moving_affine: 4x4 voxel -> RAS mm.
      moving: ``[X', Y', Z']`` normalised moving image on its own grid.
      flow_voxels: ``[X, Y, Z, 3]`` (tf or numpy) float32, voxels of ``F``, pulling (the start).
      settings: :class:`RefineSettings`.
      log: receives progress bar lines and a summary line.
      alignment: 4x4 ``K``, the initial alignment as a map of ``F`` indices (``x -> K x``, i.e.
        ``A_f^-1 T A_f``; None: the identity). The smoothness term penalises the field minus
        ``K``'s own displacement ``K x - x``, so a rigid or affine move of the moving scan in its
        header, which ``K`` absorbs, changes nothing (as ANTs regularises SyN after its affine
        stage).
    Returns:
      the refined field (same shape, units and direction) and a list of
      ``(step, loss, seconds)`` checkpoints: each level's loss at its start, then after every
      10 steps and the level's last (the loss before the last of those steps); ``step``
      counts over all levels, each level's losses on its own grid.
    """
    flow = tf.convert_to_tensor(flow_voxels, tf.float32)
    alignment = np.eye(4) if alignment is None else np.asarray(alignment, float)
    began, history, done = time.perf_counter(), [], 0
    total = sum(settings.level_steps)
    change, previous, summary = None, None, []
    fixed = np.asarray(fixed, np.float32)
    low, high = foreground_box(fixed, max(settings.factors) + 1) if settings.crop else preparation.full_box(fixed.shape)
    box = tf.constant(fixed[low[0]:high[0], low[1]:high[1], low[2]:high[2]])
    moving = tf.convert_to_tensor(np.asarray(moving, np.float32))
    weights = tf.constant([float(settings.smoothness)] + ([float(settings.folding)] if settings.folding else []))
    for factor, steps in zip(settings.factors, settings.level_steps):
        if steps == 0:
            continue
        if settings.seconds is not None and time.perf_counter() - began >= float(settings.seconds):
            break
        shape, start, u, arguments = level_inputs(box, low, moving, flow, change, previous, factor, alignment,
                                                  geometry.voxel_map(fixed_affine, moving_affine), weights, settings)
        u, level_done, done, first, last = run_level(u, arguments, steps, settings, began, done, total, history, log)
        if first is None:  # the time budget ran out before this level's first step
            break
        summary.append(f"1/{factor} ({'x'.join(map(str, shape))}) {level_done} steps, loss {first:.4f} -> {last:.4f} "
                       "(before the last step)")
        change, previous = u - start, factor
    if change is None:
        return flow, history
    refined, largest = finish(flow, change, axis_reads_of(np.linalg.inv(coarse_to_fine(previous, low)), flow.shape[:3],
                                                         change.shape[:3]))
    log(f"refined {done} steps in {time.perf_counter() - began:.1f} s: {'; '.join(summary)}; largest change "
        f"{float(largest):.2f} voxels")
    return refined, history


def level_inputs(box, low, moving, flow, change, previous, factor, alignment, fixed_to_moving, weights, settings):
    """One level's grid ``L`` (its shape), the network's field there (``start``), the field the
    level starts from (``u``: ``start`` plus the coarser level's ``change``) and the arguments
    of :func:`adam_steps` after the Adam state (the annealing left to :func:`run_level`)."""
    to_fine = coarse_to_fine(factor, low)
    shape = tuple(-(-int(n) // factor) for n in box.shape)  # L: ceil(B / factor) per axis
    change_reads = None if change is None else axis_reads_of(
        np.linalg.inv(coarse_to_fine(previous, low)) @ to_fine, shape, change.shape[:3])
    # F index -> moving_low index: F -> world -> M -> moving_low (the moving grid coarsened from 0)
    matrix = np.linalg.inv(coarse_to_fine(factor)) @ fixed_to_moving
    matrix = tf.constant(matrix[:3], tf.float32)
    table = 32 * np.prod([-(-int(n) // factor) for n in moving.shape]) <= TABLE_BYTES
    fixed_image, moving_image, grid_fine, aligned, start, u = level_start(
        box, moving, flow, change, tf.constant(to_fine, tf.float32), axis_reads_of(to_fine, shape, flow.shape[:3]),
        change_reads, tf.constant(alignment, tf.float32), factor, settings.similarity, int(settings.window),
        bool(table))
    arguments = (fixed_image, moving_image, grid_fine, aligned, matrix, tf.constant(float(factor)), weights,
                 settings.similarity, int(settings.window))
    return shape, start, u, arguments


def run_level(u, arguments, steps, settings, began, done, total, history, log):
    """``steps`` Adam steps on one level, 10 at a time, within the time budget. Returns the
    field, the level's steps, the steps over all levels, and the loss at the level's first step
    and before its last (None, None when the budget ran out before the first)."""
    m, v, t = tf.zeros_like(u), tf.zeros_like(u), tf.constant(0.0)
    anneal = tf.constant(float(steps)) if settings.anneal else None
    rate = tf.constant(float(settings.rate))
    level_done, chunk, first, last = 0, 10, None, None
    while level_done < steps:
        if settings.seconds is not None and time.perf_counter() - began >= float(settings.seconds):
            break
        count = min(chunk, steps - level_done)
        u, m, v, t, loss_first, loss = adam_steps(u, m, v, t, tf.constant(count), rate, anneal, *arguments)
        if first is None:
            first = float(loss_first)
            history.append((done, first, time.perf_counter() - began))
        level_done += count
        done += count
        last = float(loss)
        history.append((done, last, time.perf_counter() - began))
        progress(log, done, total, last)
    return u, level_done, done, first, last
