"""vtn_tf.refine: instance optimisation lowers the loss and raises the overlap on a known pair."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from vtn_tf import metrics, refine


def blobs(shape, seed):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)  # texture for the local correlation
    return ((noise - noise.min()) / (noise.max() - noise.min())).astype(np.float32)


def test_refinement_lowers_the_loss_and_raises_the_overlap():
    shape = (40, 36, 32)
    fixed = blobs(shape, 0)
    # The moving image is the fixed one pulled through a known smooth displacement (scipy).
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    true = np.stack([2.0 * np.sin(grid[..., 1] / 7.0), 1.5 * np.cos(grid[..., 2] / 6.0),
                     np.full(shape, 1.0)], -1)
    # moving(x + true(x)) = fixed(x)  <=>  moving(y) = fixed(y - true) (approximately, smooth field)
    moving = ndimage.map_coordinates(fixed, np.moveaxis(grid - true, -1, 0), order=1, mode="nearest")
    labels_fixed = (fixed > 0.55).astype(np.int32)
    labels_moving = (moving > 0.55).astype(np.int32)
    start = np.zeros(shape + (3,), np.float32)
    settings = refine.RefineSettings(steps=80, learning_rate=0.1, resolution=0.5, smoothness=1.0)
    refined, history = refine.refine_field(fixed, np.eye(4), moving, np.eye(4), start, settings, log=lambda *_: None)
    refined = refined.numpy()
    assert history[-1][1] < history[0][1] - 0.05  # the loss went down
    def overlap(flow):
        warped = ndimage.map_coordinates(labels_moving, np.moveaxis(grid + flow, -1, 0), order=0, mode="nearest")
        return metrics.dice(labels_fixed, warped.astype(np.int32), [1])[1]
    before, after = overlap(start), overlap(refined)
    assert after > before + 0.05, (before, after)
    # The refined field moves towards the true one (error measured independently of the loss).
    inside = (slice(6, -6),) * 3
    assert np.abs(refined - true)[inside].mean() < 0.7 * np.abs(start - true)[inside].mean()
    assert np.mean(metrics.forward_jacobian_determinant(refined) <= 0) < 0.005


def test_settings_are_checked():
    with pytest.raises(ValueError, match="resolution"):
        refine.RefineSettings(resolution=0.0)
    with pytest.raises(ValueError, match="similarity"):
        refine.RefineSettings(similarity="mi")
    assert refine.RefineSettings(resolution=0.5).factor == 2 and refine.RefineSettings(resolution=1).factor == 1


def test_coarsen_is_the_cell_average():
    data = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    low = refine.coarsen(data, 2).numpy()
    assert low.shape == (3, 2, 2)
    np.testing.assert_allclose(low[0, 0, 0], data[:2, :2, :2].mean())
    np.testing.assert_allclose(low[2, 1, 1], data[4:, 2:, 2:].mean())  # edge cell: what exists
