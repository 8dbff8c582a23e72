"""Adam in one XLA loop and the multi-resolution helpers shared by the refinement of the field
and the affine search: box-averaged coarsening, coarse-to-fine index maps, progress lines."""

import math

import numpy as np
import tensorflow as tf

ADAM = (0.9, 0.999, 1e-7)  # beta1, beta2, epsilon (Keras' defaults)


def adam_loop(loss_of, x, m, v, t, count, rate, anneal=None):
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


def coarsen(data, factor):
    """Box average of ``[X, Y, Z]`` over ``factor``^3 cells (edge cells averaged over what
    exists). Returns ``[ceil(X/f), ceil(Y/f), ceil(Z/f)]`` float32 (tf)."""
    return coarsened(tf.convert_to_tensor(np.asarray(data, np.float32)), factor)


def coarsened(volume, factor):
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


def progress(log, done, total, loss, name="refine"):
    width = 20
    filled = int(math.floor(width * done / max(total, 1)))
    log(f"{name} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} loss {loss:.4f}")
