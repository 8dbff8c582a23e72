"""The affine search after the initial alignment: a short intensity-based optimisation of the
world-space alignment on the network grid (global correlation), as the ANTs and elastix affine
stages run.

The moment-based initialiser (`vtn_tf.preprocessing.alignment`) leaves rotations of several
degrees where two brains' principal axes differ; the network's affine stage was trained on ±15°
but corrects best what is small. A short search brings both pre-aligned and arbitrarily placed
scans to the same optimum, so that the network sees the same input either way.
"""

import numpy as np
import tensorflow as tf

from vtn_tf.core import grids, sampling
from vtn_tf.nn import losses
from vtn_tf.registration.optimiser import adam_loop, coarse_to_fine, coarsened

# (network-grid coarsening, share of the steps, rate scale, point stride). A point stride s > 1
# reads, at each step, one of the s^3 interleaved sub-lattices of the level's grid (every s-th
# voxel per axis, the offset cycling with the step count): each step costs 1/s^3 of the full
# grid's and every voxel is read once in s^3 steps, as the random sampling of elastix's
# optimisers; `docs/results.md` has the validation of the choice.
AFFINE_LEVELS = ((2, 0.7, 1.0, 2), (1, 0.3, 0.25, 2))
AFFINE_RATES = (0.004, 0.4)  # Adam rates: linear part (unitless per step), translation (mm per step)


def affine_loss(params, fixed_image, world_points, centre, world_to_moving, moving_image):
    """``1 - r`` of the fixed network-grid image and the moving image read through the world
    transform ``W(p) = c + (I + D)(p - c) + t`` (``params`` = 9 entries of ``D``, then ``t`` mm).

    ``fixed_image`` ``[1, X, Y, Z, 1]`` and ``world_points`` ``[X, Y, Z, 3]`` (fixed RAS mm of
    its voxels)."""
    D = tf.reshape(params[:9], (3, 3))
    mapped = centre + tf.tensordot(world_points - centre, tf.transpose(tf.eye(3) + D), 1) + params[9:]
    positions = tf.tensordot(mapped, tf.transpose(world_to_moving[:3, :3]), 1) + world_to_moving[:3, 3]
    warped = sampling.sample(moving_image, positions[None], "linear", "zero")
    return losses.correlation_coefficient_loss(fixed_image, warped)[0]


def affine_steps_eager(params, m, v, t, count, rates, fixed_images, points, centre, world_to_moving,
                        moving_image):
    """``count`` Adam steps of :func:`affine_loss`; ``fixed_images`` ``[S, 1, x, y, z, 1]`` and
    ``points`` ``[S, x, y, z, 3]`` are :func:`sublattices`, step ``t`` reading ``t mod S``."""
    def loss_of(x, step):
        k = tf.cast(tf.math.floormod(step, float(fixed_images.shape[0])), tf.int32)
        return affine_loss(x, fixed_images[k], points[k], centre, world_to_moving, moving_image)

    return adam_loop(loss_of, params, m, v, t, count, rates)


affine_steps = tf.function(affine_steps_eager, jit_compile=True, autograph=False)  # one trace per grid size
affine_loss_compiled = tf.function(affine_loss, jit_compile=True, autograph=False)  # before and after the search


def sublattices(fixed_image, world_points, stride):
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
def search_level(fixed_net, moving, to_world, factor, moving_factor, stride):
    """One level's inputs to the affine search, in one graph call: the fixed network-grid image
    coarsened by ``factor`` ``[1, x, y, z, 1]``, its voxels in RAS mm (``to_world``: 4x4 coarse
    index -> RAS mm) ``[x, y, z, 3]``, the moving image coarsened by ``moving_factor``
    ``[1, x', y', z', 1]``, and the first two as :func:`sublattices` of ``stride``."""
    fixed_image = coarsened(fixed_net, factor)[None, ..., None]
    world_points = grids.map_points(grids.identity_grid(tuple(int(n) for n in fixed_image.shape[1:4])), to_world)
    moving_image = coarsened(moving, moving_factor)[None, ..., None]
    return (fixed_image, world_points, moving_image) + sublattices(fixed_image, world_points, stride)


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
            levels[factor] = (search_level(fixed_tf, moving_tf,
                                            tf.constant(net_to_world @ coarse_to_fine(factor), tf.float32),
                                            factor, m_factor, strides.get(factor, 1)),
                              tf.constant(world_to_moving, tf.float32))
        return levels[factor]

    (fixed_image, world_points, moving_full, *_), to_moving = level_inputs(1)
    full = (fixed_image, world_points, centre_tf, to_moving, moving_full)
    before = 1.0 - float(affine_loss_compiled(params, *full))
    if steps <= 0:
        return initial, before, before
    rates = tf.constant([AFFINE_RATES[0]] * 9 + [AFFINE_RATES[1]] * 3, tf.float32)
    for factor, share, scale, _ in AFFINE_LEVELS:
        count = int(round(steps * share))
        if count <= 0:
            continue
        (_, _, moving_image, images, points), to_moving = level_inputs(factor)
        # Adam restarts at each level
        params = affine_steps(params, tf.zeros(12), tf.zeros(12), tf.constant(0.0), tf.constant(count),
                               rates * scale, images, points, centre_tf, to_moving, moving_image)[0]
    after = 1.0 - float(affine_loss_compiled(params, *full))
    if after <= before:  # never worse than the initialiser
        return initial, before, before
    p = params.numpy().astype(float)
    W = np.eye(4)
    W[:3, :3] = np.eye(3) + p[:9].reshape(3, 3)
    W[:3, 3] = centre[:3] - W[:3, :3] @ centre[:3] + p[9:]
    return initial @ W, before, after
