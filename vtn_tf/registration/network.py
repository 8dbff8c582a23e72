"""The trained network at test time: loading a run's model and its input contract, and one pass
of the network on the network grid."""

import json
import os
import pathlib
import weakref

import keras
import tensorflow as tf

from vtn_tf import io
from vtn_tf.nn import checkpoints
from vtn_tf.preprocessing import preparation


def load_model(run_dir, precision="float32"):
    """``(model, network_shape, checkpoint)`` from a run directory; InputError when it is
    missing or corrupt. ``precision``: see `vtn_tf.training.loop.restore_model`."""
    if not os.path.isdir(run_dir):
        raise io.InputError(f"model {run_dir} does not exist (a vtn-train run directory is required)")
    try:
        model, shape, checkpoint = checkpoints.restore_model(run_dir, precision)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise io.InputError(f"model {run_dir} cannot be used: {io.error_line(error)}") from None
    return model, tuple(int(n) for n in shape), checkpoint


# ----- the input contract ---------------------------------------------------------------------
def load_contract(run_dir, manifest_override=None):
    """The run's :class:`vtn_tf.preparation.InputContract`.

    From ``run_dir/preprocessing.json`` (written by training), else from the manifest its
    ``config.json`` names. InputError when neither gives one (e.g. label-cropped training data).
    """
    run_dir = pathlib.Path(run_dir)
    stored = run_dir / "preprocessing.json"
    try:
        if stored.is_file():
            return preparation.InputContract.from_json(json.loads(stored.read_text()), str(stored))
        from vtn_tf.training import data

        manifest = manifest_override or json.loads((run_dir / "config.json").read_text())["data"]["manifest"]
        return data.input_contract(manifest)
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise io.InputError(f"model {run_dir} has no usable input contract (preprocessing.json): "
                            f"{io.error_line(error)}") from None


def default_contract(network_shape, intensity="mri"):
    """For models without a recorded contract: the whole field of view, each volume scaled on
    its own (``mri``: 0.5/99.5 percentiles; ``ct``: window 290 / level 120 HU; ``none``: as is)."""
    modality = {"mri": "MRI", "ct": "CT", "none": "none"}[intensity]
    return preparation.InputContract(modality=modality, grid=tuple(int(n) for n in network_shape), crop="none")


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def network_outputs(model, fixed, moving, passes=1):
    """The network's outputs for ``fixed``, ``moving`` ``[1, X, Y, Z, 1]`` (network grid).

    A Keras model runs as one TensorFlow graph, traced once per model, grid and ``passes``
    (without the per-layer Python overhead of eager calls); any other callable is called as
    it is. ``passes > 1``: :meth:`vtn_tf.nn.model.VTN.register`. Returns the model's dict
    (``flow`` ``[1, X, Y, Z, 3]``, network voxels, pulling; ``affine_*`` for an affine stage).
    """

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
