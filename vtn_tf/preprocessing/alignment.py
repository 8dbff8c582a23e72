"""Initial alignment of two scans in world space, before the network sees them.

Scans come in their own position and orientation. Before the moving image is sampled onto
the network grid, a rigid world-space transform ``T`` (4x4, RAS mm) brings it close to the
fixed one, as the ANTs and elastix initialisers do:

* ``"com"``: the intensity centres of mass coincide (a translation);
* ``"moments"``: the centres coincide and the principal axes of the intensity distributions
  are matched (a rotation about the centre); where the principal axes are ill-defined
  (two second moments within 5 % of each other, e.g. a near-spherical object) the rotation
  is left out and only the centres are matched;
* ``"none"``: the identity (the headers are trusted as they are);
* ``"best"``: ``"moments"`` or ``"com"``, whichever makes the two images correlate better
  (chosen by the caller, `vtn_tf.registration.inputs`, on the network grid): principal axes
  where they help, centres alone where the axes mislead (docs/results.md, choices).

`vtn_tf.registration` then refines ``T`` by a short intensity-based affine search
(`vtn_tf.registration.affine_search.search_affine`, ``--init_steps``): two brains' principal axes differ by a few
degrees, and the search brings a pre-aligned scan and the same scan moved in its header to the
same optimum (within 0.1 mm on the LPBA40 validation subjects).

``T`` maps a point of the **fixed** image to the corresponding point of the **moving** image
(pull direction, like every field in vtn_tf): ``p_moving = T @ p_fixed``. Weights are the
normalised intensities (background 0), on every ``stride``-th voxel per axis.

Numpy only (no TensorFlow, no I/O).
"""

import numpy as np

MODES = ("best", "moments", "com", "none")
AMBIGUOUS_RATIO = 1.05  # second moments closer than this ratio: axes ill-defined


def rotation_about(axis, degrees):
    """3x3 rotation by ``degrees`` about the unit vector along ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def moments(data, affine, stride=2):
    """Intensity-weighted centre ``[3]`` (RAS mm) and covariance ``[3, 3]`` (mm²) of a volume.

    Args:
      data: ``[X, Y, Z]`` non-negative weights (normalised intensities).
      affine: ``(4, 4)`` voxel indices -> RAS mm.
      stride: use every ``stride``-th voxel along each axis (speed; the moments of a smooth
        image barely change).
    The moments are computed in voxel indices from the volume's 2-D marginals (sums along one
    axis), then mapped to world coordinates by the affine (linear maps carry moments exactly).
    """
    sub = np.clip(np.asarray(data, np.float32)[::stride, ::stride, ::stride], 0.0, None).astype(np.float64)
    total = sub.sum()
    if total <= 0:
        raise ValueError("the image has no positive intensity to align on")
    index = [np.arange(n) * float(stride) for n in sub.shape]
    planes = {(0, 1): sub.sum(2), (0, 2): sub.sum(1), (1, 2): sub.sum(0)}
    lines = [planes[(0, 1)].sum(1), planes[(0, 1)].sum(0), planes[(0, 2)].sum(0)]
    mean = np.array([lines[a] @ index[a] for a in range(3)]) / total
    second = np.zeros((3, 3))
    for a in range(3):
        second[a, a] = lines[a] @ index[a] ** 2 / total
    for (a, b), plane in planes.items():
        second[a, b] = second[b, a] = index[a] @ plane @ index[b] / total
    covariance_index = second - np.outer(mean, mean)
    linear = np.asarray(affine, float)[:3, :3]
    return linear @ mean + np.asarray(affine, float)[:3, 3], linear @ covariance_index @ linear.T


def _principal_axes(covariance):
    """Eigenvalues (descending) and eigenvectors (columns) of a covariance."""
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


def _ambiguous(values):
    return bool(np.any(values[:-1] / np.maximum(values[1:], 1e-12) < AMBIGUOUS_RATIO))


def initial_alignment(fixed, fixed_affine, moving, moving_affine, mode="moments", stride=2):
    """The rigid world transform ``T`` (4x4, RAS mm, fixed point -> moving point).

    Args:
      fixed, moving: ``[X, Y, Z]`` normalised intensities (background near 0), each on its grid.
      fixed_affine, moving_affine: their ``(4, 4)`` voxel -> RAS mm affines.
      mode: one of :data:`MODES` (see the module notes).
    Returns:
      ``(T, description)``: ``T`` as a 4x4 float64 array and a one-line summary of what was
      done (shift in mm, rotation in degrees).
    """
    if mode not in MODES[1:]:
        raise ValueError(f"initial alignment must be one of {', '.join(MODES[1:])}; got {mode!r}")
    T = np.eye(4)
    if mode == "none":
        return T, "no initial alignment"
    centre_f, cov_f = moments(fixed, fixed_affine, stride)
    centre_m, cov_m = moments(moving, moving_affine, stride)
    rotation, note = np.eye(3), ""
    if mode == "moments":
        values_f, axes_f = _principal_axes(cov_f)
        values_m, axes_m = _principal_axes(cov_m)
        if _ambiguous(values_f) or _ambiguous(values_m):
            note = " (principal axes ill-defined: centres only)"
        else:
            signs = np.sign(np.sum(axes_f * axes_m, axis=0))  # each moving axis towards the fixed one
            signs[signs == 0] = 1.0
            axes_m = axes_m * signs
            if np.linalg.det(axes_m @ axes_f.T) < 0:  # a reflection: flip the least certain axis
                axes_m[:, -1] *= -1.0
            rotation = axes_m @ axes_f.T
    T[:3, :3] = rotation
    T[:3, 3] = centre_m - rotation @ centre_f
    angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)))
    shift = np.linalg.norm(centre_m - centre_f)
    return T, f"initial alignment ({mode}): centres {shift:.1f} mm apart, rotation {angle:.1f} degrees{note}"
