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
results). The moving image is read through its corner table (`vtn_tf.spatial.sample_mapped`,
below :data:`TABLE_BYTES`), and the sampling and the two regularisers (:func:`regularisers`)
form their gradients in the forward pass. Deterministic on the CPU (no scatter ops).
"""

import contextlib
import dataclasses
import math
import time

import numpy as np
import tensorflow as tf

from vtn_tf import losses, preprocess, spatial

SIMILARITIES = ("ncc", "cc")
# "auto" refinement levels, coarse to fine, as multiples of the network grid's spacing, and the
# defaults below: chosen on the LPBA40 validation pairs S19 <- S25, S28, S33 (`make train-brain`
# model: one level at half resolution, 100 steps at rate 0.1, 0.689; 1/4, 1/3, 1/2 at 60 steps
# each, rate 0.3: 0.707 in a quarter of the time) and on hippocampus validation and training
# pairs (`make train-hippocampus` model), where smoothness 1 folded 2 % of the voxels and 2 kept
# it to 0.3 % (LPBA40: 0.704, folding 0.001 %). docs/results.md has the tables.
AUTO_LEVELS = (1.5, 1.0, 0.75)
# The largest moving-image corner table (`vtn_tf.spatial.corner_table`, 32 bytes a voxel of the
# level's moving grid) a level builds; beyond it (a full-resolution level of a 256^3 or larger
# scan) the level samples the image itself, 1.5x slower a step.
TABLE_BYTES = 2 ** 29


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


def coarsen(data, factor):
    """Box average of ``[X, Y, Z]`` over ``factor``^3 cells (edge cells averaged over what
    exists). Returns ``[ceil(X/f), ceil(Y/f), ceil(Z/f)]`` float32 (tf)."""
    return _coarsened(tf.convert_to_tensor(np.asarray(data, np.float32)), factor)


def _coarsened(volume, factor):
    """:func:`coarsen` of a tf ``[X, Y, Z]`` float32 (graph and XLA friendly: cell sums by a
    reshape; the cell counts are an outer product of three short vectors)."""
    if factor == 1:
        return volume
    sizes = [int(n) for n in volume.shape]
    cells = [-(-n // factor) for n in sizes]
    padded = tf.pad(volume, [[0, c * factor - n] for c, n in zip(cells, sizes)])
    sums = tf.reduce_sum(tf.reshape(padded, [cells[0], factor, cells[1], factor, cells[2], factor]), axis=(1, 3, 5))
    counts = [np.minimum(factor, n - factor * np.arange(c)).astype(np.float32) for c, n in zip(cells, sizes)]
    count = counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
    return sums / tf.constant(count)


def coarse_to_fine(factor, offset=(0, 0, 0)):
    """4x4 map from ``L`` indices to ``F`` indices (cells aligned; ``L``'s first cell starts at
    ``F`` index ``offset``)."""
    matrix = np.eye(4) * factor
    matrix[3, 3] = 1.0
    matrix[:3, 3] = (factor - 1) / 2.0 + np.asarray(offset, float)
    return matrix


def foreground_box(fixed, margin):
    """``(low, high)`` int arrays (high exclusive): the box of the voxels of ``fixed``
    ``[X, Y, Z]`` above 0, widened by ``margin`` voxels and clipped; the whole grid when
    nothing or everything is above 0."""
    box = preprocess.bounding_box(np.asarray(fixed) > 0, float(margin), (1.0, 1.0, 1.0))
    return box if box is not None else preprocess.full_box(np.shape(fixed))


def _grid(shape):
    axes = [tf.range(n, dtype=tf.float32) for n in shape]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def _points(matrix, points):
    """``matrix`` (4x4 numpy or tf float32) applied to ``points`` ``[..., 3]``."""
    matrix = tf.cast(matrix, tf.float32)
    return tf.tensordot(points, tf.transpose(matrix[:3, :3]), 1) + matrix[:3, 3]


ADAM = (0.9, 0.999, 1e-7)  # beta1, beta2, epsilon (Keras' defaults)


def _adam_loop(loss_of, x, m, v, t, count, rate, anneal=None):
    """``count`` Adam steps on ``x`` minimising ``loss_of(x, t)`` (``m``, ``v``: Adam's moments,
    ``t``: its step count, float, 0 before the first step; ``rate``: a scalar or one rate per
    entry of ``x``; ``anneal``: None, or the step count ``n`` over which the rate falls as
    ``rate (1 + cos(pi t / n)) / 2``). Returns the new ``(x, m, v, t)``, the loss at the first
    step and the loss before the last step (both before their steps' updates). Functional, for
    one XLA loop."""
    def step(k, x, m, v, t, first, _):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_of(x, t)
        first = tf.where(tf.equal(k, 0), loss, first)
        grad = tape.gradient(loss, x)
        scale = 1.0 if anneal is None else 0.5 * (1.0 + tf.cos(math.pi * tf.minimum(t / anneal, 1.0)))
        t = t + 1.0
        m = ADAM[0] * m + (1 - ADAM[0]) * grad
        v = ADAM[1] * v + (1 - ADAM[1]) * tf.square(grad)
        x = x - scale * rate * tf.sqrt(1 - ADAM[1] ** t) / (1 - ADAM[0] ** t) * m / (tf.sqrt(v) + ADAM[2])
        return k + 1, x, m, v, t, first, loss

    # an explicit loop: the compiled callers skip AutoGraph's source conversion (seconds per process)
    count = tf.cast(count, tf.int32)
    start = (tf.constant(0, tf.int32), x, m, v, t, tf.constant(0.0), tf.constant(0.0))
    _, x, m, v, t, first, loss = tf.while_loop(lambda k, *_: k < count, step, start)
    return x, m, v, t, first, loss


def forward_determinant(u):
    """``det(I + D u)`` with forward differences ``D``: ``u`` ``[X, Y, Z, 3]`` (voxels) ->
    ``[X-1, Y-1, Z-1]`` (tf), as `vtn_tf.metrics.forward_jacobian_determinant` counts folding."""
    base = u[:-1, :-1, :-1]
    return _cofactors([u[1:, :-1, :-1] - base, u[:-1, 1:, :-1] - base, u[:-1, :-1, 1:] - base])[1]


def _cofactors(columns):
    """``(C, det)`` of ``J = I + [columns]``: ``columns[a]`` ``[..., 3]`` the derivative of the
    displacement along axis ``a``, so ``J[k][a] = δ_ka + columns[a][..., k]``; ``C[k][a]`` the
    cofactor of ``J[k][a]`` (``d det / d J[k][a]``), ``det = Σ_a J[0][a] C[0][a]``."""
    J = [[columns[a][..., k] + (1.0 if a == k else 0.0) for a in range(3)] for k in range(3)]
    C = [[J[(k + 1) % 3][(a + 1) % 3] * J[(k + 2) % 3][(a + 2) % 3]
          - J[(k + 1) % 3][(a + 2) % 3] * J[(k + 2) % 3][(a + 1) % 3] for a in range(3)] for k in range(3)]
    return C, J[0][0] * C[0][0] + J[0][1] * C[0][1] + J[0][2] * C[0][2]


def smoothness(d):
    """:func:`vtn_tf.losses.total_variation_loss` of one field ``d`` ``[X, Y, Z, 3]`` (voxels):
    ``(1/3) Σ_axes mean ‖d(x + e_axis) − d(x)‖²``, a scalar, with its gradient written out
    (:func:`regularisers` without the folding term)."""
    return regularisers(d, 0.0, 1.0, 1.0)


def regularisers(u, aligned, factor, smooth, fold=None):
    """``smooth * smoothness((u - aligned) / factor) + fold * mean(relu(-det(I + D(u / factor))))``
    of a field ``u`` ``[X, Y, Z, 3]`` (voxels; ``D`` forward differences, :func:`forward_determinant`),
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
            C, determinant = _cofactors(columns)  # of J = d (x + u/factor) / d x
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


def _loss(u, fixed_image, moving_image, grid_fine, aligned, matrix, factor, weights, similarity, window):
    """Refinement loss of the field ``u`` ``[L..., 3]`` (fixed voxels) on the grid ``L``.

    ``fixed_image``: for ``"ncc"``, :func:`vtn_tf.losses.local_ncc_fixed_statistics` of the
    fixed image on ``L`` (computed once per refinement); for ``"cc"`` the image ``[1, L..., 1]``.
    ``moving_image``: the moving image on its level grid, ``[1, X', Y', Z', 1]``, or its
    `vtn_tf.spatial.corner_table` ``[X', Y', Z', 8]`` (:data:`TABLE_BYTES`).
    ``aligned``: ``[L..., 3]`` the initial alignment's own displacement at ``L``'s voxels (fixed
    voxels), which the smoothness term does not penalise."""
    if len(moving_image.shape) == 4:  # a corner table
        warped = spatial.sample_mapped(moving_image, grid_fine + u, matrix)[None, ..., None]
    else:
        warped = spatial.sample(moving_image, spatial.map_points(grid_fine + u, matrix)[None], "linear", "zero")
    if similarity == "ncc":
        value = losses.local_ncc_loss_to_fixed(fixed_image, warped, window)[0]
    else:
        value = losses.correlation_coefficient_loss(fixed_image, warped)[0]
    # (smoothness, folding) or (smoothness,): a static choice
    return value + regularisers(u, aligned, factor, weights[0], weights[1] if weights.shape[0] > 1 else None)


def _adam_steps_eager(u, m, v, t, count, rate, anneal, fixed_image, moving_image, grid_fine, aligned, matrix, factor,
                      weights, similarity, window):
    """``count`` Adam steps on the field ``u`` (``m``, ``v``: Adam's moments, ``t``: its step);
    returns the new ``(u, m, v, t)``, the loss at the first step and before the last."""
    return _adam_loop(lambda x, _: _loss(x, fixed_image, moving_image, grid_fine, aligned, matrix, factor, weights,
                                      similarity, window), u, m, v, t, count, rate, anneal)


_adam_steps = tf.function(_adam_steps_eager, jit_compile=True, autograph=False)  # one trace per grid size (static shapes)


def _axis_reads(matrix, out_shape, in_shape):
    """`vtn_tf.spatial.axis_reads` of each axis for an axis-aligned map.

    ``matrix``: 4x4 numpy, output index -> input index, a scaling and a shift per axis; output
    index ``i`` along axis ``a`` reads the input at ``matrix[a, a] i + matrix[a, 3]``.
    Returns three ``(lower, upper, weight)``, for ``out_shape`` from ``in_shape``."""
    matrix = np.asarray(matrix, np.float64)
    if np.count_nonzero(matrix[:3, :3] - np.diag(np.diag(matrix[:3, :3]))):
        raise ValueError("_axis_reads needs an axis-aligned map (a scaling and a shift per axis)")
    return tuple(spatial.axis_reads(matrix[a, a] * np.arange(int(out_shape[a])) + matrix[a, 3], int(in_shape[a]))
                 for a in range(3))


def _separable_resample(values, reads):
    """``values`` ``[a, b, c, C]`` read where :func:`_axis_reads` says: a linear interpolation
    along each axis in turn (the trilinear weights of an axis-aligned map are a product of
    per-axis ones), ``[X, Y, Z, C]``: two gathers of whole rows per axis instead of 8 gathers
    per output voxel."""
    for axis, read in enumerate(reads):
        values = spatial.lerp_axis(values, *read, axis)
    return values


@tf.function(jit_compile=True, autograph=False)
def _level_start(box, moving, flow, change, to_fine, start_reads, change_reads, alignment, factor, similarity,
                 window, table):
    """One level's inputs, in one compiled call (one trace per level and grid size).

    ``box``: ``[bx, by, bz]`` the fixed image's box ``B``; ``moving`` ``[X', Y', Z']``; ``flow``
    ``[X, Y, Z, 3]`` the network's field on ``F``; ``change``: the coarser level's change on its
    own grid ``[l..., 3]`` (None on the first level); ``to_fine``: 4x4 ``L`` -> ``F`` indices;
    ``start_reads``, ``change_reads``: :func:`_axis_reads` of ``to_fine`` on ``F`` and of ``L``
    -> the coarser level's indices on its grid; ``alignment``: ``K``; ``factor``: the level's
    (Python int); ``table``: whether to give the moving image as its corner table.
    Returns ``(fixed statistics or image, moving image [1, m..., 1] or its table [m..., 8],
    L's voxels as F indices, K's displacement there, the network's field there, the start u)``."""
    fixed_image = _coarsened(box, factor)[None, ..., None]
    moving_image = _coarsened(moving, factor)
    moving_image = spatial.corner_table(moving_image) if table else moving_image[None, ..., None]
    if similarity == "ncc":
        fixed_image = losses.local_ncc_fixed_statistics(fixed_image, window)
    grid = _grid([-(-int(n) // factor) for n in box.shape])  # L: ceil(B / factor) per axis
    grid_fine = _points(to_fine, grid)
    aligned = _points(alignment, grid_fine) - grid_fine
    start = _separable_resample(flow, start_reads)
    u = start if change is None else start + _separable_resample(change, change_reads)
    return fixed_image, moving_image, grid_fine, aligned, start, u


@tf.function(autograph=False)  # graph mode: 1.3x faster than XLA here (memory-bound gathers of whole rows)
def _finish_slab(flow, change, reads):
    """``flow`` ``[rows, Y, Z, 3]`` plus the last level's ``change`` brought onto those rows of
    ``F`` (``reads``: :func:`_axis_reads` of ``F`` -> that level's indices, axis 0 cut to the
    rows; edge-clamped trilinear), and the largest change there (voxels)."""
    upsampled = _separable_resample(change, reads)
    return flow + upsampled, tf.sqrt(tf.reduce_max(tf.reduce_sum(tf.square(upsampled), -1)))


def _finish(flow, change, reads):
    """:func:`_finish_slab` over `vtn_tf.registration`'s slabs of ``F``'s rows (at once, a
    512x512x400 grid's temporaries took 4.2 GB beside the field): the refined ``[X, Y, Z, 3]``
    and the largest change (voxels)."""
    from vtn_tf import registration  # registration imports this module lazily, as here

    parts, largest = [], []
    for rows in registration._slabs(flow.shape[:3]):
        along_x = tuple(read[rows.start:rows.stop] for read in reads[0])
        part, big = _finish_slab(flow[rows.start:rows.stop], change, (along_x,) + tuple(reads[1:]))
        parts.append(part)
        largest.append(big)
    return registration._joined(parts), tf.reduce_max(tf.stack(largest))


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
    low, high = foreground_box(fixed, max(settings.factors) + 1) if settings.crop else preprocess.full_box(fixed.shape)
    box = tf.constant(fixed[low[0]:high[0], low[1]:high[1], low[2]:high[2]])
    moving = tf.convert_to_tensor(np.asarray(moving, np.float32))
    weights = tf.constant([float(settings.smoothness)] + ([float(settings.folding)] if settings.folding else []))
    for factor, steps in zip(settings.factors, settings.level_steps):
        if steps == 0:
            continue
        if settings.seconds is not None and time.perf_counter() - began >= float(settings.seconds):
            break
        to_fine = coarse_to_fine(factor, low)
        shape = tuple(-(-int(n) // factor) for n in box.shape)  # L: ceil(B / factor) per axis
        change_reads = None if change is None else _axis_reads(
            np.linalg.inv(coarse_to_fine(previous, low)) @ to_fine, shape, change.shape[:3])
        # F index -> moving_low index: F -> world -> M -> moving_low (the moving grid coarsened from 0)
        matrix = np.linalg.inv(coarse_to_fine(factor)) @ np.linalg.inv(moving_affine) @ fixed_affine
        matrix = tf.constant(matrix[:3], tf.float32)
        table = 32 * np.prod([-(-int(n) // factor) for n in moving.shape]) <= TABLE_BYTES
        fixed_image, moving_image, grid_fine, aligned, start, u = _level_start(
            box, moving, flow, change, tf.constant(to_fine, tf.float32), _axis_reads(to_fine, shape, flow.shape[:3]),
            change_reads,
            tf.constant(alignment, tf.float32), factor, settings.similarity, int(settings.ncc_window), bool(table))
        m, v, t = tf.zeros_like(u), tf.zeros_like(u), tf.constant(0.0)
        anneal = tf.constant(float(steps)) if settings.anneal else None
        arguments = (tf.constant(float(settings.learning_rate)), anneal, fixed_image, moving_image, grid_fine, aligned, matrix,
                     tf.constant(float(factor)), weights, settings.similarity, int(settings.ncc_window))
        level_done, chunk, first, last = 0, 10, None, None
        while level_done < steps:
            if settings.seconds is not None and time.perf_counter() - began >= float(settings.seconds):
                break
            count = min(chunk, steps - level_done)
            u, m, v, t, loss_first, loss = _adam_steps(u, m, v, t, tf.constant(count), *arguments)
            if first is None:
                first = float(loss_first)
                history.append((done, first, time.perf_counter() - began))
            level_done += count
            done += count
            last = float(loss)
            history.append((done, last, time.perf_counter() - began))
            _progress(log, done, total, last)
        if first is None:  # the time budget ran out before this level's first step
            break
        summary.append(f"1/{factor} ({'x'.join(map(str, shape))}) {level_done} steps, loss {first:.4f} -> {last:.4f} "
                       "(before the last step)")
        change, previous = u - start, factor
    if change is None:
        return flow, history
    refined, largest = _finish(flow, change, _axis_reads(np.linalg.inv(coarse_to_fine(previous, low)), flow.shape[:3],
                                                         change.shape[:3]))
    log(f"refined {done} steps in {time.perf_counter() - began:.1f} s: {'; '.join(summary)}; largest change "
        f"{float(largest):.2f} voxels")
    return refined, history


# id(model) -> (optimizer, compiled step), for the life of the process (the step holds the model, so
# the id stays its own): traced once per model and network grid, reused by every pair of a batch.
_FINETUNE_STEPS = {}


def _finetune_step(model):
    """The compiled fine-tuning step of ``model`` and its optimizer (built once, reused)."""
    import keras

    key = id(model)
    if key not in _FINETUNE_STEPS:
        optimizer = keras.optimizers.Adam(1e-4)

        @tf.function(autograph=False)
        def step(fixed, moving, rate):
            optimizer.learning_rate.assign(rate)
            with tf.GradientTape() as tape:
                loss = model.loss_terms(fixed, moving, training=False)["loss"]
            optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            return loss

        _FINETUNE_STEPS[key] = (optimizer, step)
    return _FINETUNE_STEPS[key]


@contextlib.contextmanager
def finetuned(model, fixed, moving, steps, learning_rate, log=print):
    """Within the block, ``model``'s weights are fine-tuned on one pair; restored on leaving.

    ``steps`` Adam steps (rate ``learning_rate``, fresh moments) on the model's own training
    loss (`vtn_tf.model.VTN.loss_terms`: similarity, smoothness, the invertibility term when
    the model was trained with it) of ``fixed`` and ``moving``, ``[1, X, Y, Z, 1]`` on the
    network grid: uniGradICON's instance optimisation. The weights return to their loaded
    values when the block ends, error or not, so the next pair starts from the trained model.
    """
    if steps <= 0:
        yield model
        return
    saved = [variable.numpy() for variable in model.trainable_variables]
    optimizer, step = _finetune_step(model)
    fixed = tf.constant(np.asarray(fixed, np.float32))
    moving = tf.constant(np.asarray(moving, np.float32))
    try:
        began, first = time.perf_counter(), None
        for k in range(int(steps)):
            loss = float(step(fixed, moving, tf.constant(float(learning_rate))))
            first = loss if first is None else first
            if (k + 1) % 10 == 0 or k + 1 == steps:
                _progress(log, k + 1, int(steps), loss, "fine-tune")
        log(f"fine-tuned the network {steps} steps in {time.perf_counter() - began:.1f} s: training loss "
            f"{first:.4f} -> {loss:.4f}")
        yield model
    finally:
        for variable, value in zip(model.trainable_variables, saved):
            variable.assign(value)
        for variable in optimizer.variables:  # fresh moments and step count for the next pair
            variable.assign(tf.zeros_like(variable))


def _progress(log, done, total, loss, name="refine"):
    width = 20
    filled = int(math.floor(width * done / max(total, 1)))
    log(f"{name} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} loss {loss:.4f}")


# --- The affine search after the initialiser ------------------------------------------------
#
# The moment-based initialiser (`vtn_tf.alignment`) leaves rotations of several degrees where
# two brains' principal axes differ; the network's affine stage was trained on ±15° but corrects
# best what is small. A short intensity-based search, as the ANTs and elastix affine stages
# run, brings both pre-aligned and arbitrarily placed scans to the same optimum, so that the
# network sees the same input either way.

# (network-grid coarsening, share of the steps, rate scale, point stride). A point stride s > 1
# reads, at each step, one of the s^3 interleaved sub-lattices of the level's grid (every s-th
# voxel per axis, the offset cycling with the step count): each step costs 1/s^3 of the full
# grid's and every voxel is read once in s^3 steps, as the random sampling of elastix's
# optimisers; `docs/results.md` has the validation of the choice.
AFFINE_LEVELS = ((2, 0.7, 1.0, 2), (1, 0.3, 0.25, 2))
AFFINE_RATES = (0.004, 0.4)  # Adam rates: linear part (unitless per step), translation (mm per step)


def _affine_loss(params, fixed_image, world_points, centre, world_to_moving, moving_image):
    """``1 - r`` of the fixed network-grid image and the moving image read through the world
    transform ``W(p) = c + (I + D)(p - c) + t`` (``params`` = 9 entries of ``D``, then ``t`` mm).

    ``fixed_image`` ``[1, X, Y, Z, 1]`` and ``world_points`` ``[X, Y, Z, 3]`` (fixed RAS mm of
    its voxels)."""
    D = tf.reshape(params[:9], (3, 3))
    mapped = centre + tf.tensordot(world_points - centre, tf.transpose(tf.eye(3) + D), 1) + params[9:]
    positions = tf.tensordot(mapped, tf.transpose(world_to_moving[:3, :3]), 1) + world_to_moving[:3, 3]
    warped = spatial.sample(moving_image, positions[None], "linear", "zero")
    return losses.correlation_coefficient_loss(fixed_image, warped)[0]


def _affine_steps_eager(params, m, v, t, count, rates, fixed_images, points, centre, world_to_moving,
                        moving_image):
    """``count`` Adam steps of :func:`_affine_loss`; ``fixed_images`` ``[S, 1, x, y, z, 1]`` and
    ``points`` ``[S, x, y, z, 3]`` are :func:`_sublattices`, step ``t`` reading ``t mod S``."""
    def loss_of(x, step):
        k = tf.cast(tf.math.floormod(step, float(fixed_images.shape[0])), tf.int32)
        return _affine_loss(x, fixed_images[k], points[k], centre, world_to_moving, moving_image)

    return _adam_loop(loss_of, params, m, v, t, count, rates)


_affine_steps = tf.function(_affine_steps_eager, jit_compile=True, autograph=False)  # one trace per grid size
_affine_loss_compiled = tf.function(_affine_loss, jit_compile=True, autograph=False)  # before and after the search


def _sublattices(fixed_image, world_points, stride):
    """``fixed_image`` ``[1, X, Y, Z, 1]`` and ``world_points`` ``[X, Y, Z, 3]`` split into the
    ``stride^3`` sub-lattices ``[o0::s, o1::s, o2::s]`` (each cropped to the smallest one's
    shape), stacked: ``[S, 1, x, y, z, 1]``, ``[S, x, y, z, 3]`` (stride 1: the whole grid, S = 1)."""
    shape = [int(n) // stride for n in world_points.shape[:3]]
    images, points = [], []
    for o in np.ndindex(stride, stride, stride):
        index = tuple(slice(o[a], o[a] + stride * shape[a], stride) for a in range(3))
        images.append(fixed_image[(slice(None),) + index])
        points.append(world_points[index])
    return tf.stack(images), tf.stack(points)


@tf.function(autograph=False)
def _search_level(fixed_net, moving, to_world, factor, moving_factor, stride):
    """One level's inputs to the affine search, in one graph call: the fixed network-grid image
    coarsened by ``factor`` ``[1, x, y, z, 1]``, its voxels in RAS mm (``to_world``: 4x4 coarse
    index -> RAS mm) ``[x, y, z, 3]``, the moving image coarsened by ``moving_factor``
    ``[1, x', y', z', 1]``, and the first two as :func:`_sublattices` of ``stride``."""
    fixed_image = _coarsened(fixed_net, factor)[None, ..., None]
    world_points = _points(to_world, _grid(tuple(int(n) for n in fixed_image.shape[1:4])))
    moving_image = _coarsened(moving, moving_factor)[None, ..., None]
    return (fixed_image, world_points, moving_image) + _sublattices(fixed_image, world_points, stride)


def search_affine(fixed_net, net_to_world, moving, moving_affine, initial, steps=100, moving_spacing_factor=None):
    """Refine a world-space initial alignment by maximising the global correlation.

    Args:
      fixed_net: ``[X, Y, Z]`` the normalised fixed image on the network grid.
      net_to_world: 4x4 network-grid index -> fixed RAS mm (``A_f G``).
      moving: ``[X', Y', Z']`` the normalised moving image on its own grid.
      moving_affine: its 4x4 voxel -> RAS mm.
      initial: 4x4 ``T`` (fixed RAS point -> moving RAS point), the initialiser's.
      steps: Adam steps in all, shared by a half-resolution and a full network-grid level
        (:data:`AFFINE_LEVELS`); 0 returns ``initial``.
      moving_spacing_factor: box-average the moving image by this factor first (None: to
        about the network grid's spacing).
    Returns:
      ``(T', before, after)``: the refined 4x4 (``T' = T W``, ``W`` affine about the centre of
      the network box) and the correlation coefficient before and after, at full network grid.
    """
    fixed_net = np.asarray(fixed_net, np.float32)
    net_to_world = np.asarray(net_to_world, float)
    initial = np.asarray(initial, float)
    net_spacing = np.linalg.norm(net_to_world[:3, :3], axis=0)
    moving_spacing = np.linalg.norm(np.asarray(moving_affine, float)[:3, :3], axis=0)
    if moving_spacing_factor is None:
        moving_spacing_factor = max(1, int(np.floor(np.min(net_spacing) / np.max(moving_spacing))))
    centre = net_to_world @ np.append((np.asarray(fixed_net.shape) - 1) / 2.0, 1.0)
    params = tf.zeros(12)
    fixed_tf, moving_tf = tf.constant(fixed_net), tf.convert_to_tensor(np.asarray(moving, np.float32))
    centre_tf = tf.constant(centre[:3], tf.float32)

    strides, levels = {factor: stride for factor, _, _, stride in AFFINE_LEVELS}, {}

    def level_inputs(factor):  # built once per level (the full grid's also scores before and after)
        if factor not in levels:
            m_factor = moving_spacing_factor * factor
            world_to_moving = np.linalg.inv(coarse_to_fine(m_factor)) @ np.linalg.inv(moving_affine) @ initial
            levels[factor] = (_search_level(fixed_tf, moving_tf,
                                            tf.constant(net_to_world @ coarse_to_fine(factor), tf.float32),
                                            factor, m_factor, strides.get(factor, 1)),
                              tf.constant(world_to_moving, tf.float32))
        return levels[factor]

    (fixed_image, world_points, moving_full, *_), to_moving = level_inputs(1)
    full = (fixed_image, world_points, centre_tf, to_moving, moving_full)
    before = 1.0 - float(_affine_loss_compiled(params, *full))
    if steps <= 0:
        return initial, before, before
    rates = tf.constant([AFFINE_RATES[0]] * 9 + [AFFINE_RATES[1]] * 3, tf.float32)
    for factor, share, scale, _ in AFFINE_LEVELS:
        count = int(round(steps * share))
        if count <= 0:
            continue
        (_, _, moving_image, images, points), to_moving = level_inputs(factor)
        # Adam restarts at each level
        params = _affine_steps(params, tf.zeros(12), tf.zeros(12), tf.constant(0.0), tf.constant(count),
                               rates * scale, images, points, centre_tf, to_moving, moving_image)[0]
    after = 1.0 - float(_affine_loss_compiled(params, *full))
    if after <= before:  # never worse than the initialiser
        return initial, before, before
    p = params.numpy().astype(float)
    W = np.eye(4)
    W[:3, :3] = np.eye(3) + p[:9].reshape(3, 3)
    W[:3, 3] = centre[:3] - W[:3, :3] @ centre[:3] + p[9:]
    return initial @ W, before, after
