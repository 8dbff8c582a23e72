"""Keras layers around `vtn_tf.core`: warping, flow composition, affine flows.

The layers hold no weights; each calls the matching function of `vtn_tf.core` (which
stays the functional API) so that a Keras model, functional or subclassed, can carry the
spatial transformer as a layer that serialises with it.

Conventions (as in `vtn_tf.core`): images ``[B, X, Y, Z, C]``, flows ``[B, X, Y, Z, 3]``
as displacements **in voxels of the fixed grid**, channel c along axis c, **pulling**:
``warp(moving, f)(x) = moving(x + f(x))``.

Precision: every layer here computes in float32 by default, whatever the global Keras
mixed-precision policy, because voxel positions in float16 lose the sub-voxel part of the
displacement (float16 has 10 mantissa bits: steps of 1/16 voxel at 100 voxels). Floating
inputs are cast to the layer's dtype; pass ``dtype="float64"`` for double precision.
Integer label maps are never cast.
"""

import keras

from vtn_tf.core import fields, sampling

BOUNDARIES = ("clamp",)


def _shape(shape):
    return tuple(shape) if shape is not None else None


def _check_pair(name, input_shape):
    if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2 \
            or not all(isinstance(s, (list, tuple)) for s in input_shape):
        raise ValueError(f"{name} takes a list of two inputs; got input shape {input_shape}.")
    return [_shape(s) for s in input_shape]


def _check_flow_shape(name, shape):
    if len(shape) != 5 or shape[-1] != 3:
        raise ValueError(f"{name} must be [B, X, Y, Z, 3]; got shape {shape}.")


def _check_same_grid(name_a, a, name_b, b):
    if any(m is not None and n is not None and m != n for m, n in zip(a[1:4], b[1:4])):
        raise ValueError(f"{name_a} grid {tuple(a[1:4])} and {name_b} grid {tuple(b[1:4])} differ; "
                         "both must live on the same (fixed) grid.")


class _SpatialLayer(keras.layers.Layer):
    """Weightless layers that compute in float32 unless told otherwise."""

    def __init__(self, **kwargs):
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = "float32"
        super().__init__(**kwargs)


@keras.saving.register_keras_serializable(package="vtn_tf")
class SpatialTransformer(_SpatialLayer):
    """Resample an image through a flow: ``out(x) = image(x + flow(x))`` (`vtn_tf.core.sampling.warp`).

    Args:
      interpolation: ``"linear"`` (trilinear; differentiable in the image and the flow) or
        ``"nearest"`` (for label maps; integer images keep their dtype and ids; no gradient
        with respect to the flow).
      boundary: what a sample position outside the volume reads. ``"clamp"``: the nearest
        edge voxel (the paper's choice; the only one).
      **kwargs: `keras.layers.Layer` arguments (``name``, ``dtype``: float32 by default).

    Input shape:
      a list ``[image, flow]``: ``image`` ``[B, X, Y, Z, C]`` (floating point for
      ``"linear"``, any numeric dtype for ``"nearest"``); ``flow`` ``[B, X, Y, Z, 3]``
      float, displacement in voxels of the output (fixed) grid, channel c along axis c,
      pulling from ``image``. Both on the same grid.

    Output shape:
      ``[B, X, Y, Z, C]``, the image's shape; dtype the layer's (float32) for ``"linear"``,
      the image's for ``"nearest"``.

    Example:
      >>> moving = keras.Input((64, 64, 64, 1))
      >>> flow = keras.Input((64, 64, 64, 3))
      >>> warped = SpatialTransformer()([moving, flow])
      >>> model = keras.Model([moving, flow], warped)
    """

    def __init__(self, interpolation="linear", boundary="clamp", **kwargs):
        super().__init__(**kwargs)
        if interpolation not in sampling.INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sampling.INTERPOLATIONS}; got {interpolation!r}.")
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}; got {boundary!r}.")
        self.interpolation, self.boundary = interpolation, boundary

    def build(self, input_shape):
        image, flow = _check_pair("SpatialTransformer", input_shape)
        if len(image) != 5:
            raise ValueError(f"image must be [B, X, Y, Z, C]; got shape {image}.")
        _check_flow_shape("flow", flow)
        _check_same_grid("image", image, "flow", flow)
        self.built = True

    def call(self, inputs):
        image, flow = inputs
        return sampling.warp(image, flow, self.interpolation)

    def compute_output_shape(self, input_shape):
        return _check_pair("SpatialTransformer", input_shape)[0]

    def compute_output_spec(self, inputs):
        image, _ = inputs
        dtype = image.dtype if self.interpolation == "nearest" else self.compute_dtype
        return keras.KerasTensor(image.shape, dtype=dtype)

    def get_config(self):
        return {**super().get_config(), "interpolation": self.interpolation, "boundary": self.boundary}


@keras.saving.register_keras_serializable(package="vtn_tf")
class ComposeFlows(_SpatialLayer):
    """Compose two flows (paper eq. 3): ``g1 ⋆ g2 = g2 + warp(g1, g2)`` (`vtn_tf.core.fields.compose`).

    Warping with ``g1`` then with ``g2`` equals warping once with the result:
    ``warp(warp(I, g1), g2) = warp(I, g1 ⋆ g2)``. ``g1`` is resampled trilinearly,
    clamped at the edges.

    Args:
      **kwargs: `keras.layers.Layer` arguments (``name``, ``dtype``: float32 by default).

    Input shape:
      a list ``[g1, g2]``, each ``[B, X, Y, Z, 3]`` float, displacements in voxels of the
      same fixed grid, pulling; ``g1`` is applied first, ``g2`` second.

    Output shape:
      ``[B, X, Y, Z, 3]``, voxels of the fixed grid, pulling.

    Example:
      >>> g1, g2 = keras.Input((64, 64, 64, 3)), keras.Input((64, 64, 64, 3))
      >>> model = keras.Model([g1, g2], ComposeFlows()([g1, g2]))
    """

    def build(self, input_shape):
        g1, g2 = _check_pair("ComposeFlows", input_shape)
        _check_flow_shape("g1", g1)
        _check_flow_shape("g2", g2)
        _check_same_grid("g1", g1, "g2", g2)
        self.built = True

    def call(self, inputs):
        g1, g2 = inputs
        return fields.compose(g1, g2)

    def compute_output_shape(self, input_shape):
        return _check_pair("ComposeFlows", input_shape)[1]

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs[1].shape, dtype=self.compute_dtype)


@keras.saving.register_keras_serializable(package="vtn_tf")
class AffineFlow(_SpatialLayer):
    """The dense flow of the affine transform ``A = I + W`` (`vtn_tf.core.fields.affine_flow`).

    ``flow(x) = W x + b`` over centred voxel coordinates ``x_j = index_j - (size_j - 1) / 2``,
    so that the sampled position is ``A x + b`` (paper eq. 11).

    The grid comes from a third input, a reference tensor on the fixed grid (usually the
    fixed image); only its **static** spatial shape ``(X, Y, Z)`` is used, never its values.
    Taking the grid from the graph rather than from a constructor argument lets one layer
    (and its saved config) serve any grid, and the flow can never disagree with the image it
    is meant for.

    Args:
      **kwargs: `keras.layers.Layer` arguments (``name``, ``dtype``: float32 by default).

    Input shape:
      a list ``[W, b, reference]``: ``W`` ``[B, 3, 3]`` float (row i gives the displacement
      along axis i; W = 0 is the identity), ``b`` ``[B, 3]`` float translation in voxels,
      ``reference`` ``[B, X, Y, Z, ...]`` with ``X, Y, Z`` known statically.

    Output shape:
      ``[B, X, Y, Z, 3]``, displacement in voxels of the fixed grid, pulling (fixed grid →
      moving image).

    Example:
      >>> fixed = keras.Input((64, 64, 64, 1))
      >>> W, b = keras.Input((3, 3)), keras.Input((3,))
      >>> flow = AffineFlow()([W, b, fixed])          # [None, 64, 64, 64, 3]
    """

    @staticmethod
    def _grid(input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 3 \
                or not all(isinstance(s, (list, tuple)) for s in input_shape):
            raise ValueError(f"AffineFlow takes a list [W, b, reference]; got input shape {input_shape}.")
        W, b, reference = (_shape(s) for s in input_shape)
        if len(W) != 3 or tuple(W[1:]) != (3, 3):
            raise ValueError(f"W must be [B, 3, 3]; got shape {W}.")
        if len(b) != 2 or b[1] != 3:
            raise ValueError(f"b must be [B, 3]; got shape {b}.")
        grid = tuple(reference[1:4])
        if len(reference) < 4 or any(n is None for n in grid):
            raise ValueError("the reference input must be [B, X, Y, Z, ...] with X, Y, Z known "
                             f"statically; got shape {reference}.")
        return W[0] if W[0] is not None else b[0], grid

    def build(self, input_shape):
        self._grid(input_shape)
        self.built = True

    def call(self, inputs):
        W, b, reference = inputs
        return fields.affine_flow(W, b, reference.shape[1:4])

    def compute_output_shape(self, input_shape):
        batch, grid = self._grid(input_shape)
        return (batch, *grid, 3)

    def compute_output_spec(self, inputs):
        shape = self.compute_output_shape([tuple(x.shape) for x in inputs])
        return keras.KerasTensor(shape, dtype=self.compute_dtype)
