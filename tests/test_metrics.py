"""Tests of vtn_tf.core.metrics against hand counts (numpy sets) and analytic fields."""

import math

import numpy as np
import pytest

from vtn_tf.core import metrics


def voxel_set(labels, value):
    return {tuple(p) for p in np.argwhere(labels == value)}


def test_dice_and_jaccard_match_hand_counts():
    rng = np.random.default_rng(0)
    fixed = rng.integers(0, 4, size=(6, 7, 5)).astype(np.int32)
    warped = fixed.copy()
    flip = rng.uniform(size=fixed.shape) < 0.3
    warped[flip] = rng.integers(0, 4, size=flip.sum())
    dice_per, dice_mean = metrics.dice(fixed, warped)
    jac_per, jac_mean = metrics.jaccard(fixed, warped)
    assert sorted(dice_per) == [1, 2, 3] and sorted(jac_per) == [1, 2, 3]  # 0 = background
    for value in (1, 2, 3):
        a, b = voxel_set(fixed, value), voxel_set(warped, value)
        assert dice_per[value] == pytest.approx(2 * len(a & b) / (len(a) + len(b)))
        assert jac_per[value] == pytest.approx(len(a & b) / len(a | b))
    assert dice_mean == pytest.approx(np.mean(list(dice_per.values())))
    assert jac_mean == pytest.approx(np.mean(list(jac_per.values())))
    assert 0.5 < jac_mean < dice_mean < 1.0


def test_identical_and_disjoint_maps():
    fixed = np.zeros((4, 4, 4), np.int16)
    fixed[:2] = 5
    assert metrics.dice(fixed, fixed) == ({5: 1.0}, 1.0)
    moved = np.zeros_like(fixed)
    moved[2:] = 5
    assert metrics.dice(fixed, moved)[1] == 0.0
    assert metrics.jaccard(fixed, moved)[1] == 0.0


def test_absent_label_is_nan_and_left_out_of_the_mean():
    fixed = np.zeros((4, 4, 4), np.int32)
    fixed[0] = 1
    fixed[1] = 2
    warped = fixed.copy()
    warped[1, :2] = 0  # label 2 half gone: dice 2·8/(16+8)
    per_label, mean = metrics.dice(fixed, warped, label_values=[1, 2, 7])
    assert per_label[1] == 1.0
    assert per_label[2] == pytest.approx(2 * 8 / 24)
    assert math.isnan(per_label[7])
    assert mean == pytest.approx((1.0 + 2 * 8 / 24) / 2)
    per_label, mean = metrics.jaccard(fixed, warped, label_values=[7])
    assert math.isnan(per_label[7]) and math.isnan(mean)


def test_overlap_accepts_float_maps_with_whole_values():
    """nibabel's get_fdata gives float64 label maps; their scores equal the integer maps'."""
    rng = np.random.default_rng(1)
    fixed = rng.integers(0, 5, size=(6, 5, 4)) * 10 - 20  # negative and large ids too
    warped = np.where(rng.uniform(size=fixed.shape) < 0.3, 0, fixed)
    for score in (metrics.dice, metrics.jaccard):
        expected = score(fixed.astype(np.int32), warped.astype(np.int32))
        assert score(fixed.astype(np.float64), warped.astype(np.float32)) == expected
        assert score(fixed.astype(np.float32), warped.astype(np.int16), label_values=[-10, 20]) == \
            score(fixed, warped, label_values=[-10, 20])
    per_label, _ = metrics.dice(fixed.astype(np.float64), warped.astype(np.float64))
    assert all(type(value) is int for value in per_label)


@pytest.mark.parametrize("bad", [0.5, np.nan, np.inf])
def test_overlap_refuses_values_that_are_not_whole(bad):
    labels = np.zeros((3, 3, 3), np.float64)
    labels[1, 1, 1] = bad
    with pytest.raises(ValueError, match="warped_labels must hold integer label ids; 1 of its 27"):
        metrics.dice(np.zeros((3, 3, 3), np.int32), labels)
    with pytest.raises(ValueError, match="fixed_labels .* not whole numbers"):
        metrics.jaccard(labels, np.zeros((3, 3, 3), np.int32))


def test_overlap_refuses_mismatched_and_non_numeric_maps():
    labels = np.zeros((3, 3, 3), np.int32)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.dice(labels, np.zeros((3, 3, 4), np.int32))
    with pytest.raises(ValueError, match="integer label ids; got bool"):
        metrics.dice(labels, labels.astype(bool))


# ----- landmark distance -------------------------------------------------------------------
def test_landmark_distance_constant_flow_with_anisotropic_spacing():
    t = np.array([1.0, -2.0, 0.5])
    flow = np.broadcast_to(t, (8, 9, 7, 3)).astype(np.float32)
    fixed_points = np.array([[1, 2, 3], [4.5, 3.25, 2.0], [7, 8, 6]])
    moving_points = fixed_points + np.array([[1.0, -2.0, 0.5],     # exact match
                                             [3.0, -2.0, 0.5],     # 2 voxels off along axis 0
                                             [1.0, 0.0, 0.5]])     # 2 voxels off along axis 1
    result = metrics.landmark_distance(flow[None], fixed_points, moving_points, spacing=(2.0, 1.0, 1.0))
    np.testing.assert_allclose(result["voxels"], [0.0, 2.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(result["mm"], [0.0, 4.0, 2.0], atol=1e-6)
    assert result["mean_voxels"] == pytest.approx(4 / 3)
    assert result["mean_mm"] == pytest.approx(2.0)


def test_landmark_distance_samples_a_linear_flow_exactly_between_voxels():
    shape = (10, 9, 8)
    W = np.array([[0.1, 0.0, 0.02], [0.0, -0.05, 0.0], [0.03, 0.0, 0.0]])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    flow = grid @ W.T + np.array([0.5, 1.0, -1.0])
    fixed_points = np.random.default_rng(1).uniform(0, np.array(shape) - 1, size=(20, 3))
    moving_points = fixed_points + fixed_points @ W.T + np.array([0.5, 1.0, -1.0])
    result = metrics.landmark_distance(flow, fixed_points, moving_points)
    np.testing.assert_allclose(result["voxels"], 0.0, atol=1e-9)


def test_landmark_distance_rejects_bad_points():
    flow = np.zeros((4, 4, 4, 3))
    with pytest.raises(ValueError):
        metrics.landmark_distance(flow, np.zeros((3, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        metrics.landmark_distance(np.zeros((2, 4, 4, 4, 3)), np.zeros((1, 3)), np.zeros((1, 3)))


# ----- folding -----------------------------------------------------------------------------
def test_folding_fraction_of_half_reflected_volume():
    """f_0 = −2·x_0 for x_0 < 8 maps x_0 ↦ −x_0 (a reflection, det −1) on that half.
    With central differences: x_0 = 0..6 have det −1; x_0 = 7 sees (0 − (−12))/2 = 6 and
    x_0 = 8 sees (0 − (−14))/2 = 7, both positive; so exactly 7 of 16 planes fold."""
    n = 16
    flow = np.zeros((n, 6, 5, 3), np.float32)
    x0 = np.arange(n)
    flow[..., 0] = np.where(x0 < 8, -2.0 * x0, 0.0)[:, None, None]
    assert metrics.folding_fraction(flow) == pytest.approx(7 / 16)
    det = metrics.jacobian_determinant(flow).numpy()
    np.testing.assert_allclose(det[:7], -1.0)
    assert metrics.folding_fraction(np.zeros((1, 5, 5, 5, 3), np.float32)) == 0.0
    full = np.zeros((1, 5, 5, 5, 3), np.float32)
    full[..., 0] = -2.0 * np.arange(5)[:, None, None]
    assert metrics.folding_fraction(full) == 1.0


def test_overlap_table_matches_per_label_counts():
    """The one-pass table against Dice and Jaccard counted label by label with numpy, with ids
    not in the list (ignored), a listed id absent from both maps (NaN, left out) and 0."""
    rng = np.random.default_rng(2)
    fixed = rng.choice([0, 21, 22, 182, 999], size=(20, 18, 16))
    warped = np.where(rng.random(fixed.shape) < 0.7, fixed, rng.choice([0, 21, 22, 182], size=fixed.shape))
    values = [182, 21, 0, 22, 50]
    per_label, dice_mean, jaccard_mean = metrics.overlap_table(fixed, warped, values)
    dices, jaccards = [], []
    for v in (21, 22, 182):
        a, b = fixed == v, warped == v
        inter = np.sum(a & b)
        dices.append(2 * inter / (a.sum() + b.sum()))
        jaccards.append(inter / np.sum(a | b))
        assert per_label[v] == pytest.approx(dices[-1])
    assert np.isnan(per_label[50])
    assert dice_mean == pytest.approx(np.mean(dices)) and jaccard_mean == pytest.approx(np.mean(jaccards))
