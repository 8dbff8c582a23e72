"""The pair on the network grid: each image prepared as the model's training volumes were (its
input contract), the initial world-space alignment and the affine search."""

import concurrent.futures
import os

import numpy as np

from vtn_tf import io
from vtn_tf.preprocessing import alignment, preparation
from vtn_tf.registration import affine_search, kernels
from vtn_tf.registration.resampling import normalised, resample_through
from vtn_tf.registration.settings import INIT_STEPS


def prepare_image(volume, contract, role):
    """A volume on the network grid of its own crop box, normalised as the training volumes.

    Returns ``(on_grid, G, intensity_map)``: ``[X, Y, Z]`` float32 in [0, 1], the 4x4 map
    network index -> the volume's voxel index, and the fitted :class:`~vtn_tf.preparation.IntensityMap`.
    """
    box = preparation.crop_box(volume.data, volume.spacing, contract)
    if box is None:
        raise io.InputError(f"{role} {os.path.basename(volume.path)} has no foreground to crop "
                            f"around (no voxel above the threshold {contract.foreground_threshold})")
    G = preparation.grid_map(box, contract.grid)
    raw = resample_through(volume.data, G, contract.grid, "linear", "clamp")
    intensity_map, _ = preparation.fit_intensity(raw, contract)
    return intensity_map(raw), G, intensity_map


ALIGNMENT_STRIDE = 2  # the initialiser's moments use every second voxel per axis


def network_inputs(contract, fixed, moving, init, log, init_steps=INIT_STEPS):
    """Both images on the network grid (numpy ``[X, Y, Z]``), ``G``, ``T``, the fixed image's
    :class:`~vtn_tf.preparation.IntensityMap` and the normalised full-resolution moving image
    (for the affine search and refinement).

    ``T`` is the initialiser's (``init``, `vtn_tf.preprocessing.alignment`), then refined by ``init_steps``
    steps of the affine search on the network grid (global correlation); ``init="none"``
    trusts the headers: the identity, no search."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # numpy's percentiles and TF release the GIL
        moving_job = pool.submit(prepare_image, moving, contract, "moving image")
        fixed_net, G, fixed_map = prepare_image(fixed, contract, "fixed image")
        moving_map = moving_job.result()[2]
    moving_norm = normalised(moving.data, moving_map)
    # The initialiser reads every second voxel per axis: only those are normalised here.
    stride = np.diag([ALIGNMENT_STRIDE] * 3 + [1])
    fixed_sub = (fixed_map(fixed.data[::ALIGNMENT_STRIDE, ::ALIGNMENT_STRIDE, ::ALIGNMENT_STRIDE]),
                 fixed.affine @ stride)
    moving_sub = (moving_norm[::ALIGNMENT_STRIDE, ::ALIGNMENT_STRIDE, ::ALIGNMENT_STRIDE], moving.affine @ stride)

    moving_image = kernels.as_image(moving_norm)

    def on_grid(T):
        net_to_moving = np.linalg.inv(moving.affine) @ T @ fixed.affine @ G
        return resample_through(moving_image, net_to_moving, contract.grid, "linear", "zero")

    candidates = ("moments", "com") if init == "best" else (init,)
    best = None
    for mode in candidates:
        T, note = alignment.initial_alignment(*fixed_sub, *moving_sub, mode, stride=1)
        moving_net = on_grid(T)
        score = float(np.corrcoef(fixed_net.ravel(), moving_net.ravel())[0, 1]) if len(candidates) > 1 else 0.0
        if best is None or score > best[0]:
            best = (score, T, note, moving_net)
    _, T, note, moving_net = best
    if len(candidates) > 1:
        note += f" (best of {', '.join(candidates)} by correlation on the network grid)"
    log(note)
    if init_steps > 0 and init != "none":
        T, before, after = affine_search.search_affine(fixed_net, fixed.affine @ G, moving_norm, moving.affine, T,
                                                    init_steps)
        log(f"affine search ({init_steps} steps, global correlation on the network grid): "
            f"r {before:.3f} -> {after:.3f}")
        moving_net = on_grid(T)
    return fixed_net, moving_net, G, T, fixed_map, moving_norm
