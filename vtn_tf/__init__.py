"""vtn-tf: the Volume Tweening Network (unsupervised 3-D registration) in TensorFlow 2 / Keras 3.

Field conventions (everywhere): images ``[B, X, Y, Z, C]``, flows ``[B, X, Y, Z, 3]``
as displacements in voxels of the fixed grid, channel c along axis c, pulling:
``warp(moving, f)(x) = moving(x + f(x))``.

Sub-modules load on first use, so ``vtn_tf.io`` (used by ``data_prep``) does not
pay TensorFlow's start-up.
"""

import importlib
import os

# TensorFlow 2.21 leaves its oneDNN kernels off on some x86 CPUs (AMD EPYC), where the 3-D
# transposed convolutions then run many times slower (docs/performance.md); set before TensorFlow
# is first imported. The one thing importing vtn_tf does (tests/test_architecture.py).
# TF_ENABLE_ONEDNN_OPTS=0 in the environment still turns them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"

_PUBLIC = {
    "warp": "vtn_tf.core.sampling", "compose": "vtn_tf.core.fields", "affine_flow": "vtn_tf.core.fields",
    "SpatialTransformer": "vtn_tf.nn.layers", "ComposeFlows": "vtn_tf.nn.layers", "AffineFlow": "vtn_tf.nn.layers",
    "AffineSubnetwork": "vtn_tf.nn.networks", "DenseSubnetwork": "vtn_tf.nn.networks", "VTN": "vtn_tf.nn.model",
}
# Modules reachable as attributes (``vtn_tf.core.metrics``), loaded on first use.
_MODULES = {"losses": "vtn_tf.nn.losses", "metrics": "vtn_tf.core.metrics", "layers": "vtn_tf.nn.layers",
            "networks": "vtn_tf.nn.networks", "model": "vtn_tf.nn.model", "checkpoints": "vtn_tf.nn.checkpoints",
            "augment": "vtn_tf.preprocessing.augment", "config": "vtn_tf.training.config",
            "data": "vtn_tf.training.data", "export": "vtn_tf.serving.export",
            "baselines": "vtn_tf.evaluation.baselines"}
_PACKAGES = {"core", "nn", "preprocessing", "io", "registration", "training", "evaluation", "serving", "cli"}
__all__ = sorted(_PUBLIC) + ["losses", "metrics"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    if name in _PACKAGES:
        return importlib.import_module(f"vtn_tf.{name}")
    raise AttributeError(f"module 'vtn_tf' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | set(_MODULES) | _PACKAGES)
