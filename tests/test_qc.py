"""vtn_tf.qc: the figures against independent computations, the failure rule on failures made
on purpose, the picture, the cohort report and the evaluation plots."""

import csv
import json
import math
import os

import numpy as np
import pytest
from scipy import ndimage, stats
from scipy.spatial.transform import Rotation

from vtn_tf import qc
from vtn_tf.qc import figures, flags, picture, plots, report

pytest.importorskip("matplotlib")

SHAPE = (40, 44, 36)


def _grid(shape=SHAPE):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


def phantom(shape=SHAPE, seed=0, shift=(0.0, 0.0, 0.0)):
    """An ellipsoid with inner texture on a dark background (MRI-like, non-negative)."""
    x = _grid(shape) - np.asarray(shift)
    centre = (np.asarray(shape) - 1) / 2
    r = np.sqrt((((x - centre) / (np.asarray(shape) * 0.38)) ** 2).sum(-1))
    texture = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 1.5) * 40
    return np.where(r < 1, 100 + 30 * np.sin(x[..., 0] / 3) * np.cos(x[..., 1] / 4) + texture, 0).astype(np.float32)


def affine_field(matrix, translation, shape=SHAPE):
    """``u(x) = (M - I) x + t`` (voxels, pulling)."""
    x = _grid(shape)
    return (x @ (np.asarray(matrix) - np.eye(3)).T + np.asarray(translation)).astype(np.float32)


# ----- figures ---------------------------------------------------------------------------------
def test_global_correlation_is_pearsons_r():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    b = 0.6 * a + b
    mask = rng.uniform(size=SHAPE) > 0.3
    expected = stats.pearsonr(a[mask], b[mask])[0]
    assert figures.similarity(a, [b], mask)[0]["cc"] == pytest.approx(expected, abs=1e-6)
    # a large offset and another unit (a CT-like scale) change nothing: the sums are centred
    assert figures.similarity(a * 3.0 + 1000.0, [b * 0.01 - 5.0], mask)[0]["cc"] == pytest.approx(expected, abs=1e-5)


def test_window_means_match_scipys_uniform_filter():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(11, 9, 4)).astype(np.float32)  # 4: windows past both ends at once
    full = ndimage.uniform_filter(x.astype(np.float64), 5, mode="nearest")
    for stride in (1, 2, 3):
        np.testing.assert_allclose(figures._window_means(x, 5, stride), full[::stride, ::stride, ::stride],
                                   atol=1e-6)
    three = ndimage.uniform_filter(x.astype(np.float64), 3, mode="nearest")
    np.testing.assert_allclose(figures._window_means(x, 3, 2), three[::2, ::2, ::2], atol=1e-6)


def test_local_correlation_matches_a_window_by_window_loop():
    rng = np.random.default_rng(2)
    shape = (9, 10, 8)
    a = ndimage.gaussian_filter(rng.normal(size=shape), 1)
    b = a + 0.5 * rng.normal(size=shape)
    mask = np.zeros(shape, bool)
    mask[2:7, 3:8, 2:6] = True
    pa, pb = np.pad(a, 2, mode="edge"), np.pad(b, 2, mode="edge")
    expected = []
    for i, j, k in np.argwhere(mask):
        wa, wb = pa[i:i + 5, j:j + 5, k:k + 5].ravel(), pb[i:i + 5, j:j + 5, k:k + 5].ravel()
        expected.append(np.corrcoef(wa, wb)[0, 1])
    assert figures.similarity(a, [b], mask, 5, stride=1)[0]["lcc"] == pytest.approx(np.mean(expected), abs=2e-4)
    every_second = [c for c, (i, j, k) in zip(expected, np.argwhere(mask)) if i % 2 == j % 2 == k % 2 == 0]
    assert figures.similarity(a, [b], mask)[0]["lcc"] == pytest.approx(np.mean(every_second), abs=2e-4)
    same, opposite = figures.similarity(a, [a, -a], mask)
    assert same["lcc"] == pytest.approx(1.0, abs=1e-4) and opposite["lcc"] == pytest.approx(-1.0, abs=1e-4)
    constant = figures.similarity(a, [np.zeros(shape)], mask)[0]  # no structure: every cube counts 0
    assert constant == {"cc": 0.0, "lcc": 0.0}


def test_local_correlation_on_every_second_cube_estimates_the_mean_of_all():
    fixed, moving = phantom(seed=1), phantom(seed=2, shift=(1, 2, 0))
    mask = figures.foreground(fixed)
    every = figures.similarity(fixed, [moving], mask, stride=1)[0]["lcc"]
    assert figures.similarity(fixed, [moving], mask)[0]["lcc"] == pytest.approx(every, abs=0.02)


def test_jacobian_of_an_affine_field_is_its_determinant():
    matrix = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.05], [0.0, 0.1, 1.2]])
    det = figures.jacobian_determinant(affine_field(matrix, (2, -1, 3)))
    assert det.shape == tuple(n - 1 for n in SHAPE)
    np.testing.assert_allclose(det, np.linalg.det(matrix), rtol=1e-4)
    field = figures.field_figures(affine_field(matrix, (2, -1, 3)), np.eye(4))  # far from 1, no spread
    assert field["jacobian_std"] == pytest.approx(0.0, abs=1e-4)
    assert field["jacobian_min"] == pytest.approx(np.linalg.det(matrix), rel=1e-4)


def test_folding_percent_counts_a_known_folded_block():
    flow = np.zeros(SHAPE + (3,), np.float32)
    x = _grid()[..., 0]
    block = (slice(10, 20), slice(5, 25), slice(4, 14))
    flow[..., 0][block] = -2.0 * x[block]  # d(x + u)/dx = -1 inside the block: folded
    det = figures.jacobian_determinant(flow)
    expected = np.mean(det <= 0) * 100
    # independently: the block's forward differences, inside minus its far faces, fold
    folded = np.zeros(tuple(n - 1 for n in SHAPE), bool)
    folded[10:19, 5:24, 4:13] = True
    assert np.all(det[folded] < 0) and expected >= 100 * folded.mean()
    result = figures.compute(np.ones(SHAPE), np.ones(SHAPE), np.ones(SHAPE), flow, np.eye(4))
    assert result["field"]["folding_percent"] == pytest.approx(expected, abs=1e-3)
    assert result["field"]["jacobian_std"] == pytest.approx(float(det.std()), abs=1e-3)


def test_affine_decomposition_recovers_rotations_scales_shears_and_translation():
    angles = [12.0, -7.0, 25.0]  # about x, y, z; R = Rz Ry Rx
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()  # extrinsic x, then y, then z
    scales, (xy, xz, yz) = np.array([1.1, 0.95, 1.2]), (0.05, -0.02, 0.1)
    upper = np.diag(scales) @ np.array([[1, xy, xz], [0, 1, yz], [0, 0, 1]])
    world = np.eye(4)
    world[:3, :3] = rotation @ upper
    world[:3, 3] = [4.0, -3.0, 12.0]
    parts = figures.decompose_affine(world)
    np.testing.assert_allclose(parts["rotation_degrees"], angles, atol=1e-6)
    np.testing.assert_allclose(parts["scales"], scales, atol=1e-9)
    assert parts["shears"] == pytest.approx({"xy": xy, "xz": xz, "yz": yz}, abs=1e-9)
    np.testing.assert_allclose(parts["translation_mm"], [4.0, -3.0, 12.0])
    assert parts["rotation_angle_degrees"] == pytest.approx(np.degrees(Rotation.from_matrix(rotation).magnitude()))
    centre = np.array([10.0, 20.0, -5.0])  # the displacement of a point: W c - c
    np.testing.assert_allclose(figures.decompose_affine(world, centre)["translation_mm"],
                               world[:3, :3] @ centre + world[:3, 3] - centre)
    mirrored = world @ np.diag([-1.0, 1, 1, 1])
    assert figures.decompose_affine(mirrored)["reflection"] and not parts["reflection"]


def test_largest_displacement_in_mm():
    fixed_affine = np.diag([2.0, 1.5, 3.0, 1.0])
    fixed_affine[:3, :3] = Rotation.from_euler("x", 30, degrees=True).as_matrix() @ fixed_affine[:3, :3]
    flow = np.zeros(SHAPE + (3,), np.float32)
    flow[..., :] = [1.0, 2.0, 0.5]
    flow[5, 6, 7] = [3.0, -1.0, 2.0]
    expected = np.linalg.norm(flow @ fixed_affine[:3, :3].T, axis=-1).max()
    assert figures.field_figures(flow, fixed_affine)["largest_displacement_mm"] == pytest.approx(expected, rel=1e-6)
    flow[-1, -1, -1] = [0.0, 0.0, 9.0]  # the last voxel has no forward difference, but a displacement
    assert figures.field_figures(flow, fixed_affine)["largest_displacement_mm"] == pytest.approx(27.0, rel=1e-6)


def _reference_field_figures(flow, warped, threshold):
    """The field's figures from an independent forward-difference Jacobian: numpy's
    determinant of ``I + [∂u/∂x, ∂u/∂y, ∂u/∂z]`` in float64, voxel by voxel."""
    u = np.asarray(flow, np.float64)
    columns = [np.diff(u, axis=a)[tuple(slice(0, n - 1) for n in u.shape[:3])] for a in range(3)]
    det = np.linalg.det(np.eye(3) + np.stack(columns, -1))
    inside = np.asarray(warped)[:-1, :-1, :-1] > threshold
    return det, {"folding_percent": 100.0 * np.mean(det <= 0), "jacobian_std": det.std(), "jacobian_min": det.min(),
                 "carried_voxels": np.clip(det[inside], 0, None).sum()}


def test_field_figures_match_an_independent_jacobian_slab_by_slab(monkeypatch):
    rng = np.random.default_rng(8)
    flow = np.stack([ndimage.gaussian_filter(rng.normal(size=SHAPE), 2) * 15 for _ in range(3)], -1).astype(np.float32)
    warped = phantom()
    det, expected = _reference_field_figures(flow, warped, 50.0)
    assert 0 < expected["folding_percent"] < 20  # some folding, most not
    np.testing.assert_allclose(figures.jacobian_determinant(flow), det, atol=2e-4)
    for slab in (figures.SLAB_VOXELS, 3 * SHAPE[1] * SHAPE[2]):  # one slab; slabs of 3 planes (the last shorter)
        monkeypatch.setattr(figures, "SLAB_VOXELS", slab)
        found = figures.field_figures(flow, np.eye(4), warped, 50.0)
        for key, value in expected.items():
            assert found[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


@pytest.mark.parametrize("ids, dtype", [((0, 1, 2, 3), np.uint8), ((0, 5, 181, 1023), np.int16),
                                        ((0, 7, 4000, 70000), np.int32), ((-3, 0, 2, 9), np.int16),
                                        ((0, 1, 2, 3), np.float32)])
def test_dice_matches_a_direct_count(ids, dtype):
    """Small ids (counted as they are), large and negative ids (coded first), any label dtype;
    an id present in one map only scores 0 and is counted."""
    rng = np.random.default_rng(3)
    values = np.asarray(ids)
    a = values[rng.integers(0, len(ids), SHAPE)].astype(dtype)
    b = np.where(rng.uniform(size=SHAPE) < 0.8, a, values[rng.integers(0, len(ids), SHAPE)]).astype(dtype)
    b[0, 0, 0] = 77  # only in b
    present = [v for v in np.union1d(a, b) if v != 0]
    expected = np.mean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in present])
    assert figures.dice([a], [b])["mean"] == pytest.approx(expected)


def test_jacobian_colours_are_matplotlibs_diverging_map():
    from matplotlib import colormaps, colors

    det = np.concatenate([np.random.default_rng(0).uniform(-1, 3, 10000), [0, 0.5, 1, 1.5, 2, 2.5]]).astype(np.float32)
    expected = colormaps["RdBu_r"](colors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)(det))[..., :3]
    expected[det <= 0] = picture.FOLDING_RGB
    np.testing.assert_allclose(picture._jacobian_colours(det), expected, atol=1e-6)


def test_the_figures_are_the_same_computed_side_by_side_or_in_turn(monkeypatch):
    fixed, moving = phantom(), phantom(shift=(1.5, -1, 0))
    flow = np.zeros(SHAPE + (3,), np.float32)
    flow[..., 1] = 0.3 * np.sin(_grid()[..., 0] / 4)
    labels = (fixed > 110).astype(np.int16)
    found = []
    for threshold in (0, 1 << 40):  # every volume in threads, none
        monkeypatch.setattr(figures, "THREAD_VOXELS", threshold)
        found.append(figures.compute(fixed, np.roll(moving, 2, 0), moving, flow, np.eye(4), np.eye(4), moving=moving,
                                     moving_affine=np.eye(4), fixed_labels=[labels], warped_labels=[labels]))
    assert found[0] == found[1] and found[0]["similarity"]["before"] != found[0]["similarity"]["after"]


def test_coverage_of_a_moving_image_half_outside_the_fixed_view():
    moving = phantom()
    zero = np.zeros(SHAPE + (3,), np.float32)
    half = moving.copy()
    half[SHAPE[0] // 2:] = 0  # the fixed grid sees half of the object

    def inside(warped, spacing=1.0):
        numbers = figures.compute(moving, warped, warped, zero, np.diag([spacing] * 3 + [1.0]), moving=moving,
                                  moving_affine=np.diag([spacing] * 3 + [1.0]))
        return numbers["coverage"]["moving_inside_percent"]

    assert inside(moving) > 90 and inside(moving, 2.0) == inside(moving)
    assert 40 < inside(half) < 60
    threshold = figures.moving_threshold(moving)  # its parts: the foreground above the threshold, and what lands
    carried = figures.field_figures(zero, np.eye(4), half, threshold)["carried_voxels"]
    assert carried == np.count_nonzero(half[:-1, :-1, :-1] > threshold)
    share = figures.coverage(moving, np.eye(4), threshold, carried, np.eye(4))["moving_inside_percent"]
    assert share == pytest.approx(100 * carried / np.count_nonzero(moving > threshold))


# ----- the failure rule --------------------------------------------------------------------------
def _check(fixed, moving_headers, warped, flow, world=None, **options):
    return qc.check(fixed, moving_headers, warped, flow, np.eye(4), np.eye(4) if world is None else world,
                    picture=False, **options)


def test_a_good_registration_raises_no_flag():
    fixed, moving = phantom(), phantom(shift=(3, 0, 0))
    flow = np.zeros(SHAPE + (3,), np.float32)
    flow[..., 0] = -3.0
    world = np.eye(4)
    world[0, 3] = -3.0
    result = _check(fixed, moving, fixed, flow, world, moving=moving, moving_affine=np.eye(4), modality="MRI")
    assert result.flags == [] and not result.suspect
    assert result.figures["similarity"]["after"]["lcc"] > result.figures["similarity"]["before"]["lcc"]


def test_a_left_right_flipped_moving_image_is_flagged():
    fixed = phantom()
    flipped = fixed[::-1].copy()  # the same anatomy, mirrored; a rigid registration cannot undo it
    result = _check(fixed, flipped, flipped, np.zeros(SHAPE + (3,), np.float32))
    assert result.suspect and {f["flag"] for f in result.flags} == {"similarity"}
    mirrored = np.diag([-1.0, 1, 1, 1])  # a registration that undoes it by mirroring is flagged too
    mirrored[0, 3] = SHAPE[0] - 1
    assert "mirrors" in " ".join(f["reason"] for f in _check(fixed, flipped, fixed, np.zeros(SHAPE + (3,)),
                                                               mirrored).flags)


def test_a_flipped_scan_of_a_symmetric_anatomy_is_flagged_by_its_labels():
    fixed = phantom()
    fixed = (fixed + fixed[::-1]) / 2  # left-right symmetric: the images alone cannot tell a flip
    sides = np.where(np.arange(SHAPE[0]) < SHAPE[0] // 2, 1, 2)[:, None, None]
    fixed_labels = np.where(fixed > 0, sides, 0)
    flipped_labels = fixed_labels[::-1]  # the scan's labels drawn on the flipped scan
    moving = np.roll(fixed, 2, 1)
    zero = np.zeros(SHAPE + (3,), np.float32)
    result = _check(fixed, moving, fixed, zero, fixed_labels=[fixed_labels], warped_labels=[flipped_labels],
                    headers_labels=[np.roll(flipped_labels, 2, 1)])
    assert [f["flag"] for f in result.flags] == ["labels"]
    assert result.figures["dice"]["mean"] == pytest.approx(0.0, abs=1e-6)
    good = _check(fixed, moving, fixed, zero, fixed_labels=[fixed_labels], warped_labels=[fixed_labels],
                  headers_labels=[np.roll(fixed_labels, 2, 1)])
    assert good.flags == [] and good.figures["dice"]["mean"] == 1.0 > good.figures["dice"]["before"]
    marked = flags.cohort_flags([0.71, 0.7, 0.72, 0.69, 0.7, 0.71, 0.7, 0.68, 0.1], what="the mean Dice")
    assert marked[-1]["flag"] == "cohort" and "mean Dice" in marked[-1]["reason"] and not any(marked[:-1])


def test_a_ct_given_to_an_mri_model_is_flagged_and_mri_to_a_ct_model():
    mri = phantom()
    ct = np.where(mri > 0, mri - 50, -1000).astype(np.float32)  # air at -1000 HU around the body
    result = _check(mri, ct, ct, np.zeros(SHAPE + (3,)), moving=ct, moving_affine=np.eye(4), modality="MRI")
    reasons = [f["reason"] for f in result.flags if f["flag"] == "intensity"]
    assert len(reasons) == 1 and "moving image looks like a CT" in reasons[0]
    result = _check(ct, mri, mri, np.zeros(SHAPE + (3,)), moving=mri, moving_affine=np.eye(4), modality="CT")
    reasons = [f["reason"] for f in result.flags if f["flag"] == "intensity"]
    assert len(reasons) == 1 and "moving image is not in Hounsfield units" in reasons[0]


def test_unrelated_anatomy_and_a_scan_outside_the_view_are_flagged():
    fixed = phantom()
    other = np.zeros(SHAPE, np.float32)  # a small bright blob far from the fixed object
    other[:8, :8, :8] = 100 + ndimage.gaussian_filter(np.random.default_rng(5).normal(size=(8, 8, 8)), 1) * 30
    result = _check(fixed, other, other, np.zeros(SHAPE + (3,)))
    assert any(f["flag"] == "similarity" for f in result.flags)
    moving = phantom(shape=(120, 44, 36))  # three times as long: the fixed view holds one end of it
    seen = moving[70:110].copy()
    result = _check(fixed, seen, seen, np.zeros(SHAPE + (3,)), moving=moving, moving_affine=np.eye(4))
    assert any(f["flag"] == "coverage" for f in result.flags)


def test_folding_and_implausible_affine_parts_are_flagged():
    fixed = phantom()
    flow = np.zeros(SHAPE + (3,), np.float32)
    flow[..., 0][10:30] = -2.0 * _grid()[..., 0][10:30]
    result = _check(fixed, np.roll(fixed, 2, 0), fixed, flow)
    assert any(f["flag"] == "folding" for f in result.flags)
    world = np.eye(4)
    world[:3, :3] = Rotation.from_euler("z", 90, degrees=True).as_matrix() @ np.diag([1.0, 1.0, 2.0])
    result = _check(fixed, np.roll(fixed, 2, 0), fixed, np.zeros(SHAPE + (3,)), world)
    reasons = " ".join(f["reason"] for f in result.flags if f["flag"] == "affine")
    assert "rotates by 90 degrees" in reasons and "z by 2.00" in reasons


def test_cohort_flag_marks_the_outlier_only():
    values = [0.52, 0.55, 0.5, 0.53, 0.54, 0.51, 0.2, math.nan]
    marked = flags.cohort_flags(values)
    assert [m is not None for m in marked] == [False] * 6 + [True, False]
    assert flags.cohort_flags(values[:3]) == [None] * 3  # too few pairs to judge


# ----- picture, report, plots ----------------------------------------------------------------------
def test_picture_is_drawn_with_labels_and_an_oblique_affine(tmp_path):
    fixed = phantom()
    labels = (fixed > 110).astype(np.int16) + 2 * (fixed > 140)
    flow = np.zeros(SHAPE + (3,), np.float32)
    flow[..., 0][10:30] = -2.0 * _grid()[..., 0][10:30]
    affine = np.array([[0, 0, -1.5, 20], [1.2, 0, 0, -30], [0, 1.0, 0, 4], [0, 0, 0, 1]])  # a permuted grid
    result = qc.check(fixed, np.roll(fixed, 3, 1), fixed, flow, affine, np.eye(4), name="S01 <- S02",
                      fixed_labels=[labels], warped_labels=[labels])
    assert result.picture[:8] == b"\x89PNG\r\n\x1a\n"
    written = qc.write(tmp_path, result)
    assert written == ["qc.png", "qc.json"] and (tmp_path / "qc.png").stat().st_size > 10000
    assert "folding" in (tmp_path / "qc.json").read_text()
    full = np.pad(figures.jacobian_determinant(flow), [(0, 1)] * 3, mode="edge")  # the volume, then its slices
    centre = (7, 43, 20)  # the last plane along y: it repeats the one before it
    axes, flips = picture._orientation(affine)
    ras_centre = [SHAPE[a] - 1 - centre[a] if flip else centre[a] for a, flip in zip(axes, flips)]
    expected = picture._slices(picture.to_ras(full, affine), ras_centre)
    for got, want in zip(picture.jacobian_slices(flow, affine, centre), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    volume = np.arange(24).reshape(2, 3, 4)
    ras = picture.to_ras(volume, affine)  # R runs down axis 2, A up axis 0, S up axis 1
    assert ras.shape == (4, 2, 3) and ras[0, 1, 2] == volume[1, 2, 3] and ras[3, 0, 0] == volume[0, 0, 0]


def test_a_small_volume_is_enlarged_by_whole_blocks_so_that_its_picture_reads():
    """A 40x44x36 crop at 1 mm: panels of at least MIN_PANEL_PIXELS, every voxel a square block of
    the same value (np.kron), the picture wide enough for the six column titles."""
    import io

    from PIL import Image

    fixed = phantom()
    result = qc.check(fixed, fixed, fixed, np.zeros(SHAPE + (3,), np.float32), np.eye(4), np.eye(4),
                      fixed_labels=[fixed > 110], warped_labels=[fixed > 110])
    width, height = Image.open(io.BytesIO(result.picture)).size
    assert width >= 6 * picture.MIN_PANEL_PIXELS and height >= 3 * picture.MIN_PANEL_PIXELS
    view = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(picture._display(view, (1.0, 1.0), 0.25, 1), np.kron(view, np.ones((4, 4))))
    assert picture._display(view, (1.0, 1.5), 1.0, 1).shape == (3, 6)  # not whole: resampled


def test_the_check_draws_the_same_picture_as_draw_in_one_go(tmp_path):
    """check() composes the panels beside the figures and writes the title after them: the
    pixels are draw()'s with the same figures and flags."""
    from PIL import Image

    fixed, moving = phantom(), phantom(shift=(2, 0, 0))
    flow = np.zeros(SHAPE + (3,), np.float32)
    result = qc.check(fixed, moving, moving, flow, np.eye(4), np.eye(4), name="pair")
    picture.draw(tmp_path / "alone.png", fixed, moving, moving, flow, np.eye(4), result.figures, result.flags,
                 name="pair")
    (tmp_path / "check.png").write_bytes(result.picture)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "check.png")),
                                  np.asarray(Image.open(tmp_path / "alone.png")))


def _entries(tmp_path):
    fixed = phantom()
    entries = []
    for k, moving in enumerate([phantom(shift=(1, 0, 0)), phantom(shift=(0, 1, 0)), fixed[::-1].copy()]):
        result = qc.check(fixed, np.roll(moving, 2, 2), moving, np.zeros(SHAPE + (3,)), np.eye(4), np.eye(4),
                          name=f"pair {k}")
        folder = tmp_path / f"pair{k}"
        folder.mkdir()
        qc.write(folder, result)
        entries.append(report.entry(f"pair {k}", folder))
    entries.append(report.entry("pair 3", error="moving image absent.nii.gz does not exist"))
    return entries


def test_report_lists_suspects_first_in_a_self_contained_page(tmp_path):
    html_path, csv_path = sorted(report.write(tmp_path, _entries(tmp_path)), key=lambda p: p.endswith(".csv"))
    page = open(html_path, encoding="utf-8").read()
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("http-equiv", "")
    assert "<script>" in page and "sortBy" in page
    with open(csv_path, encoding="utf-8", newline="") as stream:
        table = list(csv.DictReader(stream))
    assert [row["status"] for row in table][:2] == ["failed", "suspect"]
    assert table[0]["pair"] == "pair 3" and table[1]["pair"] == "pair 2"
    assert "does not exist" in table[0]["reasons"] and table[1]["reasons"]
    assert set(report.HEAD) | {name for name, _, _ in report.COLUMNS} <= set(table[0])


def test_evaluation_box_plots_are_written_beside_the_csv(tmp_path):
    rng = np.random.default_rng(4)
    rows = [{"fixed": f"S0{p}", "moving": "S10", "method": method, "dice": base + rng.normal() * 0.02,
             **{f"dice_{label}": base + rng.normal() * 0.05 for label in (21, 22, 41)}}
            for p in range(6) for method, base in (("identity", 0.5), ("vtn", 0.7))]
    written = plots.draw(rows, tmp_path / "results.csv", "LPBA40")
    assert [p.rsplit("/", 1)[-1] for p in written] == ["results_dice_pairs.png", "results_dice_structures.png"]
    for path in written:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ----- real scans: the rule on failures made on purpose ---------------------------------------------
def _read(path):
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.dataobj, np.float32), image.affine


def _placed_by_headers(data, affine, fixed_shape, fixed_affine, order=1):
    """``data`` resampled onto the fixed grid through the two headers (scipy; 0 outside)."""
    matrix = np.linalg.inv(affine) @ fixed_affine
    return ndimage.affine_transform(data, matrix[:3, :3], matrix[:3, 3], output_shape=fixed_shape, order=order,
                                    mode="constant", cval=0.0)


@pytest.mark.slow
@pytest.mark.data
def test_real_failures_are_flagged_and_a_real_pair_is_not(vtn_data):
    lpba40, ct = vtn_data / "lpba40", vtn_data / "ct_example" / "example_ct.nii.gz"
    crop = vtn_data / "hippocampus" / "images" / "hippocampus_001.nii.gz"
    for path in (lpba40 / "images" / "S01.nii.gz", ct, crop):
        if not path.exists():
            pytest.skip(f"{path} not found (set VTN_DATA to the shared data folder)")
    fixed, fixed_affine = _read(lpba40 / "images" / "S01.nii.gz")
    fixed_labels = _read(lpba40 / "labels" / "S01.nii.gz")[0].astype(np.int32)
    zero = np.zeros(fixed.shape + (3,), np.float32)

    def judged(moving, moving_affine, labels=None):
        placed = _placed_by_headers(moving, moving_affine, fixed.shape, fixed_affine)
        extra = {}
        if labels is not None:  # the headers' placement as the registration: Dice before = after
            warped = _placed_by_headers(labels, moving_affine, fixed.shape, fixed_affine, order=0)
            extra = {"fixed_labels": [fixed_labels], "warped_labels": [warped], "headers_labels": [warped]}
        result = qc.check(fixed, placed, placed, zero, fixed_affine, np.eye(4), picture=False, moving=moving,
                          moving_affine=moving_affine, modality="MRI", **extra)
        return {f["flag"] for f in result.flags}, result

    moving, moving_affine = _read(lpba40 / "images" / "S02.nii.gz")
    labels = _read(lpba40 / "labels" / "S02.nii.gz")[0].astype(np.int32)
    found, result = judged(moving, moving_affine, labels)
    assert found == {"similarity"}  # nothing registered, so nothing improved; the labels overlap
    assert result.figures["dice"]["mean"] > 0.5
    found, result = judged(moving[::-1].copy(), moving_affine, labels[::-1].copy())  # flipped, header kept
    assert "labels" in found and result.figures["dice"]["mean"] < 0.1
    found, result = judged(*_read(ct))  # a CT (Hounsfield units) given to a brain MRI model
    assert {"intensity", "coverage", "similarity"} <= found
    found, result = judged(*_read(crop))  # a 64 mm hippocampus crop: unrelated anatomy
    assert "similarity" in found and result.figures["similarity"]["after"]["lcc"] < 0.1


def test_evaluation_results_come_with_their_box_plots(tmp_path):
    from vtn_tf.evaluation import protocols

    rows = [{"fixed": f"S0{p}", "moving": "S10", "method": method, "dice": base, "iou": base / 2,
             "dice_1": base, "dice_2": base + 0.1, "landmark_mm": math.nan, "landmark_voxels": math.nan,
             "jacobian_std": 0.1, "folding_percent": 0.0, "seconds": 0.5, "device": "CPU"}
            for p in range(3) for method, base in (("identity", 0.5), ("vtn", 0.7))]
    summary = protocols.write_results(rows, tmp_path / "results.csv", [0, 1, 2])
    assert "Dice box plots: results_dice_pairs.png, results_dice_structures.png" in summary
    assert (tmp_path / "results_dice_structures.png").stat().st_size > 1000
    assert "Dice box plots" in (tmp_path / "results.md").read_text()


def test_the_pipeline_check_places_the_moving_image_by_its_headers():
    from types import SimpleNamespace

    from vtn_tf import io
    from vtn_tf.registration import quality

    fixed_affine = np.diag([1.5, 1.0, 2.0, 1.0])
    moving_affine = fixed_affine.copy()
    moving_affine[:3, 3] = [3.0, 0, 2.0]  # another origin: the headers place the moving voxels 2 x, 1 z off
    fixed = phantom()
    moving = np.roll(fixed, -3, 0)  # moving voxel m holds fixed voxel m + 3
    labels = (fixed > 110).astype(np.int16)
    volume = lambda data, affine, name: io.Volume(data, affine, tuple(np.diag(affine)[:3]), name)  # noqa: E731
    flow = np.zeros(SHAPE + (3,), np.float32)
    flow[..., 0] = -1.0  # the world point A_f (x + u) is moving voxel x - 3 (along x), which holds fixed x
    flow[..., 2] = 1.0
    world = np.eye(4)
    world[:3, 3] = [-1.5, 0, 2.0]
    result = SimpleNamespace(flow_voxels=flow, warped=fixed, warped_labels=[labels], inverse=None,
                             affine={"world_ras": world}, seconds={"network": 0.1})
    check = quality.quality_check(result, volume(fixed, fixed_affine, "f.nii"), volume(moving, moving_affine, "m.nii"),
                                  [volume(np.roll(labels, -3, 0), moving_affine, "l.nii")],
                                  [volume(labels, fixed_affine, "fl.nii")], modality="MRI", picture=False)
    expected = _placed_by_headers(moving, moving_affine, SHAPE, fixed_affine)
    mask = figures.foreground(fixed)
    before = stats.pearsonr(fixed[mask], expected[mask])[0]
    assert check.figures["similarity"]["before"]["cc"] == pytest.approx(before, abs=1e-3)
    assert check.figures["similarity"]["after"]["cc"] == pytest.approx(1.0)
    assert check.figures["dice"]["mean"] == 1.0 > check.figures["dice"]["before"]
    assert check.figures["seconds"]["total"] == pytest.approx(0.1) and check.flags == []
    assert quality.modality_of(None, "ct") == "CT" and quality.modality_of(SimpleNamespace(modality="MRI")) == "MRI"


def test_scans_on_one_grid_are_placed_by_their_headers_without_resampling(monkeypatch):
    from types import SimpleNamespace

    from vtn_tf import io
    from vtn_tf.registration import quality, resampling

    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, 4.0, 7.0]
    fixed, moving = phantom(), phantom(seed=3, shift=(2, 0, 1))
    labels = (moving > 110).astype(np.int16)

    def refused(*args, **kwargs):
        raise AssertionError("resampled although the grids coincide")
    monkeypatch.setattr(resampling.kernels, "compiled", refused)
    volume = lambda data, name: io.Volume(data, affine, (1.5, 1.0, 2.0), name)  # noqa: E731
    result = SimpleNamespace(flow_voxels=np.zeros(SHAPE + (3,), np.float32), warped=fixed, warped_labels=[labels],
                             inverse=None, affine={"world_ras": np.eye(4)}, seconds={})
    check = quality.quality_check(result, volume(fixed, "f.nii"), volume(moving, "m.nii"), [volume(labels, "l.nii")],
                                  [volume(labels, "fl.nii")], picture=False)
    mask = figures.foreground(fixed)
    assert check.figures["similarity"]["before"]["cc"] == pytest.approx(stats.pearsonr(fixed[mask], moving[mask])[0],
                                                                        abs=1e-4)
    assert check.figures["dice"]["before"] == 1.0
    placed = resampling.resample_through(labels, np.eye(4), SHAPE, "nearest")
    assert placed.dtype == labels.dtype and np.array_equal(placed, labels)


# ----- vtn-register: the check beside the outputs, the cohort report ---------------------------------
def _save(path, data, affine=None):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.2, 2.0, 1.0]) if affine is None else affine), str(path))
    return path.name


def test_registrations_write_their_check_and_a_batch_its_report(identity_run, tmp_path):
    import io as text_io

    from vtn_tf.registration import batch, pipeline, settings

    fixed = phantom()
    labels = ((fixed > 110).astype(np.int16) + 2 * (fixed > 140)).astype(np.int16)
    names = [_save(tmp_path / "fixed.nii.gz", fixed), _save(tmp_path / "moving.nii.gz", np.roll(fixed, 2, 0)),
             _save(tmp_path / "labels.nii.gz", np.roll(labels, 2, 0)), _save(tmp_path / "fixed_labels.nii.gz", labels)]
    chosen = settings.RegistrationSettings().with_values({"alignment.init": "none"})
    lines = []
    registrar = pipeline.Registrar(str(identity_run), chosen, log=lines.append)
    written, result, parts = registrar.register_files(tmp_path / names[0], tmp_path / names[1], tmp_path / "one",
                                                      [tmp_path / names[2]], fixed_labels=[tmp_path / names[3]])
    assert {"qc.png", "qc.json"} <= {os.path.basename(p) for p in written} and parts["qc"] > 0
    numbers = json.loads((tmp_path / "one" / "qc.json").read_text())
    assert numbers["dice"]["mean"] == pytest.approx(result.quality.figures["dice"]["mean"])
    # the identity model moves nothing: the local correlation cannot improve, and the rule says so
    assert numbers["suspect"] and {f["flag"] for f in numbers["flags"]} == {"similarity"}
    printed = "\n".join(lines)
    assert "qc: SUSPECT: the local correlation" in printed and "\nqc: local correlation" in printed

    (tmp_path / "pairs.csv").write_text("fixed,moving,out,moving_labels,fixed_labels\n"
                                        f"{names[0]},{names[1]},out/two,{names[2]},{names[3]}\n"
                                        f"{names[0]},absent.nii.gz,out/three,,\n")
    rows = batch.read_pairs(tmp_path / "pairs.csv")
    stream = text_io.StringIO()
    batch.run(registrar, rows, stream=stream, summary=tmp_path / "pairs.csv")
    assert (tmp_path / "out" / "two" / "qc.png").exists() and "quality control report" in stream.getvalue()
    # the fixed_labels column
    assert json.loads((tmp_path / "out" / "two" / "qc.json").read_text())["dice"]["mean"] > 0.5
    with open(tmp_path / "report.csv", encoding="utf-8", newline="") as table_file:
        table = list(csv.DictReader(table_file))
    assert [row["status"] for row in table] == ["failed", "suspect"]
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 1

    quiet = settings.RegistrationSettings().with_values({"alignment.init": "none", "output.qc": "false"})
    registrar = pipeline.Registrar(str(identity_run), quiet, log=lambda *_: None)
    written, result, parts = registrar.register_files(tmp_path / names[0], tmp_path / names[1], tmp_path / "one",
                                                      overwrite=True)
    assert result.quality is None and "qc" not in parts
    assert not (tmp_path / "one" / "qc.png").exists() and not (tmp_path / "one" / "qc.json").exists()


def test_a_check_that_fails_leaves_no_output_behind(identity_run, tmp_path, monkeypatch):
    from vtn_tf.registration import pipeline, settings

    names = [_save(tmp_path / "fixed.nii.gz", phantom()), _save(tmp_path / "moving.nii.gz", phantom(seed=1))]
    chosen = settings.RegistrationSettings().with_values({"alignment.init": "none"})
    registrar = pipeline.Registrar(str(identity_run), chosen, log=lambda *_: None)

    def broken(folder, result):
        raise OSError("disk full")
    monkeypatch.setattr(qc, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        registrar.register_files(tmp_path / names[0], tmp_path / names[1], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
