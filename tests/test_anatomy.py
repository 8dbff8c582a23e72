"""Anatomy-aware training (a soft Dice term on warped training labels) and the optimiser
without the network (``passes=0``), checked against numpy and scipy."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage
from test_training import TINY, toy_manifest  # noqa: F401  (the fixture)

from vtn_tf.nn import losses
from vtn_tf.nn.model import VTN
from vtn_tf.training import config as config_lib
from vtn_tf.training import data as data_lib
from vtn_tf.training import loop


def numpy_soft_dice_loss(fixed, warped):
    """Per pair: 1 - mean over structures present in either map of 2|f.w| / (|f| + |w|)."""
    out = []
    for f, w in zip(fixed, warped):
        scores = []
        for k in range(f.shape[-1]):
            volume = f[..., k].sum() + w[..., k].sum()
            if volume > 0:
                scores.append(2 * (f[..., k] * w[..., k]).sum() / volume)
        out.append(1 - np.mean(scores) if scores else 0.0)
    return np.array(out)


def test_soft_dice_loss_matches_numpy_and_ignores_absent_structures():
    rng = np.random.default_rng(0)
    fixed = (rng.random((2, 6, 5, 4, 3)) > 0.6).astype(np.float32)
    warped = rng.random((2, 6, 5, 4, 3)).astype(np.float32)
    fixed[0, ..., 2] = 0
    warped[0, ..., 2] = 0  # structure 2 absent from pair 0: it must not count
    np.testing.assert_allclose(losses.label_dice_loss(fixed, warped).numpy(),
                               numpy_soft_dice_loss(fixed, warped), rtol=1e-5)
    assert losses.label_dice_loss(fixed, fixed).numpy() == pytest.approx([0, 0], abs=1e-6)
    assert losses.label_dice_loss(fixed, 1 - fixed).numpy() == pytest.approx([1, 1], abs=1e-6)
    assert losses.label_dice_loss(np.zeros_like(fixed), np.zeros_like(fixed)).numpy() == pytest.approx([0, 0])


def test_one_hot_labels_keep_the_listed_values_only():
    labels = np.array([0, 21, 22, 182, -2, 5, 22]).reshape(1, 7, 1, 1, 1)
    one_hot = data_lib.one_hot_labels(tf.constant(labels), [21, 22, 182]).numpy()
    expected = np.stack([labels[..., 0] == v for v in (21, 22, 182)], -1).astype(np.float32)
    np.testing.assert_array_equal(one_hot, expected)
    assert data_lib.foreground_values([0, 21, 22]) == [21, 22]


def test_the_label_term_is_the_dice_of_labels_warped_by_the_final_flow():
    """The model's label_dice term equals numpy's soft Dice of the moving one-hot maps
    resampled through the model's own flow with scipy (trilinear, edge-clamped)."""
    rng = np.random.default_rng(1)
    shape = (64, 64, 64)
    fixed = rng.random((1, *shape, 1)).astype(np.float32)
    moving = ndimage.gaussian_filter(rng.random(shape), 3)[None, ..., None].astype(np.float32)
    grid = np.indices(shape)
    ball = lambda centre, r: (np.sum((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2, 0) < r * r)  # noqa: E731
    fixed_labels = np.stack([ball((30, 30, 30), 10), ball((40, 20, 34), 7)], -1)[None].astype(np.float32)
    moving_labels = np.stack([ball((33, 28, 31), 11), ball((38, 22, 30), 6)], -1)[None].astype(np.float32)
    model = VTN("D", width=0.125, flow_head_initializer="lecun_uniform", label_weight=2.0)
    model.build((None, *shape, 1))
    terms = model.loss_terms(fixed, moving, labels=(fixed_labels, moving_labels))
    flow = model({"fixed": fixed, "moving": moving})["flow"].numpy()[0]
    assert np.abs(flow).max() > 0.1  # a non-trivial flow, or the test would prove little
    points = [np.clip(grid[i] + flow[..., i], 0, shape[i] - 1) for i in range(3)]
    warped = np.stack([ndimage.map_coordinates(moving_labels[0, ..., k], points, order=1)
                       for k in range(2)], -1)[None]
    assert float(terms["label_dice"]) == pytest.approx(numpy_soft_dice_loss(fixed_labels, warped)[0], abs=1e-4)
    unlabelled = model.loss_terms(fixed, moving)
    assert float(terms["loss"]) == pytest.approx(float(unlabelled["loss"]) + 2.0 * float(terms["label_dice"]),
                                                 rel=1e-5)


def test_folding_weight_adds_the_folding_of_the_final_flow_to_the_loss():
    rng = np.random.default_rng(2)
    shape = (64, 64, 64)
    fixed, moving = (ndimage.gaussian_filter(rng.random(shape), 2)[None, ..., None].astype(np.float32)
                     for _ in range(2))
    model = VTN("D", width=0.125, flow_head_initializer="lecun_uniform", flow_scale=400.0, folding_weight=3.0)
    model.build((None, *shape, 1))
    terms = model.loss_terms(fixed, moving)
    flow = model({"fixed": fixed, "moving": moving})["flow"].numpy()
    base = flow[:, :-1, :-1, :-1].astype(np.float64)
    J = np.stack([flow[:, 1:, :-1, :-1] - base, flow[:, :-1, 1:, :-1] - base, flow[:, :-1, :-1, 1:] - base], -1)
    folding = np.maximum(-np.linalg.det(J + np.eye(3)), 0).mean()
    assert folding > 1e-4  # the large flow scale makes a folding flow, or the test would prove little
    assert float(terms["folding"]) == pytest.approx(folding, rel=1e-4)
    plain = VTN("D", width=0.125, flow_head_initializer="lecun_uniform", flow_scale=400.0)
    plain.build((None, *shape, 1))
    plain.set_weights(model.get_weights())
    assert "folding" not in plain.loss_term_names()
    assert float(terms["loss"]) == pytest.approx(float(plain.loss_terms(fixed, moving)["loss"]) + 3.0 * folding,
                                                 rel=1e-5)


def test_training_with_labels_feeds_one_hot_maps_and_logs_the_term(toy_manifest, tmp_path):  # noqa: F811
    tiny = config_lib.load_config(TINY, [f"data.manifest={toy_manifest}", "model.label_weight=1",
                                                      "train.epochs=1", "train.steps_per_epoch=2"])
    dataset = data_lib.load_prepared(toy_manifest)
    structures = [v for v in dataset.label_values if v != 0]
    history = []
    summary = loop.train(tiny, tmp_path / "run", verbose=0, log=history.append)
    assert summary["steps"] == 2
    assert any(f"soft Dice on {len(structures)} warped training structures" in line for line in history), history
    pairs = data_lib.training_pairs(dataset)
    batch = next(iter(data_lib.pair_dataset(dataset, pairs, 2, include_labels=True, max_displacement=2.0,
                                            one_hot=data_lib.foreground_values(dataset.label_values))))
    assert batch["fixed_labels"].shape == (2, 64, 64, 64, len(structures)) and batch["fixed_labels"].dtype == tf.float32
    assert set(np.unique(batch["moving_labels"].numpy())) <= {0.0, 1.0}
    np.testing.assert_array_less(batch["fixed_labels"].numpy().sum(-1), 1.5)  # one structure per voxel


def test_labels_asked_for_without_label_maps_is_a_config_error(tmp_path):
    import subprocess
    import sys

    from data_prep.toy import write_toy_folder
    write_toy_folder(tmp_path / "raw", subjects=4)
    for path in (tmp_path / "raw" / "labels").iterdir():
        path.unlink()
    (tmp_path / "raw" / "labels").rmdir()
    subprocess.run([sys.executable, "-m", "data_prep", "--layout", "folder", "--input", str(tmp_path / "raw"),
                    "--modality", "MRI", "--no-crop", "--grid", "64", "64", "64", "--validation-count", "1",
                    "--output", str(tmp_path / "prepared")], check=True, capture_output=True)
    config = config_lib.load_config(TINY, [f"data.manifest={tmp_path / 'prepared'}/manifest.json",
                                                        "model.label_weight=1"])
    with pytest.raises(config_lib.ConfigError, match="have no label map"):
        loop.train(config, tmp_path / "run", verbose=0, log=lambda *_: None)
