"""The two VTN subnetworks (paper Figs. 3 and 4; authors' layer choices).

Both take ``concat([fixed, current_moving])``: ``[B, X, Y, Z, 2]`` with the
fixed image in channel 0, and every spatial size divisible by 64 (six stride-2
levels). Every convolution has kernel 3, padding 'same', a bias, LeakyReLU with
slope 0.1 and LeCun-uniform weights. ``width`` scales every channel count
(1.0 = the paper: about 28.2 M parameters dense, 14.2 M affine at 128^3). The arguments
have no defaults here: `vtn_tf.nn.model.VTN` passes them from ``vtn_tf.training.config.DEFAULTS``.
"""

import keras
import tensorflow as tf

ENCODER_CHANNELS = (16, 32, 64, 64, 128, 128, 256, 256, 512, 512)
ENCODER_STRIDES = (2, 2, 2, 1, 2, 1, 2, 1, 2, 1)
ENCODER_NAMES = ("conv1", "conv2", "conv3", "conv3_1", "conv4", "conv4_1",
                 "conv5", "conv5_1", "conv6", "conv6_1")
LEAKY_SLOPE = 0.1
SIZE_MULTIPLE = 64
FLOW_HEAD_INITIALIZERS = ("lecun_uniform", "small")


def scaled_channels(channels, width):
    return max(1, int(round(channels * width)))


def check_spatial_shape(shape, who="VTN"):
    """Raise a clear ValueError unless every spatial size is a positive multiple of 64."""
    spatial = tuple(shape[1:4])
    if any(n is None for n in spatial):
        return
    if any(n <= 0 or n % SIZE_MULTIPLE for n in spatial):
        fit = tuple(max(SIZE_MULTIPLE, -(-n // SIZE_MULTIPLE) * SIZE_MULTIPLE) for n in spatial)
        raise ValueError(
            f"{who} needs every spatial size divisible by {SIZE_MULTIPLE} (six stride-2 levels); "
            f"got {spatial}. Pad or resample the volumes, e.g. to {fit}.")


def _conv(name, channels, stride=1, activation=True):
    return keras.layers.Conv3D(
        channels, 3, strides=stride, padding="same", use_bias=True,
        activation=keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE) if activation else None,
        kernel_initializer="lecun_uniform", name=name)


def _upconv(name, channels, activation, kernel_initializer="lecun_uniform"):
    return keras.layers.Conv3DTranspose(
        channels, 4, strides=2, padding="same", use_bias=False,
        activation=keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE) if activation else None,
        kernel_initializer=kernel_initializer, name=name)


class _Encoder(keras.layers.Layer):
    """conv1 … conv6_1; returns the list of every level's features."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.convs = [_conv(name, scaled_channels(c, width), s)
                      for name, c, s in zip(ENCODER_NAMES, ENCODER_CHANNELS, ENCODER_STRIDES)]

    def call(self, x):
        features = []
        for conv in self.convs:
            x = conv(x)
            features.append(x)
        return features


class DenseSubnetwork(keras.layers.Layer):
    """Dense deformable registration subnetwork (paper Fig. 4).

    Args:
      width: channel multiplier (1.0 = the paper).
      flow_scale: the output is multiplied by this (the authors' 20).
      flow_head_initializer: ``"lecun_uniform"`` (the paper/authors: large random
        flows before training) or ``"small"`` (N(0, 1e-5) on the output layer,
        as VoxelMorph: starts near the identity).
    Input shape:
      ``[B, X, Y, Z, 2]`` = concat(fixed, moving), each size divisible by 64.
    Output shape:
      ``[B, X, Y, Z, 3]`` flow in voxels of the fixed grid, pulling the moving image.
    Example:
      >>> flow = DenseSubnetwork(0.5, 20.0, "small")(tf.concat([fixed, moving], -1))
    """

    def __init__(self, width, flow_scale, flow_head_initializer, **kwargs):
        super().__init__(**kwargs)
        if flow_head_initializer not in FLOW_HEAD_INITIALIZERS:
            raise ValueError(f"flow_head_initializer must be one of {FLOW_HEAD_INITIALIZERS}; "
                             f"got {flow_head_initializer!r}.")
        self.width, self.flow_scale = width, flow_scale
        self.flow_head_initializer = flow_head_initializer
        self.encoder = _Encoder(width, name="encoder")
        # Decoder levels 6 → 1: skip features are conv5_1, conv4_1, conv3_1, conv2, conv1.
        skip_channels = [scaled_channels(c, width) for c in (256, 128, 64, 32, 16)]
        self.predictions = [_conv(f"pred{level}", 3, activation=False) for level in (6, 5, 4, 3, 2)]
        self.flow_upsamplers = [_upconv(f"upsamp{level}to{level - 1}", 3, False) for level in (6, 5, 4, 3, 2)]
        self.feature_upsamplers = [_upconv(f"deconv{level - 1}", c, True)
                                   for level, c in zip((6, 5, 4, 3, 2), skip_channels)]
        head_init = (keras.initializers.RandomNormal(stddev=1e-5) if flow_head_initializer == "small"
                     else "lecun_uniform")
        self.output_layer = _upconv("upsamp1to0", 3, False, head_init)

    def call(self, x):
        check_spatial_shape(x.shape, "DenseSubnetwork")
        features = self.encoder(x)
        skips = [features[i] for i in (7, 5, 3, 1, 0)]
        current = features[-1]
        for predict, up_flow, up_features, skip in zip(
                self.predictions, self.flow_upsamplers, self.feature_upsamplers, skips):
            coarse_flow = predict(current)
            current = tf.concat([skip, up_features(current), up_flow(coarse_flow)], axis=-1)
        return self.output_layer(current) * self.flow_scale

    def get_config(self):
        return {**super().get_config(), "width": self.width, "flow_scale": self.flow_scale,
                "flow_head_initializer": self.flow_head_initializer}


class AffineSubnetwork(keras.layers.Layer):
    """Affine registration subnetwork (paper Fig. 3).

    The encoder is the dense one's; the head is two 'valid' convolutions with the
    bottleneck's size as kernel and no bias, giving ``W`` (9 numbers) and ``b``
    (3 numbers). The transform is ``A = I + W``; see `vtn_tf.core.fields.affine_flow`.

    Args:
      width: channel multiplier (1.0 = the paper).
    Input shape:
      ``[B, X, Y, Z, 2]`` = concat(fixed, moving), each size divisible by 64.
    Output:
      ``(W [B, 3, 3], b [B, 3])``; b in voxels, W acting on centred voxel coordinates.
    """

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.encoder = _Encoder(width, name="encoder")

    def build(self, input_shape):
        check_spatial_shape(input_shape, "AffineSubnetwork")
        bottleneck = tuple(n // SIZE_MULTIPLE for n in input_shape[1:4])
        self.matrix_head = keras.layers.Conv3D(9, bottleneck, padding="valid", use_bias=False,
                                               kernel_initializer="lecun_uniform", name="dense_W")
        self.translation_head = keras.layers.Conv3D(3, bottleneck, padding="valid", use_bias=False,
                                                    kernel_initializer="lecun_uniform", name="dense_b")

    def call(self, x):
        check_spatial_shape(x.shape, "AffineSubnetwork")
        bottom = self.encoder(x)[-1]
        W = tf.reshape(self.matrix_head(bottom), [-1, 3, 3])
        b = tf.reshape(self.translation_head(bottom), [-1, 3])
        return W, b

    def get_config(self):
        return {**super().get_config(), "width": self.width}
