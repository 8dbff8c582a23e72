"""vtn_tf.preprocessing.alignment: the initial world alignment recovers known rigid moves of a volume."""

import numpy as np
from scipy import ndimage

from vtn_tf.preprocessing import alignment


def ellipsoid(shape=(48, 44, 40), radii=(18, 12, 8)):
    index = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"), -1)
    inside = np.sum((index / np.asarray(radii)) ** 2, -1) <= 1
    return ndimage.gaussian_filter(inside.astype(np.float32), 1.0)


def moved_affine(affine, matrix):
    return matrix @ affine


def test_centres_and_principal_axes_undo_a_known_rigid_header_move():
    data = ellipsoid()
    fixed_affine = np.diag([1.5, 1.2, 1.0, 1.0])
    world_move = np.eye(4)
    world_move[:3, :3] = alignment.rotation_about([0.3, -0.5, 0.8], 20.0)
    world_move[:3, 3] = [12.0, -20.0, 7.0]
    moving_affine = moved_affine(fixed_affine, world_move)  # same voxels, content moved in world
    T, note = alignment.initial_alignment(data, fixed_affine, data, moving_affine, "moments", stride=1)
    # T maps fixed points to moving points: here exactly the world move.
    np.testing.assert_allclose(T, world_move, atol=0.05)
    assert "rotation 20.0 degrees" in note or "rotation 19.9" in note or "rotation 20.1" in note
    T_com, _ = alignment.initial_alignment(data, fixed_affine, data, moving_affine, "com", stride=1)
    np.testing.assert_allclose(T_com[:3, :3], np.eye(3))
    centre = fixed_affine[:3, :3] @ ((np.array(data.shape) - 1) / 2)
    np.testing.assert_allclose(T_com[:3, 3], world_move[:3, :3] @ centre + world_move[:3, 3] - centre, atol=0.05)
    T_none, _ = alignment.initial_alignment(data, fixed_affine, data, moving_affine, "none")
    np.testing.assert_array_equal(T_none, np.eye(4))


def test_ill_defined_axes_fall_back_to_centres():
    sphere = ellipsoid(radii=(10, 10, 10))
    affine = np.eye(4)
    moved = affine.copy()
    moved[:3, 3] = [3.0, 0.0, 0.0]
    T, note = alignment.initial_alignment(sphere, affine, sphere, moved, "moments", stride=1)
    np.testing.assert_allclose(T[:3, :3], np.eye(3))
    np.testing.assert_allclose(T[:3, 3], [3.0, 0.0, 0.0], atol=1e-6)
    assert "ill-defined" in note
