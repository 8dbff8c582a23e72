"""Sampling images: warping through a flow, resampling at absolute positions, corner tables.

Conventions, used everywhere in vtn_tf (paper §III-A):

* Tensors are channels-last. Images are ``[B, X, Y, Z, C]``; flows are
  ``[B, X, Y, Z, 3]``.
* A flow is a displacement **in voxels of the fixed grid**; channel ``c`` is the
  displacement along spatial axis ``c`` ('ij' order: channel 0 moves along X).
* A flow **pulls**: ``warp(moving, f)(x) = moving(x + f(x))``. It lives on the
  fixed image's grid and points into the moving image.
* Sampling is trilinear; positions outside the volume are clamped to the nearest
  edge voxel.

This is the bottom floor of the package: pure tensor maths, no Keras, no I/O. Grids and
point maps live in `vtn_tf.core.grids`, compositions and Jacobians in `vtn_tf.core.fields`.
"""

import tensorflow as tf

from vtn_tf.core.grids import TensorLike, identity_grid_dynamic, map_points

INTERPOLATIONS = ("linear", "nearest")


def check_rank(name: str, tensor: tf.Tensor, rank: int, layout: str) -> None:
    if tensor.shape.rank != rank:
        raise ValueError(
            f"{name} must be a rank-{rank} tensor {layout}; got shape {tensor.shape}."
        )


def check_flow(flow: tf.Tensor, name: str = "flow") -> None:
    check_rank(name, flow, 5, "[B, X, Y, Z, 3]")
    if flow.shape[-1] != 3:
        raise ValueError(f"{name} must have 3 channels (one per axis); got shape {flow.shape}.")
    if not flow.dtype.is_floating:
        raise ValueError(f"{name} must be a floating-point tensor; got {flow.dtype.name}.")


def check_same_grid(image: tf.Tensor, flow: tf.Tensor, image_name: str = "image") -> None:
    a, b = image.shape[1:4], flow.shape[1:4]
    if a.is_fully_defined() and b.is_fully_defined() and a != b:
        raise ValueError(
            f"{image_name} grid {tuple(a)} and flow grid {tuple(b)} differ; the flow must "
            "live on the grid it samples for (pass them on the same grid)."
        )


def _linear_corners(image_shape, flow):
    """`_corners_at` for the positions ``x + flow(x)`` of the image's own grid."""
    return _corners_at(image_shape, identity_grid_dynamic(image_shape[1:4], flow.dtype) + flow)


def _corners_at(image_shape, raw):
    """Where trilinear sampling reads, shared by the forward passes and the gradients.

    Args:
      image_shape: the image's dynamic shape ``[B, X, Y, Z, C]``.
      raw: ``[B, P, Q, R, 3]`` sample positions in voxel indices of the image (unclamped).
    Returns:
      ``base``: ``[B, P, Q, R]`` int32 flat index (into the image seen as ``[B·X·Y·Z, C]``) of
      each position's lower corner, clamped to ``size - 2`` along every axis so that the upper
      corner is always ``base + step[a]``; ``frac``: ``[B, P, Q, R, 3]`` weights of the upper
      corners in [0, 1]; ``step``: the three flat strides (0 along an axis of length 1);
      ``inside``: ``[B, P, Q, R, 3]`` 1 where the position was not clamped to the volume's edge
      along that axis (the gradient is 0 where it was, as for ``clip_by_value``).
    """
    batch, size = image_shape[0], image_shape[1:4]
    top = tf.cast(size - 1, raw.dtype)
    position = tf.clip_by_value(raw, 0.0, top)
    inside = tf.cast((raw >= 0.0) & (raw <= top), raw.dtype)
    lower = tf.clip_by_value(tf.floor(position), 0.0, tf.maximum(top - 1.0, 0.0))
    frac = position - lower
    strides = tf.stack([size[1] * size[2], size[2], 1])
    corner = tf.cast(lower, tf.int32)
    base = corner[..., 0] * strides[0] + corner[..., 1] * strides[1] + corner[..., 2]
    base += tf.reshape(tf.range(batch) * tf.reduce_prod(size), [-1, 1, 1, 1])
    step = tf.minimum(size - 1, 1) * strides
    return base, frac, step, inside


def _lerp(low, high, w):
    """Exact at w = 0 and w = 1, so a zero flow is exactly the identity."""
    return low * (1.0 - w) + high * w


_CORNERS = tuple((dx, dy, dz) for dx in (0, 1) for dy in (0, 1) for dz in (0, 1))


def _trilinear(image, raw):
    """Trilinear values ``[B, P, Q, R, C]`` of ``image`` at positions ``raw`` (edge-clamped).

    One index computation, 8 gathers, 7 linear interpolations (z, then y, then x), rather than
    8 independently clamped corners (docs/performance.md).
    """
    shape = tf.shape(image)
    base, frac, step, _ = _corners_at(shape, raw)
    flat = tf.reshape(image, [-1, shape[4]])
    weight = [tf.cast(frac[..., a, None], image.dtype) for a in range(3)]

    def along_z(offset):
        return _lerp(tf.gather(flat, base + offset), tf.gather(flat, base + offset + step[2]), weight[2])

    def along_y(offset):
        return _lerp(along_z(offset), along_z(offset + step[1]), weight[1])

    return _lerp(along_y(0), along_y(step[0]), weight[0])


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def sample_linear_forward(image, flow):
    """Trilinear sampling with edge clamping (XLA-compiled). Shapes as in `warp`."""
    return _trilinear(image, identity_grid_dynamic(tf.shape(image)[1:4], flow.dtype) + flow)


def _trilinear_from_corners(c, wx, wy, wz):
    """The trilinear value and its derivatives along the three axes from the 8 corner values
    ``c`` (in :data:`_CORNERS` order) and the upper corners' weights: ``(value, (d_x, d_y, d_z))``.
    The derivative along axis a is the difference of the two bilinear values on the faces
    a = upper and a = lower."""
    z00, z01, z10, z11 = (_lerp(c[k], c[k + 1], wz) for k in (0, 2, 4, 6))
    y0, y1 = _lerp(z00, z01, wy), _lerp(z10, z11, wy)
    d_z = _lerp(_lerp(c[1] - c[0], c[3] - c[2], wy), _lerp(c[5] - c[4], c[7] - c[6], wy), wx)
    return _lerp(y0, y1, wx), (y1 - y0, _lerp(z01 - z00, z11 - z10, wx), d_z)


def _trilinear_position_gradient(image, raw, upstream):
    """d loss / d positions ``[B, P, Q, R, 3]`` of `_trilinear`, given ``upstream`` (d loss / d
    values, ``[B, P, Q, R, C]``).

    The derivatives (:func:`_trilinear_from_corners`) are summed over the channels and zeroed
    where the position was clamped along that axis.
    """
    shape = tf.shape(image)
    base, frac, step, inside = _corners_at(shape, raw)
    flat = tf.reshape(image, [-1, shape[4]])
    wx, wy, wz = (tf.cast(frac[..., a, None], image.dtype) for a in range(3))
    corners = [tf.gather(flat, base + c[0] * step[0] + c[1] * step[1] + c[2] * step[2]) for c in _CORNERS]
    _, derivatives = _trilinear_from_corners(corners, wx, wy, wz)
    grad = tf.concat([tf.reduce_sum(upstream * d, axis=-1, keepdims=True) for d in derivatives], -1)
    return tf.cast(grad, raw.dtype) * inside


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def linear_flow_gradient(image, flow, upstream):
    """d loss / d flow, ``[B, X, Y, Z, 3]``, given ``upstream`` = d loss / d warped image."""
    raw = identity_grid_dynamic(tf.shape(image)[1:4], flow.dtype) + flow
    return _trilinear_position_gradient(image, raw, upstream)


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def linear_image_gradient(image, flow, upstream):
    """d loss / d image, ``[B, X, Y, Z, C]``: each output voxel's upstream value, times its 8
    trilinear weights, added back onto the corners it read.

    One scatter of 8-wide rows onto the lower corners (a ``[B·X·Y·Z, 8, C]`` table), then
    each corner's column is shifted onto its voxel with ``tf.roll``: the lower corner is
    at most ``size - 2``, so the rolled-in last slice is always zero (and an axis of length
    1 has no upper corner to shift to), rather than one scatter of 8 single rows
    (docs/performance.md).
    """
    shape = tf.shape(image)
    base, frac, step, _ = _linear_corners(shape, flow)
    w = [tf.cast(frac[..., a, None], image.dtype) for a in range(3)]
    rows = [upstream * ((w[0] if dx else 1.0 - w[0]) * (w[1] if dy else 1.0 - w[1]) * (w[2] if dz else 1.0 - w[2]))
            for dx, dy, dz in _CORNERS]
    rows = tf.reshape(tf.stack(rows, axis=-2), [-1, 8, shape[4]])
    table = tf.math.unsorted_segment_sum(rows, tf.reshape(base, [-1]), tf.reduce_prod(shape[:4]))
    table = tf.reshape(table, tf.concat([shape[:4], [8, shape[4]]], 0))
    return tf.add_n([tf.roll(table[..., k, :], list(corner), [1, 2, 3]) for k, corner in enumerate(_CORNERS)])


@tf.custom_gradient
def sample_linear(image, flow):
    """`sample_linear_forward` with hand-written gradients in two separate XLA functions.

    Automatic differentiation through the gathers costs several times these two
    (docs/performance.md). Being separate ops, the image gradient
    is pruned from a graph that does not use it (warping the input moving image in
    training), which leaves the flow gradient alone.
    """
    def gradient(upstream):
        return linear_image_gradient(image, flow, upstream), linear_flow_gradient(image, flow, upstream)

    return sample_linear_forward(image, flow), gradient


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def sample_nearest(image, flow):
    """Nearest-neighbour sampling with edge clamping; works on integer images too."""
    shape = tf.shape(image)
    batch, size = shape[0], shape[1:4]
    position = identity_grid_dynamic(size, flow.dtype) + flow
    index = tf.cast(tf.round(position), tf.int32)
    index = tf.clip_by_value(index, 0, size - 1)
    flat_index = index[..., 0] * size[1] * size[2] + index[..., 1] * size[2] + index[..., 2]
    flat = tf.reshape(image, [batch, -1, shape[4]])
    values = tf.gather(flat, tf.reshape(flat_index, [batch, -1]), batch_dims=1)
    return tf.reshape(values, shape)


def warp(image: TensorLike, flow: TensorLike, interpolation: str = "linear") -> tf.Tensor:
    """Resample ``image`` through ``flow``: ``out(x) = image(x + flow(x))``.

    Args:
      image: ``[B, X, Y, Z, C]``. Floating point for ``"linear"``; any numeric
        dtype for ``"nearest"`` (label maps keep their integer ids).
      flow: ``[B, X, Y, Z, 3]`` float, displacement in voxels on the output (fixed)
        grid, pulling from ``image``; channel c moves along axis c.
      interpolation: ``"linear"`` (trilinear, differentiable in both inputs) or
        ``"nearest"`` (for label maps; no gradient with respect to the flow).
    Returns:
      ``[B, X, Y, Z, C]`` tensor of ``image``'s dtype. Positions outside the volume
      are clamped to the nearest edge voxel.
    Raises:
      ValueError: on wrong ranks, shapes, dtypes or an unknown interpolation.
    Example:
      >>> moved = warp(moving, flow)                      # images
      >>> labels = warp(moving_labels, flow, "nearest")   # label maps
    """
    image = tf.convert_to_tensor(image)
    flow = tf.convert_to_tensor(flow)
    check_rank("image", image, 5, "[B, X, Y, Z, C]")
    check_flow(flow)
    check_same_grid(image, flow)
    if image.shape[0] is not None and flow.shape[0] is not None and image.shape[0] != flow.shape[0]:
        raise ValueError(f"image batch {image.shape[0]} and flow batch {flow.shape[0]} differ.")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}; got {interpolation!r}.")
    if interpolation == "nearest":
        return sample_nearest(image, flow)
    if not image.dtype.is_floating:
        raise ValueError(
            f"linear warp needs a floating-point image; got {image.dtype.name} "
            "(use interpolation='nearest' for label maps)."
        )
    if flow.dtype != image.dtype:
        flow = tf.cast(flow, image.dtype)
    return sample_linear(image, flow)


OUTSIDE_MODES = ("clamp", "zero")


def _outside_mask(image_shape, raw):
    """1 where a position lies within half a voxel of the volume (inside the voxel cells,
    as ITK decides), else 0: ``[B, P, Q, R, 1]``."""
    size = tf.cast(image_shape[1:4], raw.dtype)
    inside = tf.reduce_all((raw >= -0.5) & (raw < size - 0.5), axis=-1, keepdims=True)
    return inside


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def sample_at_linear(image, positions, zero_outside):
    values = _trilinear(image, positions)
    if zero_outside:
        values = tf.where(_outside_mask(tf.shape(image), positions), values, tf.zeros_like(values))
    return values


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _sample_at_linear_gradient(image, positions, upstream, zero_outside):
    if zero_outside:
        upstream = tf.where(_outside_mask(tf.shape(image), positions), upstream, tf.zeros_like(upstream))
    return _trilinear_position_gradient(image, positions, upstream)


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def sample_at_nearest(image, positions, zero_outside):
    shape = tf.shape(image)
    size = shape[1:4]
    top = tf.cast(size - 1, positions.dtype)
    index = tf.cast(tf.floor(tf.clip_by_value(positions, 0.0, top) + 0.5), tf.int32)  # half up, as ITK
    index = tf.minimum(index, size - 1)
    flat_index = index[..., 0] * size[1] * size[2] + index[..., 1] * size[2] + index[..., 2]
    flat_index += tf.reshape(tf.range(shape[0]) * tf.reduce_prod(size), [-1, 1, 1, 1])
    values = tf.gather(tf.reshape(image, [-1, shape[4]]), flat_index)
    if zero_outside:
        values = tf.where(_outside_mask(shape, positions), values, tf.zeros_like(values))
    return values


def sample(image: TensorLike, positions: TensorLike, interpolation: str = "linear",
           outside: str = "clamp") -> tf.Tensor:
    """Values of ``image`` at continuous voxel ``positions`` (resampling between grids).

    `warp` samples at ``x + flow(x)`` on the image's own grid; ``sample`` takes the absolute
    positions, so the output grid may differ from the image's (another size, a slab of a
    larger grid, a world-space map between two scans).

    Args:
      image: ``[B, X, Y, Z, C]``; floating point for ``"linear"``, any numeric dtype for
        ``"nearest"`` (label ids are kept exactly).
      positions: ``[B, P, Q, R, 3]`` float, continuous voxel indices **of the image**
        (channel c along image axis c) at which to read; ``[P, Q, R]`` is the output grid.
      interpolation: ``"linear"`` (trilinear) or ``"nearest"`` (rounds half up,
        ``floor(p + 0.5)``, as ITK's nearest-neighbour interpolator).
      outside: ``"clamp"``: positions beyond the volume read the nearest edge voxel;
        ``"zero"``: positions more than half a voxel outside (beyond the voxel cells) give 0.
    Returns:
      ``[B, P, Q, R, C]`` of ``image``'s dtype. ``"linear"`` is differentiable with respect
      to ``positions`` (hand-written trilinear gradient, XLA-compiled), not ``image``.
    Raises:
      ValueError: wrong ranks, batch sizes, dtypes, or an unknown mode.
    Example:
      >>> up = sample(coarse, 0.5 * identity_grid((128,) * 3)[None] - 0.25)  # 2x upsampling
    """
    image = tf.convert_to_tensor(image)
    positions = tf.convert_to_tensor(positions)
    check_rank("image", image, 5, "[B, X, Y, Z, C]")
    check_flow(positions, "positions")
    if image.shape[0] is not None and positions.shape[0] is not None and image.shape[0] != positions.shape[0]:
        raise ValueError(f"image batch {image.shape[0]} and positions batch {positions.shape[0]} differ.")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}; got {interpolation!r}.")
    if outside not in OUTSIDE_MODES:
        raise ValueError(f"outside must be one of {OUTSIDE_MODES}; got {outside!r}.")
    zero = outside == "zero"
    if interpolation == "nearest":
        return sample_at_nearest(image, positions, zero)
    if not image.dtype.is_floating:
        raise ValueError(f"linear sampling needs a floating-point image; got {image.dtype.name} "
                         "(use interpolation='nearest' for label maps).")
    positions = tf.cast(positions, image.dtype)

    @tf.custom_gradient
    def linear(positions):
        def gradient(upstream):
            return _sample_at_linear_gradient(image, positions, upstream, zero)
        return sample_at_linear(image, positions, zero), gradient

    return linear(positions)


def corner_table(image: TensorLike) -> tf.Tensor:
    """The 8 trilinear corners of every voxel, for :func:`sample_mapped`.

    Args:
      image: ``[X, Y, Z]`` float32 (tf or numpy).
    Returns:
      ``[X, Y, Z, 8]`` float32: entry ``(i, j, k, 4 dx + 2 dy + dz)`` is the image at
      ``(i + dx, j + dy, k + dz)``, the edge voxel where that leaves the volume. 8 times the
      image's memory; a position then reads one contiguous row instead of 8 scattered values.
    """
    image = tf.convert_to_tensor(image, tf.float32)
    padded = tf.pad(image, [[0, 1], [0, 1], [0, 1]], mode="SYMMETRIC")  # the edge voxel repeated
    size = image.shape
    return tf.stack([padded[dx:dx + size[0], dy:dy + size[1], dz:dz + size[2]] for dx, dy, dz in _CORNERS], -1)


def sample_mapped(table: tf.Tensor, points: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Trilinear values of an image at ``matrix`` applied to ``points``, with "zero" outside
    (:func:`sample`), differentiable with respect to ``points``.

    For instance optimisation, where one image is read at new positions every step: each
    position reads its 8 corners as one row of ``table`` (:func:`corner_table`), and the
    forward pass also forms the derivative of the value with respect to the point (the exact
    derivative of the trilinear interpolant, mapped back through ``matrix``), so the gradient
    is a product and nothing is gathered twice (docs/performance.md has the times against
    :func:`sample`'s, ``benchmarks/bench_refine.py``).

    Args:
      table: ``[X, Y, Z, 8]`` float32, :func:`corner_table` of the image ``[X, Y, Z]``.
      points: ``[P, Q, R, 3]`` float32, positions in some grid's voxels (``[P, Q, R]``, the
        output grid).
      matrix: ``[3, 4]`` float32, that grid's voxel indices -> the image's voxel indices.
    Returns:
      ``[P, Q, R]`` float32: the image at ``matrix [p; 1]``, edge-clamped within half a voxel
      of the volume and 0 beyond (the gradient 0 there and along an axis where the position
      was clamped, as :func:`sample`).
    """
    image_shape = tf.constant([1] + [int(n) for n in table.shape[:3]] + [8])
    flat = tf.reshape(table, [-1, 8])

    @tf.custom_gradient
    def mapped(points):
        raw = map_points(points, matrix)[None]
        base, frac, _, inside = _corners_at(image_shape, raw)  # the table's row is the lower corner's voxel
        kept = tf.cast(_outside_mask(image_shape, raw)[0, ..., 0], tf.float32)
        value, derivatives = _trilinear_from_corners(tf.unstack(tf.gather(flat, base[0]), axis=-1),
                                                     *tf.unstack(frac[0], axis=-1))
        d_raw = tf.stack(derivatives, -1) * inside[0] * kept[..., None]  # 0 where clamped or outside
        d_points = tf.stack([d_raw[..., 0] * matrix[0, j] + d_raw[..., 1] * matrix[1, j] + d_raw[..., 2] * matrix[2, j]
                             for j in range(3)], -1)
        return value * kept, lambda upstream: upstream[..., None] * d_points

    return mapped(points)


