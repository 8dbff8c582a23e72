"""Register new image files in world space with a trained VTN run directory.

`register_files(run_dir, fixed, moving, out)` (the library of ``vtn-register``) reads two
3-D volumes of any size, spacing and orientation, runs the network on its own grid and writes
the result in the **fixed image's world space, on the fixed image's grid, with its affine**.

Grids (all affines map voxel indices to RAS mm, as in `vtn_tf.io`):

* ``F``: the fixed image's grid, affine ``A_f``. ``M``: the moving image's grid, ``A_m``.
* ``N``: the network grid (the run's ``image_shape``, e.g. 64^3) covering the fixed image's
  field of view with voxel *cells* aligned at the edges (as `data_prep` resamples): network
  index ``n`` sits at fixed index ``x = s * n + (s - 1) / 2`` with ``s = F_size / N_size`` per
  axis. This map is the 4x4 ``G`` below; the network grid's affine is ``A_f @ G``.
* The fixed image is resampled onto ``N`` (trilinear, edge-clamped); the moving image is
  sampled onto ``N`` **through world coordinates**, at moving index ``A_m^-1 A_f G n``, so its
  own orientation, spacing and field of view are honoured (0 outside it). Both are
  normalised on their own voxels before resampling (``mri``: clip to the 0.5/99.5
  percentiles and rescale to [0, 1], as `data_prep`; ``ct``: window 290 / level 120 HU;
  ``none``: as they are).

The network's flow ``f_N`` (voxels of ``N``, pulling) is brought onto the fixed grid by
trilinear interpolation at ``G^-1 x`` (edge-clamped) and scaled by ``s`` per axis.

Outputs (``out/``):

* ``flow_voxels.nii.gz``: float32 ``[X, Y, Z, 3]`` (Learn2Reg layout), displacement **in
  voxels of the fixed grid**, pulling, channel c along array axis c: fixed voxel ``x``
  corresponds to the world point ``A_f (x + u(x))``, i.e. to moving voxel
  ``A_m^-1 A_f (x + u(x))``. When both images share one grid (``A_m = A_f``) this is the
  usual Learn2Reg meaning ``moving_voxel = x + u(x)``.
* ``flow_itk.nii.gz``: float32 ``[X, Y, Z, 1, 3]`` NIfTI, intent 1007 (vector), the fixed
  affine; vectors in physical **LPS millimetres** ``d(p)`` so that a fixed point ``p`` maps
  to the moving point ``p + d(p)`` (ITK/ANTs displacement field: ``antsApplyTransforms -t``,
  ``sitk.DisplacementFieldTransform``). ``d = diag(-1, -1, 1) A_f[:3, :3] u`` (NIfTI
  affines are RAS, ITK vectors LPS).
* ``warped.nii.gz``: float32, the moving image in its original intensities resampled at
  ``A_m^-1 A_f (x + u(x))`` (trilinear; 0 beyond half a voxel outside the moving volume).
* ``warped_labels_<name>.nii.gz``: each moving label map, same positions, nearest neighbour,
  ids unchanged, integer dtype of the input file (int32 if it stored floats).
* ``affine.json`` / ``affine.txt`` (models with an affine stage): the affine stage alone.
  JSON: ``A`` (3x3) and ``b`` (voxels) acting on centred network coordinates
  ``c = n - (N_size - 1) / 2`` (sampled position ``A c + b``), the network grid and its
  affine, and ``world_ras`` / ``world_lps``, the 4x4 maps taking a fixed-image point (mm) to
  the corresponding moving-image point (pull direction, like the fields). The text file is
  the same LPS map as an ITK transform file (``AffineTransform_double_3_3``), readable by
  ``sitk.ReadTransform`` and ``antsApplyTransforms``.

Every input is read and checked, the model restored and all results computed before the
first file is written; each file is written atomically (`vtn_tf.io`), and existing outputs
are refused unless ``overwrite``.
"""

"""Register new image files in world space with a trained VTN run directory.

`register_files(run_dir, fixed, moving, out)` (the library of ``vtn-register``) reads two
3-D volumes of any size, spacing and orientation, prepares them as the model's training
volumes were prepared (its :class:`vtn_tf.preprocess.InputContract`), aligns them in world
space, runs the network on its grid and writes the result in the **fixed image's world
space, on the fixed image's grid, with its affine**. Every resampling runs in TensorFlow
with the project's compiled sampler (`vtn_tf.spatial.sample`), float32, in slabs of the
fixed grid so memory stays bounded.

Grids and maps (all affines map voxel indices to RAS mm, as in `vtn_tf.io`):

* ``F``: the fixed image's grid, affine ``A_f``. ``M``: the moving image's grid, ``A_m``.
* ``G``: network index -> fixed index, the contract's crop box of the fixed image resampled
  onto the network grid ``N`` (`vtn_tf.preprocess.grid_map`; the whole image without a
  crop). The fixed image is sampled at ``G n`` (trilinear, edge-clamped) and normalised
  exactly as the training volumes were.
* ``T``: the initial alignment (`vtn_tf.alignment`), world fixed point -> world moving
  point. The moving image, normalised on its own crop box, is sampled at moving index
  ``A_m^-1 T A_f G n`` (0 outside it).
* The network's flow ``f_N`` (voxels of ``N``, pulling) is brought onto the fixed grid at
  ``G^-1 x`` (trilinear, edge-clamped), scaled by ``G``'s voxel ratio, and composed with
  ``T``: the fixed voxel ``x`` corresponds to the world point ``T A_f (x + S f_N(G^-1 x))``.
* With ``refine`` the field is then optimised on the pair (`vtn_tf.refine`).

Outputs (``out/``; ``.nii`` instead of ``.nii.gz`` with ``compression=0``):

* ``flow_voxels.nii.gz``: float32 ``[X, Y, Z, 3]`` (Learn2Reg layout), displacement **in
  voxels of the fixed grid**, pulling, channel c along array axis c, the initial alignment
  included: fixed voxel ``x`` corresponds to the world point ``A_f (x + u(x))``, i.e. to
  moving voxel ``A_m^-1 A_f (x + u(x))``. When both images share one grid this is the usual
  Learn2Reg meaning ``moving_voxel = x + u(x)``.
* ``flow_itk.nii.gz``: float32 ``[X, Y, Z, 1, 3]`` NIfTI, intent 1007 (vector), the fixed
  affine; vectors in physical **LPS millimetres** ``d(p)`` so that a fixed point ``p`` maps
  to the moving point ``p + d(p)`` (ITK/ANTs displacement field: ``antsApplyTransforms -t``,
  ``sitk.DisplacementFieldTransform``). ``d = diag(-1, -1, 1) A_f[:3, :3] u``.
* ``warped.nii.gz``: float32, the moving image in its original intensities resampled at
  ``A_m^-1 A_f (x + u(x))`` (trilinear; 0 beyond half a voxel outside the moving volume).
* ``warped_labels_<name>.nii.gz``: each moving label map, same positions, nearest neighbour
  (half up, as ITK), ids unchanged, integer dtype of the input file (int32 if it stored floats).
* ``affine.json`` / ``affine.txt``: the affine part: the initial alignment composed with the
  network's affine stage (models without one: the initial alignment alone). JSON: ``A``
  (3x3) and ``b`` (voxels) of the affine stage on centred network coordinates
  ``c = n - (N_size - 1) / 2`` (sampled position ``A c + b``), the network grid and its
  affine, ``initial_alignment_ras`` (``T``) and ``world_ras`` / ``world_lps``, the 4x4 maps
  taking a fixed-image point (mm) to the corresponding moving-image point (pull direction,
  like the fields). The text file is the same LPS map as an ITK transform file
  (``AffineTransform_double_3_3``), readable by ``sitk.ReadTransform`` and
  ``antsApplyTransforms``.

Every input is read and checked, the model restored and all results computed before the
first file is written; the files are written into a temporary folder beside ``out`` and
moved there together, so an error leaves nothing behind, and existing outputs are refused
unless ``overwrite``.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import threading
import time
import weakref

import nibabel as nib
import numpy as np

from vtn_tf import alignment, io, preprocess

_LPS = np.diag([-1.0, -1.0, 1.0])
_LPS4 = np.diag([-1.0, -1.0, 1.0, 1.0])
SLAB_VOXELS = 1 << 23  # fixed-grid voxels resampled at a time (bounds memory on large grids)
COMPRESSION_LEVELS = tuple(range(10))  # gzip level; 0 writes uncompressed .nii


# ----- TensorFlow resampling -----------------------------------------------------------------
def expected_retracing(record):
    """A `logging` filter: False for TensorFlow's retracing warning. The compiled resampling,
    search and refinement kernels trace once per grid size and mode by design (XLA needs
    static shapes), so a run over scans of several sizes retraces them as it should."""
    return "triggered tf.function retracing" not in record.getMessage()


class _RetracingFilter(logging.Filter):
    def filter(self, record):
        return expected_retracing(record)


def _quiet_retracing(function):
    """Run ``function`` with :func:`expected_retracing` on the ``tensorflow`` logger (only
    while it runs: the caller's own functions keep their warnings outside these calls)."""
    @functools.wraps(function)
    def quiet(*args, **kwargs):
        logger, only = logging.getLogger("tensorflow"), _RetracingFilter()
        logger.addFilter(only)
        try:
            return function(*args, **kwargs)
        finally:
            logger.removeFilter(only)
    return quiet


def _tf():
    import tensorflow as tf  # only when registering: io-only users do not pay the start-up

    return tf


def _slabs(shape):
    """Row ranges along axis 0 of a grid of ``shape`` holding at most ``SLAB_VOXELS`` voxels."""
    rows = max(1, SLAB_VOXELS // max(1, int(shape[1]) * int(shape[2])))
    return [range(start, min(start + rows, int(shape[0]))) for start in range(0, int(shape[0]), rows)]


_KERNELS = {}
_KERNELS_LOCK = threading.Lock()


def _kernels():
    """The compiled kernels of this module, built on first use (io-only users never import TF).

    Each builds the voxel grid of a slab inside XLA (``shape``: the slab's static ``(rows, Y, Z)``,
    ``start``: its first row), so neither the grid nor the mapped positions are materialised
    apart from what is returned: one fused program per slab shape."""
    with _KERNELS_LOCK:
        if not _KERNELS:
            _KERNELS.update(_build_kernels())
    return _KERNELS


def _build_kernels():
    tf = _tf()
    from vtn_tf import spatial

    def grid(start, shape):
        """Voxel index components ``(x, y, z)``, broadcastable to ``[rows, Y, Z]``."""
        return (tf.reshape(tf.range(shape[0], dtype=tf.float32) + start, [-1, 1, 1]),
                tf.reshape(tf.range(shape[1], dtype=tf.float32), [1, -1, 1]),
                tf.reshape(tf.range(shape[2], dtype=tf.float32), [1, 1, -1]))

    def mapped(matrix, p, shape):
        """``matrix`` (``[3, 4]``) applied to the point components ``p``: ``[rows, Y, Z, 3]``."""
        return tf.stack([tf.broadcast_to(p[0] * matrix[i, 0] + p[1] * matrix[i, 1] + p[2] * matrix[i, 2]
                                         + matrix[i, 3], shape) for i in range(3)], axis=-1)

    def positions(start, matrix, field, shape):
        """``matrix (x + field(x))`` for the slab's voxels ``x`` (``field`` None: 0)."""
        p = grid(start, shape)
        if field is not None:
            p = tuple(p[c] + field[..., c] for c in range(3))
        return mapped(matrix, p, shape)

    @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
    def map_points(points, matrix):
        return spatial.map_points(points, matrix)

    @tf.function(jit_compile=True, autograph=False)
    def grid_points(start, shape):
        return tf.stack([tf.broadcast_to(c, shape) for c in grid(start, shape)], axis=-1)

    @tf.function(jit_compile=True, autograph=False)
    def resample(image, start, matrix, field, shape, nearest, zero):
        at = positions(start, matrix, field, shape)[None]
        if nearest:
            return spatial._sample_at_nearest(image, at, zero)[0, ..., 0]
        return spatial._sample_at_linear(image, at, zero)[0, ..., 0]

    lerp_axis = tf.function(spatial.lerp_axis, jit_compile=True, autograph=False)

    @tf.function(jit_compile=True, autograph=False)
    def flow_on_fixed(flow, lower, upper, weight, linear, offset, start, shape):
        """``linear f + offset (x)``: ``f`` the network flow interpolated along axis 0 (already
        along axes 1 and 2), ``offset`` a [3, 4] affine map of the slab's voxels."""
        f = lerp_axis(flow, lower, upper, weight, 0)
        x = grid(start, shape)
        return tf.stack([f[..., 0] * linear[c, 0] + f[..., 1] * linear[c, 1] + f[..., 2] * linear[c, 2]
                         + x[0] * offset[c, 0] + x[1] * offset[c, 1] + x[2] * offset[c, 2] + offset[c, 3]
                         for c in range(3)], axis=-1)

    @tf.function(jit_compile=True, autograph=False)
    def intensity(data, low, scale, source, target, steps):
        """``clip((data - low) / scale)`` (float32, as numpy computes it) through the curve of
        knots ``source`` -> ``target`` (float64, as ``np.interp``): the segment by a binary
        search of ``steps`` (static) halvings, the value in float64, then float32."""
        x = tf.clip_by_value((tf.cast(data, tf.float32) - low) / scale, 0.0, 1.0)
        if source is None:
            return x
        x = tf.cast(x, tf.float64)
        last = int(source.shape[0]) - 2
        k = tf.zeros_like(x, tf.int32)
        for step in steps:
            candidate = tf.minimum(k + step, last)
            k = tf.where(tf.gather(source, candidate) <= x, candidate, k)
        low_knot, high_knot = tf.gather(source, k), tf.gather(source, k + 1)
        low_value, high_value = tf.gather(target, k), tf.gather(target, k + 1)
        value = (high_value - low_value) / (high_knot - low_knot) * (x - low_knot) + low_value
        return tf.cast(tf.clip_by_value(value, 0.0, 1.0), tf.float32)

    @tf.function(jit_compile=True, autograph=False)
    def length_stats(flow, spacing):
        millimetres = tf.norm(flow * spacing, axis=-1)
        return tf.reduce_mean(millimetres), tf.reduce_max(millimetres)

    return dict(map_points=map_points, grid_points=grid_points, resample=resample, lerp_axis=lerp_axis,
                flow_on_fixed=flow_on_fixed, intensity=intensity, length_stats=length_stats)


def _rows_shape(shape, rows):
    return (len(rows), int(shape[1]), int(shape[2]))


def _grid_rows(shape, rows):
    """Voxel indices ``[len(rows), Y, Z, 3]`` float32 (tf) of slices ``rows`` of a grid."""
    return _kernels()["grid_points"](_tf().constant(float(rows.start)), _rows_shape(shape, rows))


def _matrix34(matrix):
    return _tf().constant(np.asarray(matrix, np.float64)[:3], _tf().float32)


def _affine_points(matrix, points):
    """``matrix`` (4x4 numpy) applied to points ``[..., 3]`` (tf float32), one fused XLA kernel."""
    return _kernels()["map_points"](points, _matrix34(matrix))


def _as_image(data):
    """numpy ``[X, Y, Z]`` -> tf ``[1, X, Y, Z, 1]`` (labels keep their integer dtype)."""
    tf = _tf()
    data = np.asarray(data)
    if data.dtype.kind == "f":
        data = data.astype(np.float32, copy=False)
    elif data.dtype.kind in "iub" and data.dtype != np.int32:
        data = data.astype(np.int64 if data.dtype.itemsize > 4 or data.dtype == np.uint32 else np.int32)
    return tf.convert_to_tensor(data[None, ..., None])


def _joined(parts):
    return parts[0] if len(parts) == 1 else _tf().concat(parts, axis=0)


def resample_through(data, matrix, shape, interpolation="linear", outside="zero", field=None):
    """``data`` sampled onto a grid of ``shape`` at its voxel index ``matrix (x + field(x))``.

    Args:
      data: ``[X', Y', Z']`` numpy array (the source grid); integer for ``"nearest"``; or
        the same as a tf tensor ``[1, X', Y', Z', 1]`` (see :func:`_as_image`).
      matrix: 4x4 map from target voxel positions to source voxel indices.
      shape: ``(X, Y, Z)`` of the target grid.
      interpolation, outside: as `vtn_tf.spatial.sample`.
      field: optional ``[X, Y, Z, 3]`` float32 (tf or numpy) displacement in target voxels
        (pulling) added to the target voxel positions before ``matrix``.
    Returns:
      ``[X, Y, Z]`` numpy array (float32 for linear, ``data``'s dtype for nearest).
    """
    tf = _tf()
    if interpolation not in ("linear", "nearest") or outside not in ("zero", "clamp"):
        raise ValueError(f"unknown interpolation {interpolation!r} or outside mode {outside!r}")
    if isinstance(data, tf.Tensor):  # already [1, X', Y', Z', 1] (one conversion for several calls)
        image, dtype = data, data.dtype.as_numpy_dtype
    else:
        image = _as_image(np.asarray(data, np.float32) if interpolation == "linear" else data)
        dtype = np.asarray(data).dtype
    if field is not None:
        field = tf.convert_to_tensor(field, tf.float32)
    parts = [_kernels()["resample"](image, tf.constant(float(rows.start)), _matrix34(matrix),
                                    None if field is None else field[rows.start:rows.stop],
                                    _rows_shape(shape, rows), interpolation == "nearest", outside == "zero")
             for rows in _slabs(shape)]
    out = np.asarray(_joined(parts))
    return out.astype(dtype, copy=False) if interpolation == "nearest" else out


def _axis_weights(G, axis, size, network_size, rows=None):
    """Where fixed index ``x`` along ``axis`` reads the network grid: `vtn_tf.spatial.axis_reads`
    (``[len(rows)]`` or ``[size]``) of the network position ``G^-1 x``, trilinear sampling
    with edge clamping."""
    from vtn_tf import spatial

    x = np.arange(size, dtype=np.float64) if rows is None else np.arange(rows.start, rows.stop, dtype=np.float64)
    return spatial.axis_reads((x - G[axis, 3]) / G[axis, axis], network_size)


def network_flow_on_fixed(network_flow, G, fixed_shape, K=None):
    """The network's flow as the displacement ``flow_voxels`` on the fixed grid (tf).

    Args:
      network_flow: ``[Xn, Yn, Zn, 3]`` voxels of the network grid, pulling.
      G: 4x4 network index -> fixed index (a scaling and a shift per axis, as
        `vtn_tf.preprocess.grid_map` makes).
      fixed_shape: ``(X, Y, Z)`` of the fixed grid.
      K: optional 4x4 fixed voxel position -> fixed voxel position applied after the flow
        (the initial alignment ``A_f^-1 T A_f``); None: the identity.
    Returns:
      ``[X, Y, Z, 3]`` float32 tf tensor, voxels of the fixed grid, pulling: fixed voxel ``x``
      goes to the fixed-grid position ``K (x + S f_N(G^-1 x))``, trilinear in between network
      voxels and edge-clamped beyond them.

    ``G`` is axis-aligned, so the trilinear interpolation is separable: the flow is
    interpolated along z, then y, then x (in slabs of the fixed grid), and the result is
    ``K_lin S f + (K - I) x``.
    """
    tf = _tf()
    G = np.asarray(G, np.float64)
    if np.count_nonzero(G[:3, :3] - np.diag(np.diag(G[:3, :3]))):
        raise ValueError("network_flow_on_fixed needs an axis-aligned G (a scaling and a shift)")
    K = np.eye(4) if K is None else np.asarray(K, np.float64)
    kernels = _kernels()
    flow = tf.convert_to_tensor(np.asarray(network_flow, np.float32))
    network_shape = flow.shape[:3]
    for axis in (2, 1):
        flow = kernels["lerp_axis"](flow, *_axis_weights(G, axis, int(fixed_shape[axis]), network_shape[axis]), axis)
    linear = tf.constant(K[:3, :3] @ np.diag(np.diag(G)[:3]), tf.float32)
    offset = _matrix34(K - np.eye(4))
    return _joined([kernels["flow_on_fixed"](flow, *_axis_weights(G, 0, int(fixed_shape[0]), network_shape[0], rows),
                                             linear, offset, tf.constant(float(rows.start)),
                                             _rows_shape(fixed_shape, rows)) for rows in _slabs(fixed_shape)])


def normalised(data, intensity_map):
    """``intensity_map(data)`` (a :class:`vtn_tf.preprocess.IntensityMap`), float32 numpy, in
    one XLA kernel per slab with numpy's arithmetic (the scaling in float32, ``np.interp``'s
    segment and value in float64): equal to the numpy map within a float32 rounding, several
    times faster on a full-resolution scan. Slabs of ``SLAB_VOXELS`` bound the kernel's
    float64 temporaries: on a 512x512x400 scan at once they held 5.2 GB."""
    tf = _tf()
    if intensity_map.low is None:
        return intensity_map(data)
    source = target = None
    steps = ()
    if intensity_map.curve is not None:
        source, target = (tf.constant(np.asarray(a, np.float64), tf.float64) for a in intensity_map.curve)
        segments = int(source.shape[0]) - 1
        steps = tuple(1 << i for i in range(int(np.ceil(np.log2(max(segments, 1)))) - 1, -1, -1))
    data = np.asarray(data)
    data = data if data.dtype.kind in "fiu" and data.dtype.itemsize <= 4 else data.astype(np.float32)
    low = tf.constant(np.float32(intensity_map.low))
    scale = tf.constant(np.float32(intensity_map.high - intensity_map.low))
    out = np.empty(data.shape, np.float32)
    for rows in _slabs(data.shape):
        out[rows.start:rows.stop] = _kernels()["intensity"](tf.convert_to_tensor(data[rows.start:rows.stop]), low,
                                                            scale, source, target, steps)
    return out


def displacement_lengths(flow_voxels, spacing):
    """Mean and largest length (mm) of a displacement ``[X, Y, Z, 3]`` in voxels of ``spacing`` mm."""
    tf = _tf()
    mean, largest = _kernels()["length_stats"](tf.convert_to_tensor(flow_voxels, tf.float32),
                                               tf.constant(np.asarray(spacing, np.float32)))
    return float(mean), float(largest)


def inverse_field(flow_voxels, fixed_affine, moving_affine, initial, moving_shape, iterations=30):
    """The moving -> fixed displacement on the moving grid (the inverse of ``flow_voxels``).

    The forward map takes fixed voxel ``x`` to moving voxel ``P (x + u(x))``,
    ``P = A_m^-1 A_f``, and ``x + u(x) = K (x + d(x))`` with ``K = A_f^-1 T A_f`` the initial
    alignment and ``d`` the deformable remainder (the network's field, refinement included).
    For each moving voxel ``m`` the fixed point is found by fixed-point iteration on the
    remainder alone, ``x <- z - d(x)`` with ``z = K^-1 P^-1 m`` (``d`` trilinear, edge-clamped),
    which converges wherever ``d`` is a contraction (no folding); the affine part is inverted
    exactly.

    Args:
      flow_voxels: ``[X, Y, Z, 3]`` forward field (voxels of the fixed grid, pulling).
      fixed_affine, moving_affine: 4x4 voxel -> RAS mm. initial: ``T`` (4x4 RAS).
      moving_shape: ``(X', Y', Z')`` of the moving grid.
    Returns:
      ``(inverse, residual)``: ``[X', Y', Z', 3]`` float32 tf, **voxels of the moving grid**,
      pulling: moving voxel ``m`` corresponds to the world point ``A_m (m + v(m))``, i.e. to
      fixed voxel ``A_f^-1 A_m (m + v(m))``; and ``[X', Y', Z']`` the last iteration's step in
      fixed voxels (0 where converged).
    """
    from vtn_tf import spatial

    tf = _tf()
    K = np.linalg.inv(fixed_affine) @ initial @ fixed_affine
    P = np.linalg.inv(moving_affine) @ fixed_affine
    fixed_shape = flow_voxels.shape[:3]
    remainder = []  # d(x) = K^-1 (x + u(x)) - x
    for rows in _slabs(fixed_shape):
        x = _grid_rows(fixed_shape, rows)
        u = tf.convert_to_tensor(flow_voxels[rows.start:rows.stop], tf.float32)
        remainder.append(_affine_points(np.linalg.inv(K), x + u) - x)
    remainder = tf.concat(remainder, 0)[None]
    start = np.linalg.inv(K) @ np.linalg.inv(P)  # moving voxel -> z (fixed voxels)
    parts, residuals = [], []
    for rows in _slabs(moving_shape):
        m = _grid_rows(moving_shape, rows)
        z = _affine_points(start, m)
        x = z
        for _ in range(int(iterations)):
            previous = x
            x = z - spatial.sample(remainder, x[None], "linear", "clamp")[0]
        residuals.append(tf.norm(x - previous, axis=-1))
        parts.append(_affine_points(P, x) - m)
    return tf.concat(parts, 0), tf.concat(residuals, 0)


def inverse_consistency(flow_voxels, inverse, fixed_affine, moving_affine, mask):
    """RMS and 95th percentile (mm) of ``|inverse(forward(x)) - x|`` over the fixed ``mask``.

    ``forward``: ``flow_voxels`` (fixed grid); ``inverse``: :func:`inverse_field`'s field
    (moving grid), sampled trilinearly at the forward image of each fixed voxel.
    """
    from vtn_tf import spatial

    tf = _tf()
    P = np.linalg.inv(moving_affine) @ fixed_affine
    index = np.argwhere(np.asarray(mask))
    if len(index) > 400000:  # a deterministic subsample keeps it cheap on large masks
        index = index[:: len(index) // 400000 + 1]
    x = tf.constant(index, tf.float32)
    u = tf.gather_nd(tf.convert_to_tensor(flow_voxels, tf.float32), index)
    m = _affine_points(P, x + u)
    v = spatial.sample(tf.convert_to_tensor(inverse, tf.float32)[None], m[None, :, None, None], "linear",
                       "clamp")[0, :, 0, 0]
    back = _affine_points(np.linalg.inv(P), m + v)
    error = tf.norm(tf.tensordot(back - x, tf.constant(np.asarray(fixed_affine)[:3, :3].T, tf.float32), 1),
                    axis=-1).numpy()
    return float(np.sqrt(np.mean(error ** 2))), float(np.percentile(error, 95))


def itk_displacement(flow_voxels, fixed_affine):
    """ITK/ANTs displacement ``[X, Y, Z, 1, 3]`` float32, LPS mm, fixed point -> moving point.

    ``flow_voxels`` ``[X, Y, Z, 3]`` (voxels of the fixed grid) times the fixed grid's LPS
    direction-and-spacing matrix, in slabs of the grid (no full-size temporaries)."""
    flow_voxels = np.asarray(flow_voxels, np.float32)
    matrix = (_LPS @ np.asarray(fixed_affine, float)[:3, :3]).astype(np.float32)  # [mm axis, voxel axis]
    out = np.empty(flow_voxels.shape[:3] + (1, 3), np.float32)
    for rows in _slabs(flow_voxels.shape):
        part = flow_voxels[rows.start:rows.stop]
        for c in range(3):
            out[rows.start:rows.stop, :, :, 0, c] = (part[..., 0] * matrix[c, 0] + part[..., 1] * matrix[c, 1]
                                                     + part[..., 2] * matrix[c, 2])
    return out


def itk_field_image(flow_voxels, fixed_affine):
    """``flow_itk`` as a nibabel image: 5-D NIfTI, intent vector (1007), fixed affine."""
    image = nib.Nifti1Image(itk_displacement(flow_voxels, fixed_affine), fixed_affine)
    image.set_qform(fixed_affine, code=1)
    image.set_sform(fixed_affine, code=1)
    image.header.set_intent("vector")
    image.header.set_xyzt_units("mm")
    return image


# ----- the input contract ---------------------------------------------------------------------
def load_contract(run_dir, manifest_override=None):
    """The run's :class:`vtn_tf.preprocess.InputContract`.

    From ``run_dir/preprocessing.json`` (written by training), else from the manifest its
    ``config.json`` names. InputError when neither gives one (e.g. label-cropped training data).
    """
    run_dir = pathlib.Path(run_dir)
    stored = run_dir / "preprocessing.json"
    try:
        if stored.is_file():
            return preprocess.InputContract.from_json(json.loads(stored.read_text()), str(stored))
        from vtn_tf import data

        manifest = manifest_override or json.loads((run_dir / "config.json").read_text())["data"]["manifest"]
        return data.input_contract(manifest)
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise io.InputError(f"model {run_dir} has no usable input contract (preprocessing.json): "
                            f"{io.error_line(error)}") from None


def prepare_image(volume, contract, role):
    """A volume on the network grid of its own crop box, normalised as the training volumes.

    Returns ``(on_grid, G, intensity_map)``: ``[X, Y, Z]`` float32 in [0, 1], the 4x4 map
    network index -> the volume's voxel index, and the fitted :class:`~vtn_tf.preprocess.IntensityMap`.
    """
    box = preprocess.crop_box(volume.data, volume.spacing, contract)
    if box is None:
        raise io.InputError(f"{role} {os.path.basename(volume.path)} has no foreground to crop "
                            f"around (no voxel above the threshold {contract.foreground_threshold})")
    G = preprocess.grid_map(box, contract.grid)
    raw = resample_through(volume.data, G, contract.grid, "linear", "clamp")
    intensity_map, _ = preprocess.fit_intensity(raw, contract)
    return intensity_map(raw), G, intensity_map


def affine_description(A, b, network_shape, G, fixed_affine, initial=None):
    """The affine part as JSON-ready numbers, with its world-space (RAS and LPS) 4x4 maps.

    ``A``, ``b``: the network's affine stage (identity and 0 for models without one);
    ``initial``: the initial alignment ``T`` (4x4 RAS, fixed -> moving point) or None.
    """
    A, b = np.asarray(A, float), np.asarray(b, float)
    initial = np.eye(4) if initial is None else np.asarray(initial, float)
    centre = (np.asarray(network_shape, float) - 1.0) / 2.0
    network = np.eye(4)  # network index n -> sampled network index A (n - c) + b + c
    network[:3, :3] = A
    network[:3, 3] = b + centre - A @ centre
    to_world = fixed_affine @ G
    world_ras = initial @ to_world @ network @ np.linalg.inv(to_world)
    world_lps = _LPS4 @ world_ras @ _LPS4

    def rows(matrix):
        return [[float(v) for v in row] for row in np.asarray(matrix)]

    return {
        "convention": "pull: maps a point of the fixed image to the corresponding point of the "
                      "moving image. A, b act on centred network voxel coordinates "
                      "c = n - (network_size - 1) / 2 (sampled position A c + b, b in network "
                      "voxels); initial_alignment_ras is the world-space alignment applied "
                      "before the network; world_ras / world_lps are the whole affine part as "
                      "4x4 maps of physical points in mm.",
        "A": rows(A), "b": [float(v) for v in b],
        "network_shape": [int(n) for n in network_shape], "network_centre": [float(v) for v in centre],
        "network_affine_ras": rows(to_world), "network_to_fixed_voxels": rows(G),
        "initial_alignment_ras": rows(initial),
        "world_ras": rows(world_ras), "world_lps": rows(world_lps),
    }


def itk_affine_text(world_lps):
    """An ITK transform file (``AffineTransform_double_3_3``, LPS, centre 0) for ``world_lps``."""
    world_lps = np.asarray(world_lps, float)
    parameters = list(world_lps[:3, :3].ravel()) + list(world_lps[:3, 3])
    return ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            "Parameters: " + " ".join(repr(float(v)) for v in parameters) + "\n"
            "FixedParameters: 0 0 0\n")


# ----- the whole registration ------------------------------------------------------------
@dataclasses.dataclass
class Result:
    """Everything `register_volumes` computed, on the fixed grid (see the module doc).

    ``flow_voxels``: ``[X, Y, Z, 3]`` float32 numpy; ``warped``: ``[X, Y, Z]`` float32;
    ``warped_labels``: list of ``[X, Y, Z]`` integer arrays; ``affine``: dict
    (:func:`affine_description`); ``network_flow``: ``[Xn, Yn, Zn, 3]`` network voxels;
    ``seconds``: wall clock per part (``preprocess``, ``fine-tune`` with
    ``refine.network_steps``, ``network``, ``field``, ``refine``, ``resample``).
    """

    flow_voxels: np.ndarray
    warped: np.ndarray
    warped_labels: list
    affine: dict | None
    network_flow: np.ndarray
    seconds: dict = dataclasses.field(default_factory=dict)
    refine_log: list = dataclasses.field(default_factory=list)
    inverse: object = None  # Inverse or None


@dataclasses.dataclass
class Inverse:
    """The moving-space outputs (``--inverse``), all on the moving image's grid.

    ``flow``: ``[X', Y', Z', 3]`` float32, voxels of the moving grid, pulling (moving voxel
    ``m`` corresponds to the world point ``A_m (m + v(m))`` of the fixed image);
    ``warped_fixed``: the fixed image resampled into the moving space; ``warped_fixed_labels``:
    fixed label maps carried there (nearest); ``residual_max``: the largest last fixed-point
    step (fixed voxels).
    """

    flow: np.ndarray
    warped_fixed: np.ndarray
    warped_fixed_labels: list
    residual_max: float


@_quiet_retracing
def invert(result, fixed, moving, fixed_labels=(), log=print):
    """Fill ``result.inverse`` (see :class:`Inverse` and :func:`inverse_field`)."""
    begin = time.perf_counter()
    T = np.asarray(result.affine["initial_alignment_ras"], float)
    flow, residual = inverse_field(result.flow_voxels, fixed.affine, moving.affine, T, moving.data.shape)
    moving_to_fixed = np.linalg.inv(fixed.affine) @ moving.affine
    shape = moving.data.shape
    warped = resample_through(fixed.data, moving_to_fixed, shape, "linear", "zero", flow)
    labels = [resample_through(v.data, moving_to_fixed, shape, "nearest", "zero", flow) for v in fixed_labels]
    residual_max = float(_tf().reduce_max(residual))
    result.inverse = Inverse(flow.numpy(), warped, labels, residual_max)
    result.seconds["inverse"] = time.perf_counter() - begin
    log(f"inverse on the moving grid: fixed-point iteration, largest last step {residual_max:.3g} fixed voxels")
    return result


def default_contract(network_shape, intensity="mri"):
    """For models without a recorded contract: the whole field of view, each volume scaled on
    its own (``mri``: 0.5/99.5 percentiles; ``ct``: window 290 / level 120 HU; ``none``: as is)."""
    modality = {"mri": "MRI", "ct": "CT", "none": "none"}[intensity]
    return preprocess.InputContract(modality=modality, grid=tuple(int(n) for n in network_shape), crop="none")


ALIGNMENT_STRIDE = 2  # the initialiser's moments use every second voxel per axis
INIT_STEPS = 50  # the affine search after the initialiser (`vtn_tf.refine.search_affine`)


def _network_inputs(contract, fixed, moving, init, log, init_steps=INIT_STEPS):
    """Both images on the network grid (numpy ``[X, Y, Z]``), ``G``, ``T``, the fixed image's
    :class:`~vtn_tf.preprocess.IntensityMap` and the normalised full-resolution moving image
    (for the affine search and refinement).

    ``T`` is the initialiser's (``init``, `vtn_tf.alignment`), then refined by ``init_steps``
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

    moving_image = _as_image(moving_norm)

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
    log(note + (f" (best of {', '.join(candidates)} by correlation on the network grid)" if len(candidates) > 1 else ""))
    if init_steps > 0 and init != "none":
        from vtn_tf import refine as refine_lib

        T, before, after = refine_lib.search_affine(fixed_net, fixed.affine @ G, moving_norm, moving.affine, T,
                                                    init_steps)
        log(f"affine search ({init_steps} steps, global correlation on the network grid): "
            f"r {before:.3f} -> {after:.3f}")
        moving_net = on_grid(T)
    return fixed_net, moving_net, G, T, fixed_map, moving_norm


_GRAPHS = weakref.WeakKeyDictionary()


def network_outputs(model, fixed, moving, passes=1):
    """The network's outputs for ``fixed``, ``moving`` ``[1, X, Y, Z, 1]`` (network grid).

    A Keras model runs as one TensorFlow graph, traced once per model, grid and ``passes``
    (without the per-layer Python overhead of eager calls); any other callable is called as
    it is. ``passes > 1``: :meth:`vtn_tf.model.VTN.register`. Returns the model's dict
    (``flow`` ``[1, X, Y, Z, 3]``, network voxels, pulling; ``affine_*`` for an affine stage).
    """
    tf = _tf()
    import keras

    def forward(fixed, moving, passes):
        return model.register(fixed, moving, passes=passes) if passes > 1 else model({"fixed": fixed, "moving": moving})

    if not isinstance(model, keras.Model):
        return forward(fixed, moving, passes)
    graph = _GRAPHS.get(model)
    if graph is None:
        @tf.function(reduce_retracing=True, autograph=False)
        def graph(fixed, moving, passes):
            out = forward(fixed, moving, passes)
            return {key: value for key, value in out.items() if key in ("flow", "affine_matrix", "affine_translation")}
        _GRAPHS[model] = graph
    return graph(tf.convert_to_tensor(fixed, tf.float32), tf.convert_to_tensor(moving, tf.float32), int(passes))


@_quiet_retracing
def register_volumes(model, network_shape, fixed, moving, moving_labels=(), intensity="auto", log=print,
                     passes=1, contract=None, init="best", refine=None, init_steps=INIT_STEPS):
    """Register ``moving`` to ``fixed`` (both :class:`vtn_tf.io.Volume`) with ``model``.

    Args:
      model: a VTN, or any callable taking ``{"fixed", "moving"}`` ``[1, X, Y, Z, 1]`` on the
        network grid and returning a dict with ``flow`` (``[1, X, Y, Z, 3]``, network voxels,
        pulling) and, for an affine stage, ``affine_matrix`` / ``affine_translation``.
      network_shape: ``(X, Y, Z)`` of the network grid.
      moving_labels: :class:`vtn_tf.io.Volume` label maps on the moving grid.
      intensity: ``"auto"`` (the contract's), or ``"mri"`` / ``"ct"`` / ``"none"`` to override
        its normalisation.
      passes: test-time recursion passes (:meth:`vtn_tf.model.VTN.register`); needs a VTN when > 1.
        0: the network is not run (its field is zero): the initial alignment and the refinement
        alone, the optimiser without the network, for comparison.
      contract: the model's :class:`vtn_tf.preprocess.InputContract`; None: :func:`default_contract`.
      init: initial alignment mode (`vtn_tf.alignment.MODES`).
      init_steps: steps of the affine search after the initialiser (0: the initialiser alone;
        not run with ``init="none"``).
      refine: None, or a :class:`vtn_tf.refine.RefineSettings` (instance optimisation).
    Returns:
      :class:`Result`.
    """
    seconds = {}
    begin = time.perf_counter()
    contract = contract or default_contract(network_shape, "mri" if intensity == "auto" else intensity)
    if intensity != "auto":
        contract = dataclasses.replace(contract, modality=default_contract(network_shape, intensity).modality)
    if tuple(contract.grid) != tuple(network_shape):
        raise io.InputError(f"the input contract's grid {_shape(contract.grid)} is not the model's "
                            f"{_shape(network_shape)}")
    fixed_net, moving_net, G, T, fixed_map, moving_norm = _network_inputs(contract, fixed, moving, init, log,
                                                                              init_steps)
    log(f"network grid {_shape(network_shape)} over a {_mm(np.asarray(fixed.spacing) * np.diag(G)[:3] * network_shape)} mm "
        f"box of the fixed image ({contract.crop} crop, {contract.modality} intensities"
        f"{', histogram matched' if contract.reference_quantiles is not None else ''})")
    seconds["preprocess"] = time.perf_counter() - begin

    begin = time.perf_counter()
    inputs = (fixed_net[None, ..., None], moving_net[None, ..., None])
    with contextlib.ExitStack() as weights:
        if refine is not None and refine.network_steps:
            from vtn_tf import refine as refine_lib

            weights.enter_context(refine_lib.finetuned(model, *inputs, refine.network_steps, refine.network_rate,
                                                       log))
            seconds["fine-tune"] = time.perf_counter() - begin
            begin = time.perf_counter()
        if passes == 0:  # the optimiser without the network: the initial alignment alone
            out = {"flow": np.zeros((1, *network_shape, 3), np.float32)}
        else:
            out = network_outputs(model, *inputs, passes)
        network_flow = np.asarray(out["flow"])[0]
    seconds["network"] = time.perf_counter() - begin

    begin = time.perf_counter()
    K = np.linalg.inv(fixed.affine) @ T @ fixed.affine
    flow = network_flow_on_fixed(network_flow, G, fixed.data.shape, K)
    seconds["field"] = time.perf_counter() - begin
    refine_log = []
    if refine is not None and refine.active:
        from vtn_tf import refine as refine_lib

        begin = time.perf_counter()
        settings = refine.resolved(np.linalg.norm(G[:3, :3], axis=0))
        flow, refine_log = refine_lib.refine_field(normalised(fixed.data, fixed_map), fixed.affine, moving_norm,
                                                   moving.affine, flow, settings, log, alignment=K)
        seconds["refine"] = time.perf_counter() - begin

    begin = time.perf_counter()
    fixed_to_moving = np.linalg.inv(moving.affine) @ fixed.affine
    shape = fixed.data.shape
    warped = resample_through(moving.data, fixed_to_moving, shape, "linear", "zero", flow)
    labels = [resample_through(v.data, fixed_to_moving, shape, "nearest", "zero", flow) for v in moving_labels]
    mean, largest = displacement_lengths(flow, fixed.spacing)
    log(f"displacement on the fixed grid: mean {mean:.2f} mm, max {largest:.2f} mm")
    flow = flow.numpy() if hasattr(flow, "numpy") else np.asarray(flow, np.float32)
    seconds["resample"] = time.perf_counter() - begin

    matrix = out.get("affine_matrix")
    A = np.asarray(matrix)[0] if matrix is not None else np.eye(3)
    b = np.asarray(out["affine_translation"])[0] if matrix is not None else np.zeros(3)
    affine = affine_description(A, b, network_shape, G, fixed.affine, T)
    return Result(flow, warped, labels, affine, network_flow, seconds, refine_log)


def _shape(shape):
    return "x".join(str(int(n)) for n in shape)


def _mm(values):
    return "x".join(f"{float(v):.3g}" for v in values)


def _stem(path):
    name = os.path.basename(os.fspath(path))
    for suffix in io.NIFTI_SUFFIXES + io.ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _label_dtype(path, data):
    """The integer dtype stored in a label file (int32 when it stored floats)."""
    try:
        stored = np.dtype(nib.load(os.fspath(path)).get_data_dtype())
    except Exception:  # not NIfTI: SimpleITK formats keep int32
        stored = np.dtype(np.int32)
    if not np.issubdtype(stored, np.integer):
        return np.dtype(np.int32)
    info = np.iinfo(stored)
    return stored if data.min() >= info.min and data.max() <= info.max else np.dtype(np.int32)


def load_model(run_dir, precision="float32"):
    """``(model, network_shape, checkpoint)`` from a run directory; InputError when it is
    missing or corrupt. ``precision``: see `vtn_tf.training.restore_model`."""
    from vtn_tf import checkpoints  # TensorFlow only when a model is needed

    if not os.path.isdir(run_dir):
        raise io.InputError(f"model {run_dir} does not exist (a vtn-train run directory is required)")
    try:
        model, shape, checkpoint = checkpoints.restore_model(run_dir, precision)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise io.InputError(f"model {run_dir} cannot be used: {io.error_line(error)}") from None
    return model, tuple(int(n) for n in shape), checkpoint


def _extension(compression):
    return ".nii" if int(compression) == 0 else ".nii.gz"


def output_names(label_paths, compression=1, inverse=False, fixed_label_paths=()):
    ext = _extension(compression)
    names = [f"warped{ext}", f"flow_voxels{ext}", f"flow_itk{ext}"]
    names += [f"warped_labels_{_stem(p)}{ext}" for p in label_paths]
    if inverse:
        names += [f"flow_inverse_voxels{ext}", f"flow_inverse_itk{ext}", f"warped_fixed{ext}"]
        names += [f"warped_fixed_labels_{_stem(p)}{ext}" for p in fixed_label_paths]
    return names + ["affine.json", "affine.txt"]


def check_outputs(out, label_paths, overwrite, compression=1, inverse=False, fixed_label_paths=()):
    """Refuse before any work: a bad compression level, --fixed_labels without --inverse,
    clashing label names, or an output folder :func:`vtn_tf.io.check_output_folder` refuses."""
    if int(compression) not in COMPRESSION_LEVELS:
        raise io.InputError(f"compression must be a gzip level 0-9 (0: uncompressed .nii); got {compression}")
    if fixed_label_paths and not inverse:
        raise io.InputError("--fixed_labels are carried into the moving space: they need --inverse")
    names = output_names(label_paths, compression, inverse, fixed_label_paths)
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise io.InputError(f"two label files would both be written as {clashes[0]}; rename one")
    io.check_output_folder(out, overwrite, names)


def read_inputs(fixed_path, moving_path, label_paths=()):
    """Read and check the images (3-D, finite, not constant) and the moving label maps."""
    fixed = io.read_volume(fixed_path, "fixed image")
    io.check_not_constant(fixed, "fixed image")
    moving = io.read_volume(moving_path, "moving image")
    io.check_not_constant(moving, "moving image")
    labels = [io.read_labels(p, reference=moving, role="moving labels") for p in label_paths]
    return fixed, moving, labels


def describe(role, volume):
    orientation = "".join(nib.aff2axcodes(volume.affine))
    return (f"{role} {os.path.basename(volume.path)}: {_shape(volume.data.shape)} voxels of "
            f"{_mm(volume.spacing)} mm, {orientation} orientation, {volume.data.dtype}")


@dataclasses.dataclass
class Registrar:
    """A model loaded once, registering any number of pairs (``vtn-register``, batch mode).

    Args:
      run_dir: a vtn-train run directory. precision: the network's compute type.
      passes, init, refine, intensity, init_steps: as :func:`register_volumes`.
      inverse: also compute the inverse field (:func:`invert`).
    """

    run_dir: str
    precision: str = "float32"
    passes: int = 1
    init: str = "best"
    refine: object = None
    intensity: str = "auto"
    log: object = print
    inverse: bool = False
    init_steps: int = INIT_STEPS

    def __post_init__(self):
        if self.init not in alignment.MODES:
            raise io.InputError(f"--init must be one of {', '.join(alignment.MODES)}; got {self.init!r}")
        self.model, self.network_shape, self.checkpoint = load_model(os.fspath(self.run_dir), self.precision)
        has_record = any((pathlib.Path(self.run_dir) / name).is_file()
                         for name in ("preprocessing.json", "config.json"))
        if has_record:
            self.contract = load_contract(self.run_dir)
        else:
            self.contract = None
            self.log(f"model {self.run_dir} records no input contract: each image is scaled on its own "
                     "over its whole field of view")
        self.log(f"model {self.run_dir} ({self.checkpoint}), spec {getattr(self.model, 'spec', '?')}, grid "
                 f"{_shape(self.network_shape)}"
                 f"{f'; network in {self.precision}' if self.precision != 'float32' else ''}"
                 f"{f'; {self.passes} test-time passes' if self.passes > 1 else ''}"
                 f"{'; the network is not run (--passes 0): initial alignment and refinement alone' if self.passes == 0 else ''}")

    def register(self, fixed, moving, labels=()):
        return register_volumes(self.model, self.network_shape, fixed, moving, labels, self.intensity,
                                self.log, self.passes, self.contract, self.init, self.refine, self.init_steps)

    def register_files(self, fixed_path, moving_path, out, moving_labels=(), overwrite=False, compression=1,
                       fixed_labels=(), inputs=None):
        """Read, register and write one pair; returns ``(written paths, Result, seconds per part)``.

        ``inputs``: the pair as :func:`read_inputs` already read it from these paths (not read again)."""
        label_paths = [os.fspath(p) for p in moving_labels]
        fixed_label_paths = [os.fspath(p) for p in fixed_labels]
        check_outputs(out, label_paths, overwrite, compression, self.inverse, fixed_label_paths)
        begin = time.perf_counter()
        fixed, moving, labels = inputs or read_inputs(fixed_path, moving_path, label_paths)
        fixed_label_volumes = [io.read_labels(p, reference=fixed, role="fixed labels") for p in fixed_label_paths]
        read_seconds = time.perf_counter() - begin
        self.log(describe("fixed", fixed))
        self.log(describe("moving", moving))
        result = self.register(fixed, moving, labels)
        if self.inverse:
            invert(result, fixed, moving, fixed_label_volumes, self.log)
        begin = time.perf_counter()
        written = write_result(result, fixed, label_paths, labels, out, overwrite, self.log, compression,
                               moving, fixed_label_paths, fixed_label_volumes)
        parts = {"read": read_seconds, **result.seconds, "write": time.perf_counter() - begin}
        return written, result, parts


def register_files(run_dir, fixed_path, moving_path, out, moving_labels=(), intensity="auto",
                   overwrite=False, log=print, passes=1, precision="float32", init="best", refine=None,
                   compression=1, inverse=False, fixed_labels=(), init_steps=INIT_STEPS):
    """Register two files with a run directory's model and write the outputs into ``out``.

    See the module docstring for the grids and the exact meaning of every output. Returns
    the list of written paths. Raises :class:`vtn_tf.io.InputError` (before writing
    anything) for unreadable, non-3-D, NaN or constant images, labels off the moving grid,
    a missing or corrupt model, or existing outputs without ``overwrite``.
    """
    if intensity not in ("auto", "mri", "ct", "none"):
        raise io.InputError(f"intensity must be auto, mri, ct or none; got {intensity!r}")
    label_paths = [os.fspath(p) for p in moving_labels]
    check_outputs(out, label_paths, overwrite, compression, inverse, [os.fspath(p) for p in fixed_labels])
    inputs = read_inputs(fixed_path, moving_path, label_paths)  # refuse bad files before loading a model
    registrar = Registrar(os.fspath(run_dir), precision, passes, init, refine, intensity, log, inverse, init_steps)
    return registrar.register_files(fixed_path, moving_path, out, label_paths, overwrite, compression,
                                    fixed_labels, inputs)[0]


def write_result(result, fixed, label_paths, labels, out, overwrite=False, log=print, compression=1,
                 moving=None, fixed_label_paths=(), fixed_labels=()):
    """Write a :class:`Result` into ``out`` (created if missing); see the module doc.

    Every file is written into a staging folder first; only when all of them are complete
    are they moved into ``out`` (:func:`vtn_tf.io.staged_folder`; other files in ``out`` stay).
    """
    out = pathlib.Path(out)
    inverse = result.inverse
    check_outputs(out, label_paths, overwrite, compression, inverse is not None, fixed_label_paths)
    ext, affine = _extension(compression), fixed.affine
    names, images = [], []
    with io.staged_folder(out) as staging:
        def nifti(name, image, grid_affine=affine):
            image.set_qform(grid_affine, code=1)
            image.set_sform(grid_affine, code=1)
            image.header.set_xyzt_units("mm")
            images.append((staging / name, image))
            names.append(name)

        nifti(f"warped{ext}", nib.Nifti1Image(result.warped.astype(np.float32), affine))
        nifti(f"flow_voxels{ext}", nib.Nifti1Image(np.asarray(result.flow_voxels, np.float32), affine))
        nifti(f"flow_itk{ext}", itk_field_image(result.flow_voxels, affine))
        for path, volume, warped in zip(label_paths, labels, result.warped_labels):
            dtype = _label_dtype(path, volume.data)
            nifti(f"warped_labels_{_stem(path)}{ext}", nib.Nifti1Image(warped.astype(dtype), affine))
        if inverse is not None:
            moving_affine = moving.affine
            nifti(f"flow_inverse_voxels{ext}", nib.Nifti1Image(inverse.flow.astype(np.float32), moving_affine),
                  moving_affine)
            nifti(f"flow_inverse_itk{ext}", itk_field_image(inverse.flow, moving_affine), moving_affine)
            nifti(f"warped_fixed{ext}", nib.Nifti1Image(inverse.warped_fixed.astype(np.float32), moving_affine),
                  moving_affine)
            for path, volume, warped in zip(fixed_label_paths, fixed_labels, inverse.warped_fixed_labels):
                nifti(f"warped_fixed_labels_{_stem(path)}{ext}",
                      nib.Nifti1Image(warped.astype(_label_dtype(path, volume.data)), moving_affine), moving_affine)
        _save_all(images, compression)
        (staging / "affine.json").write_text(json.dumps(result.affine, indent=2) + "\n")
        (staging / "affine.txt").write_text(itk_affine_text(result.affine["world_lps"]))
        names += ["affine.json", "affine.txt"]
        for name in names:
            os.chmod(staging / name, 0o644)
    written = [str(out / name) for name in names]
    log(f"wrote {len(written)} files to {out} (fixed image's grid and affine): " + ", ".join(names))
    return written


def _save_all(images, compression):
    """Save ``(path, image)`` pairs, one thread per file up to the core count: gzip's deflate
    releases the GIL, so the fields compress side by side. The first error is raised."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(images), os.cpu_count() or 1))) as pool:
        largest_first = sorted(images, key=lambda item: -np.asarray(item[1].dataobj).nbytes)
        for future in [pool.submit(_save, image, path, compression) for path, image in largest_first]:
            future.result()


def _gzip_module(level):
    """The module that writes gzip ``level``: ISA-L's ``isal.igzip`` for levels 1-3 (its own
    levels 1-3; the same gzip format, about 20x faster than zlib at level 1 on a float32 field
    and within 3 % of its size, `docs/performance.md`), the standard ``gzip`` (zlib) for 4-9
    or where ``isal`` is not installed."""
    if level <= 3:
        try:
            from isal import igzip

            return igzip
        except ImportError:
            pass
    import gzip

    return gzip


def _save(image, path, compression):
    """nibabel save with a chosen gzip level (0: uncompressed .nii)."""
    level = int(compression)
    if level == 0:
        nib.save(image, str(path))
        return
    with _gzip_module(level).open(path, "wb", compresslevel=level) as stream:
        image.to_stream(stream)  # in blocks: a 1.26 GB field took 2.3 GB more as one bytes copy, 0.8 GB so
