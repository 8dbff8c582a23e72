"""vtn_tf.registration.refinement: instance optimisation lowers the loss and raises the overlap on a known pair."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from vtn_tf.core import fields, metrics
from vtn_tf.registration import affine_search, finetune, kernels, optimiser, refinement
from vtn_tf.registration.settings import RefineSettings


def blobs(shape, seed):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)  # texture for the local correlation
    return ((noise - noise.min()) / (noise.max() - noise.min())).astype(np.float32)


@pytest.mark.parametrize("resolution,pad,table", [(0.5, 0, True), ((0.25, 0.5), 0, True), ((0.25, 0.5), 9, True),
                                                 (0.5, 0, False)],
                         ids=["one-level", "coarse-to-fine", "in-a-background", "no-corner-table"])
def test_refinement_lowers_the_loss_and_raises_the_overlap(resolution, pad, table, monkeypatch):
    # pad: the textured volume sits in a zero background this wide, which the refinement crops;
    # table: whether the moving image is read through its corner table (else sampled itself)
    if not table:
        monkeypatch.setattr(refinement, "TABLE_BYTES", 0)
    fixed = np.pad(blobs((40, 36, 32), 0), pad)
    shape = fixed.shape
    # The moving image is the fixed one pulled through a known smooth displacement (scipy).
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    true = np.stack([2.0 * np.sin(grid[..., 1] / 7.0), 1.5 * np.cos(grid[..., 2] / 6.0),
                     np.full(shape, 1.0)], -1)
    # moving(x + true(x)) = fixed(x)  <=>  moving(y) = fixed(y - true) (approximately, smooth field)
    moving = ndimage.map_coordinates(fixed, np.moveaxis(grid - true, -1, 0), order=1, mode="nearest")
    labels_fixed = (fixed > 0.55).astype(np.int32)
    labels_moving = (moving > 0.55).astype(np.int32)
    start = np.zeros(shape + (3,), np.float32)
    settings = RefineSettings(steps=80, rate=0.1, resolution=resolution, smoothness=1.0)
    lines = []
    refined, history = refinement.refine_field(fixed, np.eye(4), moving, np.eye(4), start, settings, log=lines.append)
    refined = refined.numpy()
    assert history[-1][0] == 80 * len(settings.factors)
    # the finest level's grid: the foreground box (40x36x32 widened by 4 + 1 voxels), halved
    box = [min(n + 2 * 5, n + 2 * pad) if pad else n for n in (40, 36, 32)]
    assert f"1/2 ({'x'.join(str(-(-n // 2)) for n in box)})" in lines[-1], lines[-1]
    if len(settings.factors) == 1:  # the loss went down (levels' losses are on different grids)
        assert history[-1][1] < history[0][1] - 0.05
    def overlap(flow):
        warped = ndimage.map_coordinates(labels_moving, np.moveaxis(grid + flow, -1, 0), order=0, mode="nearest")
        return metrics.dice(labels_fixed, warped.astype(np.int32), [1])[1]
    before, after = overlap(start), overlap(refined)
    assert after > before + 0.05, (before, after)
    # The refined field moves towards the true one (error measured independently of the loss).
    inside = (slice(6 + pad, -6 - pad),) * 3
    assert np.abs(refined - true)[inside].mean() < 0.7 * np.abs(start - true)[inside].mean()
    assert np.mean(metrics.forward_jacobian_determinant(refined) <= 0) < 0.005


def test_steps_per_level():
    """One step count per level (ANTs' 100x70x50 schedules); a level with 0 steps is skipped."""
    image = blobs((20, 18, 16), 5)
    moving = np.roll(image, 1, axis=0)
    settings = RefineSettings(steps=(0, 7, 3), resolution=(0.25, 0.5, 1.0))
    assert settings.level_steps == (0, 7, 3) and settings.active
    lines = []
    _, history = refinement.refine_field(image, np.eye(4), moving, np.eye(4), np.zeros((20, 18, 16, 3), np.float32),
                                     settings, log=lines.append)
    assert history[-1][0] == 10 and "1/4" not in lines[-1] and "1/2 (10x9x8) 7 steps" in lines[-1]
    assert "1/1 (20x18x16) 3 steps" in lines[-1]
    assert not RefineSettings(steps=(0, 0), resolution=(0.5, 1.0)).active
    with pytest.raises(ValueError, match="2 levels"):
        RefineSettings(steps=(5, 5), resolution=(0.25, 0.5, 1.0))
    # auto levels take the finest counts: 1/2 and 1 on 64^3 crops
    assert RefineSettings(steps=(60, 60, 20)).resolved([1.0] * 3).level_steps == (60, 20)
    with pytest.raises(ValueError, match="auto levels"):
        RefineSettings(steps=(60,)).resolved([2.5, 3.0, 2.5])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="resolution"):
        RefineSettings(resolution=0.0)
    with pytest.raises(ValueError, match="similarity"):
        RefineSettings(similarity="mi")
    assert RefineSettings(resolution=0.5).factors == (2,) and RefineSettings(resolution=1).factors == (1,)
    assert RefineSettings(resolution=(1 / 3, 0.5)).factors == (3, 2)
    with pytest.raises(ValueError, match="coarse to fine"):
        RefineSettings(resolution=(0.5, 0.25))


def test_auto_levels_follow_the_network_grid_spacing():
    # A 160x192x160 brain on a 64^3 network grid: network voxels of 2.5, 3, 2.5 fixed voxels.
    assert RefineSettings().resolved([2.5, 3.0, 2.5]).factors == (4, 3, 2)
    # 64^3 crops on a 64^3 network grid: never finer than the fixed grid.
    assert RefineSettings().resolved([1.0, 1.0, 1.0]).factors == (2, 1)
    assert RefineSettings(resolution=0.5).resolved([1.0] * 3).factors == (2,)  # explicit levels kept
    with pytest.raises(ValueError, match="network grid"):
        _ = RefineSettings().factors


def test_coarsen_is_the_cell_average():
    data = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    low = optimiser.coarsen(data, 2).numpy()
    assert low.shape == (3, 2, 2)
    np.testing.assert_allclose(low[0, 0, 0], data[:2, :2, :2].mean())
    np.testing.assert_allclose(low[2, 1, 1], data[4:, 2:, 2:].mean())  # edge cell: what exists


def scipy_read(values, matrix, out_shape):
    """``values`` ``[a, b, c, C]`` at ``matrix`` (4x4) of each output index, order-1 with the
    positions clamped to the grid (edge clamping)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in out_shape], indexing="ij"), 0).reshape(3, -1).astype(float)
    positions = np.clip(matrix[:3, :3] @ index + matrix[:3, 3:], 0, np.array(values.shape[:3])[:, None] - 1)
    return np.stack([ndimage.map_coordinates(values[..., c].astype(float), positions, order=1, mode="nearest")
                     for c in range(values.shape[-1])], -1).reshape(tuple(out_shape) + (values.shape[-1],))


@pytest.mark.parametrize("factor,previous", [(1, 2), (2, 3), (3, 6), (None, 2), (None, 1)],
                         ids=["1/2->1", "1/3->1/2", "1/6->1/3", "1/2->F", "1->F"])
def test_level_maps_read_the_coarser_grid_as_scipy_does(factor, previous):
    # A level's voxels in the coarser level's grid (cells aligned on the box's corner low), or
    # (factor None) every voxel of the fixed grid F in the last level's: one linear
    # interpolation per axis against scipy's order-1 map_coordinates at the same positions.
    rng = np.random.default_rng(previous)
    box, low, full = np.array([17, 12, 9]), np.array([3, 1, 2]), (22, 15, 13)
    coarse = [-(-int(n) // previous) for n in box]
    values = rng.normal(size=coarse + [3]).astype(np.float32)
    if factor is None:
        matrix, out_shape = np.linalg.inv(optimiser.coarse_to_fine(previous, low)), full
    else:
        matrix = np.linalg.inv(optimiser.coarse_to_fine(previous, low)) @ optimiser.coarse_to_fine(factor, low)
        out_shape = [-(-int(n) // factor) for n in box]
    reads = refinement.axis_reads_of(matrix, out_shape, coarse)
    got = refinement.separable_resample(tf.constant(values), reads).numpy()
    assert got.shape == tuple(out_shape) + (3,)
    np.testing.assert_allclose(got, scipy_read(values, matrix, out_shape), atol=1e-5)


def test_the_finish_in_slabs_adds_the_change_read_as_scipy_does(monkeypatch):
    """The last level's change brought onto F and added to the field, in slabs of F's rows
    (a ragged last one): scipy's order-1 map_coordinates of the change plus the field, and the
    largest change's length."""
    monkeypatch.setattr(kernels, "SLAB_VOXELS", 4 * 15 * 13)
    rng = np.random.default_rng(7)
    low, full, previous = np.array([3, 1, 2]), (22, 15, 13), 2
    coarse = [-(-int(n) // previous) for n in (17, 12, 9)]
    change = rng.normal(size=coarse + [3]).astype(np.float32)
    flow = rng.normal(size=full + (3,)).astype(np.float32)
    matrix = np.linalg.inv(optimiser.coarse_to_fine(previous, low))
    reads = refinement.axis_reads_of(matrix, full, coarse)
    refined, largest = refinement.finish(tf.constant(flow), tf.constant(change), reads)
    expected = scipy_read(change, matrix, full)
    np.testing.assert_allclose(refined.numpy(), flow + expected, atol=1e-5)
    np.testing.assert_allclose(float(largest), np.linalg.norm(expected, axis=-1).max(), rtol=1e-5)


def test_axis_reads_refuse_a_rotation():
    rotation = np.eye(4)
    rotation[:2, :2] = [[0, -1], [1, 0]]
    with pytest.raises(ValueError, match="axis-aligned"):
        refinement.axis_reads_of(rotation, (4, 4, 4), (4, 4, 4))


def test_affine_search_recovers_a_known_header_move():
    """The moving file holds the fixed image's voxels under a header moved by a known rigid
    transform M (world): fixed point p shows the same anatomy as moving point M p, so the
    search, started from the identity, must return T = M (measured on points of the volume)."""
    from vtn_tf.preprocessing import alignment

    shape = (40, 36, 32)
    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    centre = (np.array(shape) - 1) / 2
    body = np.exp(-np.sum(((grid - centre) / [14.0, 10.0, 7.0]) ** 2, -1))  # anisotropic: axes defined
    image = (body * (0.6 + 0.4 * ndimage.gaussian_filter(rng.normal(size=shape), 2.0))).astype(np.float32)
    fixed_affine = np.diag([2.0, 2.0, 2.5, 1.0])
    fixed_affine[:3, 3] = [-40.0, -30.0, 10.0]
    M = np.eye(4)
    M[:3, :3] = alignment.rotation_about([0.3, -0.5, 1.0], 8.0)
    world_centre = fixed_affine[:3, :3] @ centre + fixed_affine[:3, 3]
    M[:3, 3] = world_centre - M[:3, :3] @ world_centre + [4.0, -3.0, 2.0]
    net_to_world = fixed_affine  # the network grid is the fixed grid here
    T, before, after = affine_search.search_affine(image, net_to_world, image, M @ fixed_affine, np.eye(4), steps=300,
                                            moving_spacing_factor=1)
    assert after > before
    points = fixed_affine @ np.concatenate([grid[body > 0.3].T, np.ones((1, int((body > 0.3).sum())))])
    error = np.linalg.norm((T @ points - M @ points)[:3], axis=0)
    start = np.linalg.norm((points - M @ points)[:3], axis=0)
    assert np.sqrt(np.mean(error ** 2)) < 0.5, (np.sqrt(np.mean(error ** 2)), np.sqrt(np.mean(start ** 2)))


def test_sublattices_read_every_voxel_once_with_its_own_point():
    """The search's strided level: the s^3 interleaved sub-lattices of a grid whose sides s
    divides hold every voxel exactly once, each beside its own world point (numpy indexing)."""
    shape, stride = (6, 4, 8), 2
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    points = grid * [2.0, 3.0, 1.5] + [10.0, -5.0, 1.0]
    images, lattice_points = affine_search.sublattices(tf.constant(image[None, ..., None]), tf.constant(points), stride)
    assert images.shape == (8, 1, 3, 2, 4, 1) and lattice_points.shape == (8, 3, 2, 4, 3)
    np.testing.assert_array_equal(np.sort(images.numpy().ravel()), image.ravel())
    for k, offset in enumerate(np.ndindex(2, 2, 2)):
        expected = image[offset[0]::2, offset[1]::2, offset[2]::2]
        np.testing.assert_array_equal(images[k, 0, ..., 0].numpy(), expected)
        np.testing.assert_allclose(lattice_points[k].numpy(), points[offset[0]::2, offset[1]::2, offset[2]::2])


def test_affine_search_with_no_steps_keeps_the_start():
    image = blobs((16, 16, 16), 1)
    start = np.eye(4)
    start[:3, 3] = [1.0, 0.0, 0.0]
    T, before, after = affine_search.search_affine(image, np.eye(4), image, np.eye(4), start, steps=0)
    np.testing.assert_array_equal(T, start)
    assert before == after


def test_refinement_of_pairs_of_different_sizes_in_one_process():
    """Batch mode refines pairs of any size one after another (the compiled steps retrace)."""
    for shape in ((20, 18, 16), (17, 15, 13), (23, 14, 19)):
        image = blobs(shape, 4)
        settings = RefineSettings(steps=2, resolution=0.5)
        refined, history = refinement.refine_field(image, np.eye(4), image, np.eye(4),
                                                   np.zeros(shape + (3,), np.float32), settings, log=lambda *_: None)
        assert refined.shape == shape + (3,) and np.isfinite(history[-1][1])
        T, _, _ = affine_search.search_affine(image, np.eye(4), image, np.eye(4), np.eye(4), steps=4)
        assert T.shape == (4, 4)


def test_forward_determinant_matches_numpy():
    rng = np.random.default_rng(3)
    u = rng.normal(scale=0.4, size=(5, 6, 4, 3)).astype(np.float32)
    jacobians = np.empty((4, 5, 3, 3, 3))
    for a in range(3):  # column a: forward difference along axis a
        shifted = np.roll(u, -1, axis=a)[:4, :5, :3] - u[:4, :5, :3]
        jacobians[..., :, a] = shifted
    jacobians += np.eye(3)
    np.testing.assert_allclose(fields.forward_jacobian_determinant(tf.constant(u)).numpy(), np.linalg.det(jacobians),
                               rtol=1e-5, atol=1e-5)


def test_folding_penalty_unfolds_a_folded_start():
    """On flat images (no similarity gradient) and no smoothness, only the folding penalty moves
    the field: without it nothing changes, with it the folded voxels (forward differences) go."""
    shape = (24, 20, 16)
    image = np.full(shape, 0.5, np.float32)
    x = np.arange(shape[0], dtype=np.float32)[:, None, None]
    start = np.zeros(shape + (3,), np.float32)
    start[..., 0] = 1.5 * np.sin(x / 1.0)  # d u_x / dx = 1.5 cos(x): folds where cos(x) < -2/3
    before = np.mean(metrics.forward_jacobian_determinant(start) <= 0)
    assert before > 0.1
    folded = {}
    for weight in (0.0, 1.0):
        settings = RefineSettings(steps=60, resolution=1.0, smoothness=0.0, folding=weight, rate=0.05)
        flow, _ = refinement.refine_field(image, np.eye(4), image, np.eye(4), start, settings, log=lambda *_: None)
        folded[weight] = np.mean(metrics.forward_jacobian_determinant(flow.numpy()) <= 0)
    assert folded[0.0] == pytest.approx(before)
    assert folded[1.0] < 0.2 * before, folded


def test_refinement_is_deterministic_on_the_cpu():
    shape = (21, 18, 16)
    fixed, moving = blobs(shape, 5), blobs(shape, 6)
    settings = RefineSettings(steps=20, resolution=(0.25, 0.5))
    runs = [refinement.refine_field(fixed, np.eye(4), moving, np.eye(4), np.zeros(shape + (3,), np.float32), settings,
                                log=lambda *_: None)[0].numpy() for _ in range(2)]
    assert np.abs(runs[0]).max() > 0.01
    np.testing.assert_array_equal(runs[0], runs[1])


def test_network_fine_tuning_fits_the_pair_and_restores_the_weights():
    from vtn_tf import VTN

    shape = (64, 64, 64)  # the network's stride-2 levels need multiples of 64
    fixed = blobs(shape, 3)
    # moving(y) = fixed(y - 2 along axis 0): the network must learn a +2 voxel pull on axis 0.
    moving = ndimage.shift(fixed, (2.0, 0.0, 0.0), order=1, mode="nearest")
    model = VTN("D", width=0.125, flow_head_initializer="small")
    inputs = fixed[None, ..., None], moving[None, ..., None]
    before_flow = model({"fixed": inputs[0], "moving": inputs[1]})["flow"].numpy()
    trained = [v.numpy() for v in model.trainable_variables]
    loss_before = float(model.loss_terms(*inputs)["loss"])
    with finetune.finetuned(model, *inputs, steps=60, learning_rate=1e-3, log=lambda *_: None):
        loss_after = float(model.loss_terms(*inputs)["loss"])
        tuned_flow = model({"fixed": inputs[0], "moving": inputs[1]})["flow"].numpy()
    inside = (0, slice(12, -12), slice(12, -12), slice(12, -12))
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
    # The pull along axis 0 approaches the true +2 voxels (an analytic field, not the loss).
    assert abs(tuned_flow[inside + (0,)].mean() - 2.0) < 0.6 * abs(before_flow[inside + (0,)].mean() - 2.0)
    # Leaving the block restores the trained weights exactly: the next pair starts from the model.
    for variable, value in zip(model.trainable_variables, trained):
        np.testing.assert_array_equal(variable.numpy(), value)
    again = model({"fixed": inputs[0], "moving": inputs[1]})["flow"].numpy()
    np.testing.assert_allclose(again, before_flow, atol=1e-6)


def test_a_header_rotation_absorbed_by_the_alignment_changes_nothing():
    """The smoothness term spares the initial alignment's own displacement: the moving scan
    rotated in its header (world space), with the alignment ``K`` that undoes it, refines to
    the same moving positions as the unrotated pair; penalising the rotation too pulls the
    field away from the true one."""
    from scipy.spatial.transform import Rotation

    fixed = np.pad(blobs((40, 36, 32), 0), 6)
    shape = fixed.shape
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    true = np.stack([2.0 * np.sin(grid[..., 1] / 7.0), 1.5 * np.cos(grid[..., 2] / 6.0), np.full(shape, 1.0)], -1)
    moving = ndimage.map_coordinates(fixed, np.moveaxis(grid - true, -1, 0), order=1, mode="nearest")
    settings = RefineSettings(steps=60, rate=0.1, resolution=(0.25, 0.5), smoothness=1.0)
    quiet = lambda *_: None
    plain, _ = refinement.refine_field(fixed, np.eye(4), moving, np.eye(4), np.zeros(shape + (3,), np.float32),
                                   settings, log=quiet)
    # about 25 degrees about the volume's centre (voxels = mm: identity fixed affine)
    R = np.eye(4)
    R[:3, :3] = Rotation.from_rotvec([0.3, -0.2, 0.25]).as_matrix()
    centre = (np.array(shape) - 1) / 2
    R[:3, 3] = centre - R[:3, :3] @ centre
    start = (grid @ R[:3, :3].T + R[:3, 3] - grid).astype(np.float32)  # the alignment's displacement
    inside = (slice(8, -8),) * 3
    errors = {}
    for alignment in (None, R):
        refined, _ = refinement.refine_field(fixed, np.eye(4), moving, R, start, settings, log=quiet,
                                             alignment=alignment)
        moving_positions = (grid + refined.numpy() - R[:3, 3]) @ np.linalg.inv(R[:3, :3]).T
        errors[alignment is not None] = np.abs(moving_positions - grid - true)[inside].mean()
        if alignment is not None:
            assert np.abs(moving_positions - grid - plain.numpy())[inside].mean() < 0.05
    assert errors[True] < 1.1 * np.abs(plain.numpy() - true)[inside].mean()
    assert errors[False] > 1.5 * errors[True], errors


def test_the_smoothness_term_and_its_written_out_gradient_match_numpy():
    """Value against the squared forward differences in numpy; gradient against central finite
    differences of that numpy value, at random entries (edges included)."""
    rng = np.random.default_rng(3)
    d = rng.normal(size=(7, 5, 6, 3))

    def reference(d):
        terms = [np.sum(np.diff(d, axis=a) ** 2) / (np.prod(d.shape[:3]) // d.shape[a] * (d.shape[a] - 1))
                 for a in range(3)]
        return sum(terms) / 3.0

    x = tf.constant(d, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = refinement.smoothness(x)
    grad = tape.gradient(value, x).numpy()
    np.testing.assert_allclose(float(value), reference(d), rtol=1e-5)
    for index in [(0, 0, 0, 0), (6, 4, 5, 2), (3, 2, 0, 1), (1, 4, 3, 0), (6, 0, 2, 1)]:
        step = np.zeros_like(d)
        step[index] = 1e-4
        numeric = (reference(d + step) - reference(d - step)) / 2e-4
        np.testing.assert_allclose(grad[index], numeric, rtol=1e-3, atol=1e-6)


def test_the_folding_term_and_its_written_out_gradient_match_numpy():
    """`regularisers` with both terms, an alignment displacement and a level factor: the value
    against numpy (squared forward differences, determinants by numpy.linalg.det), the gradient
    against central finite differences of that numpy value."""
    rng = np.random.default_rng(4)
    u = rng.normal(scale=0.5, size=(6, 5, 7, 3))
    aligned = rng.normal(scale=0.2, size=u.shape)
    factor, smooth, fold = 2.0, 0.7, 3.0

    def reference(u):
        s = (u - aligned) / factor
        tv = sum(np.sum(np.diff(s, axis=a) ** 2) / (np.prod(s.shape[:3]) // s.shape[a] * (s.shape[a] - 1))
                 for a in range(3)) / 3.0
        d = u / factor
        jacobians = np.stack([np.diff(d, axis=a)[tuple(slice(0, n - 1) for n in d.shape[:3])] for a in range(3)], -1)
        det = np.linalg.det(jacobians + np.eye(3))  # [..., k, a]: d u_k / d axis a
        return smooth * tv + fold * np.mean(np.maximum(-det, 0.0)), det

    value_np, det = reference(u)
    assert (det < 0).mean() > 0.05  # the folding term is active
    x = tf.constant(u, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = refinement.regularisers(x, tf.constant(aligned, tf.float32), factor, smooth, fold)
    grad = tape.gradient(value, x).numpy()
    np.testing.assert_allclose(float(value), value_np, rtol=1e-5)
    checked = 0
    for index in np.ndindex(u.shape):
        if checked == 40 or rng.random() > 0.2:
            continue
        step = np.zeros_like(u)
        step[index] = 1e-5
        high, det_high = reference(u + step)
        low, det_low = reference(u - step)
        if np.any(np.sign(det_high) != np.sign(det_low)):
            continue  # a determinant crosses 0: the kink of relu
        np.testing.assert_allclose(grad[index], (high - low) / 2e-5, rtol=1e-3, atol=1e-5)
        checked += 1
    assert checked == 40


@pytest.mark.parametrize("anneal", [False, True])
def test_adam_loop_follows_keras_adam_in_chunks(anneal):
    """The refinement's compiled Adam (run as refine_field runs it, in chunks that carry the
    moments and the step count) against Keras' Adam, with a constant rate or its cosine decay
    to 0 over the 10 steps (`--refine_anneal`), on an anisotropic quadratic."""
    rng = np.random.default_rng(3)
    target, scale = rng.normal(size=(4, 3)).astype(np.float32), rng.uniform(0.1, 5, (4, 3)).astype(np.float32)
    start = rng.normal(size=(4, 3)).astype(np.float32)

    def loss_of(x, _):
        return tf.reduce_sum(scale * tf.square(x - target))

    x, m, v, t = tf.constant(start), tf.zeros((4, 3)), tf.zeros((4, 3)), tf.constant(0.0)
    for count in (3, 4, 3):
        x, m, v, t, _, _ = optimiser.adam_loop(loss_of, x, m, v, t, count, tf.constant(0.3),
                                             tf.constant(10.0) if anneal else None)
    def keras_adam(rate):
        optimizer, reference = keras.optimizers.Adam(rate), tf.Variable(start)
        for _ in range(10):
            with tf.GradientTape() as tape:
                value = loss_of(reference, None)
            optimizer.apply_gradients([(tape.gradient(value, reference), reference)])
        return reference.numpy()

    annealed, constant = keras_adam(keras.optimizers.schedules.CosineDecay(0.3, 10)), keras_adam(0.3)
    np.testing.assert_allclose(x.numpy(), annealed if anneal else constant, atol=1e-5)
    assert float(t) == 10.0
    assert np.abs(annealed - constant).max() > 0.05  # the two schedules end apart
