"""Tests of vtn_tf.nn.networks: sizes, layer facts (paper Figs. 3-4; authors' choices), init."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from vtn_tf.nn.networks import AffineSubnetwork, DenseSubnetwork
from vtn_tf.training.config import DEFAULTS

PAPER = DEFAULTS["model"]

FULL = (1, 128, 128, 128, 2)
ENCODER = [(2, 16), (16, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
           (256, 512), (512, 512)]


def conv_params(k, cin, cout, bias=True):
    return k ** 3 * cin * cout + (cout if bias else 0)


def symbolic_build(layer, shape):
    """Create the weights with a symbolic call (traced graph, no voxel is computed)."""
    return layer(keras.KerasTensor(shape))


@pytest.fixture(scope="module")
def dense_full():
    layer = DenseSubnetwork(PAPER["width"], PAPER["flow_scale"], PAPER["flow_head_initializer"])
    symbolic_build(layer, FULL)
    return layer


def test_dense_parameter_count_at_128(dense_full):
    encoder = sum(conv_params(3, i, o) for i, o in ENCODER)
    widths = [512, 515, 259, 131, 67]  # decoder inputs from level 6 down to level 2
    skips = [256, 128, 64, 32, 16]
    decoder = sum(conv_params(3, w, 3) + conv_params(4, 3, 3, False) + conv_params(4, w, s, False)
                  for w, s in zip(widths, skips))
    head = conv_params(4, 35, 3, False)
    expected = encoder + decoder + head
    count = dense_full.count_params()
    print(f"DenseSubnetwork parameters at 128^3: {count:,}")
    assert count == expected
    assert abs(count - 28.2e6) / 28.2e6 < 0.01


def test_affine_parameter_count_at_128():
    layer = AffineSubnetwork(PAPER["width"])
    W, b = symbolic_build(layer, FULL)
    assert tuple(W.shape) == (1, 3, 3) and tuple(b.shape) == (1, 3)
    encoder = sum(conv_params(3, i, o) for i, o in ENCODER)
    head = conv_params(2, 512, 9, False) + conv_params(2, 512, 3, False)  # bottleneck 2^3
    count = layer.count_params()
    print(f"AffineSubnetwork parameters at 128^3: {count:,}")
    assert count == encoder + head
    assert abs(count - 14.2e6) / 14.2e6 < 0.01


def conv_layers(layer):
    return [sub for sub in layer._flatten_layers() if isinstance(sub, keras.layers.Conv3D)
            and not isinstance(sub, keras.layers.Conv3DTranspose)]


def transposed_layers(layer):
    return [sub for sub in layer._flatten_layers() if isinstance(sub, keras.layers.Conv3DTranspose)]


def test_dense_layer_facts(dense_full):
    convs, upconvs = conv_layers(dense_full), transposed_layers(dense_full)
    assert len(convs) == 10 + 5 and len(upconvs) == 5 + 5 + 1
    for conv in convs + upconvs:
        assert isinstance(conv.kernel_initializer, keras.initializers.LecunUniform), conv.name
    for conv in convs:
        assert conv.kernel_size == (3, 3, 3) and conv.padding == "same" and conv.use_bias
    for conv in upconvs:
        assert conv.kernel_size == (4, 4, 4) and conv.strides == (2, 2, 2) and not conv.use_bias
    activated = [c for c in convs if c.name.startswith("conv")] + [
        c for c in upconvs if c.name.startswith("deconv")]
    assert len(activated) == 15
    for conv in activated:
        assert isinstance(conv.activation, keras.layers.LeakyReLU), conv.name
        assert conv.activation.negative_slope == pytest.approx(0.1)
    linear = [c for c in convs + upconvs if c not in activated]
    assert len(linear) == 11
    for conv in linear:  # flow predictions and flow upsamplers are linear
        x = np.linspace(-3, 3, 7).astype(np.float32)
        np.testing.assert_allclose(keras.activations.get(conv.activation)(x), x)
    strides = [c.strides[0] for c in sorted(convs, key=lambda c: c.name) if c.name.startswith("conv")]
    assert strides == [2, 2, 2, 1, 2, 1, 2, 1, 2, 1]


def test_dense_concat_widths(dense_full):
    """The concatenations [skip, upsampled features, upsampled flow] feed the next level's
    prediction, feature and flow upsamplers: their kernels' input widths show the concat width."""
    by_name = {sub.name: sub for sub in dense_full._flatten_layers()}
    kernel_in = lambda name, axis: by_name[name].kernel.shape[axis]
    # Conv3D kernels are (k, k, k, in, out); Conv3DTranspose kernels are (k, k, k, out, in).
    assert [kernel_in(f"pred{level}", 3) for level in (5, 4, 3, 2)] == [515, 259, 131, 67]
    assert [kernel_in(f"deconv{level}", 4) for level in (4, 3, 2, 1)] == [515, 259, 131, 67]
    assert kernel_in("upsamp1to0", 4) == 35
    assert kernel_in("pred6", 3) == 512


def small_pair(seed=0, size=64):
    return tf.constant(np.random.default_rng(seed).uniform(size=(1, size, size, size, 2)).astype(np.float32))


def test_output_is_flow_scale_times_head():
    pair = small_pair()
    layer = DenseSubnetwork(width=0.125, flow_scale=20.0, flow_head_initializer="lecun_uniform")
    flow = layer(pair).numpy()
    assert flow.shape == (1, 64, 64, 64, 3)
    unscaled = DenseSubnetwork(width=0.125, flow_scale=1.0, flow_head_initializer="lecun_uniform")
    unscaled(pair)
    unscaled.set_weights(layer.get_weights())
    np.testing.assert_allclose(flow, 20.0 * unscaled(pair).numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(flow).max() > 1.0  # the paper's LeCun-uniform head: large random flows


def test_width_scales_channels():
    layer = DenseSubnetwork(width=0.25, flow_scale=20.0, flow_head_initializer="lecun_uniform")
    symbolic_build(layer, (1, 64, 64, 64, 2))
    encoder = sorted((c for c in conv_layers(layer) if c.name.startswith("conv")), key=lambda c: c.name)
    assert [c.filters for c in encoder] == [4, 8, 16, 16, 32, 32, 64, 64, 128, 128]
    by_name = {sub.name: sub for sub in layer._flatten_layers()}
    assert by_name["pred5"].kernel.shape[3] == 64 + 64 + 3
    assert by_name["upsamp1to0"].kernel.shape[4] == 4 + 4 + 3
    affine = AffineSubnetwork(width=0.25)
    symbolic_build(affine, (1, 64, 64, 64, 2))
    affine_encoder = sorted((c for c in conv_layers(affine) if c.name.startswith("conv")), key=lambda c: c.name)
    assert [c.filters for c in affine_encoder] == [4, 8, 16, 16, 32, 32, 64, 64, 128, 128]


def test_small_flow_head_starts_near_identity():
    layer = DenseSubnetwork(width=0.125, flow_scale=20.0, flow_head_initializer="small")
    flow = layer(small_pair(1)).numpy()
    assert np.all(np.isfinite(flow))
    assert np.abs(flow).max() < 0.05  # ≪ one voxel
    with pytest.raises(ValueError):
        DenseSubnetwork(width=0.125, flow_scale=20.0, flow_head_initializer="zeros")


def test_affine_outputs_on_small_input():
    W, b = AffineSubnetwork(width=0.125)(small_pair(2))
    assert W.shape == (1, 3, 3) and b.shape == (1, 3)
    assert np.all(np.isfinite(W.numpy())) and np.all(np.isfinite(b.numpy()))


@pytest.mark.parametrize("make", [lambda: DenseSubnetwork(0.125, 20.0, "small"), lambda: AffineSubnetwork(0.125)],
                         ids=["DenseSubnetwork", "AffineSubnetwork"])
@pytest.mark.parametrize("shape", [(1, 48, 64, 64, 2), (1, 64, 64, 96, 2)])
def test_sizes_not_divisible_by_64_are_rejected(make, shape):
    with pytest.raises(ValueError, match="64"):
        make()(tf.zeros(shape))


def test_get_config_round_trip():
    layer = DenseSubnetwork(width=0.5, flow_scale=10.0, flow_head_initializer="small", name="d")
    clone = DenseSubnetwork.from_config(layer.get_config())
    assert (clone.width, clone.flow_scale, clone.flow_head_initializer, clone.name) == (0.5, 10.0, "small", "d")
    affine = AffineSubnetwork.from_config(AffineSubnetwork(width=0.25).get_config())
    assert affine.width == 0.25
