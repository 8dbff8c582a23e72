"""Export a trained VTN as a TensorFlow SavedModel for serving: ``vtn-export``.

``export_model(run_dir, out)`` restores the run's latest checkpoint and writes a SavedModel
whose ``serving_default`` signature is:

* inputs ``fixed`` and ``moving``: float32 ``[None, X, Y, Z, 1]`` (batch free; ``X, Y, Z`` the
  run's grid, e.g. 64^3), already on that grid and normalised like the training data
  (intensities in [0, 1]); ``vtn-register`` does that resampling for NIfTI files;
* outputs ``flow``: float32 ``[None, X, Y, Z, 3]``, displacement in voxels of the input
  grid, pulling (``warped(x) = moving(x + flow(x))``, channel c along axis c), and
  ``warped``: float32 ``[None, X, Y, Z, 1]``.

It loads with TensorFlow alone (no vtn_tf, no Keras)::

    serve = tf.saved_model.load("exported/X").signatures["serving_default"]
    out = serve(fixed=fixed, moving=moving)   # {"flow": ..., "warped": ...}

XLA: the warp (`vtn_tf.core`) is an XLA-compiled function (``jit_compile=True``).
Python TensorFlow runs a SavedModel that keeps it (tensorflow and tensorflow-cpu ship the XLA
JIT), but TensorFlow Serving runs XLA-marked functions only experimentally (CPU:
``--xla_cpu_compilation_enabled=true``; some GPU images fail with "Could not find compiler
for platform CUDA", tensorflow/serving#2214). So the default export traces the warp
**without** XLA (plain TensorFlow ops, the same numbers; no ``_XlaMustCompile`` attribute in
the graph) and runs anywhere; ``--xla`` keeps the compiled warp (faster where XLA runs).
``vtn_export.json`` beside ``saved_model.pb`` records the run, checkpoint, spec, grid, this
choice and ``passes`` (``--passes N`` bakes N test-time passes of the cascade into the
graph, :meth:`vtn_tf.nn.model.VTN.register`; TensorFlow Serving ignores the file).

TensorFlow Serving (REST on port 8501; the export folder becomes version 1 of model "vtn")::

    docker run --rm -p 8501:8501 \\
      --mount type=bind,source=$PWD/exported/X,target=/models/vtn/1 \\
      -e MODEL_NAME=vtn tensorflow/serving
    curl -d @request.json http://localhost:8501/v1/models/vtn:predict

with ``request.json`` (row format; each instance one pair, nested lists ``[X][Y][Z][1]``)::

    {"signature_name": "serving_default",
     "instances": [{"fixed": [[[[0.0], ...]]], "moving": [[[[0.0], ...]]]}]}

or the columnar form ``{"inputs": {"fixed": [B x X x Y x Z x 1], "moving": [...]}}``; the
reply is ``{"predictions": [{"flow": ..., "warped": ...}]}`` (``{"outputs": {...}}`` for the
columnar form). A 64^3 pair is about 2 x 262144 numbers of JSON: gRPC
(``tensorflow-serving-api``, port 8500, ``-p 8500:8500``) is the better choice for volumes.
"""

import contextlib
import json
import os

import tensorflow as tf

from vtn_tf import io
from vtn_tf.core import sampling

SIGNATURE = "serving_default"
METADATA = "vtn_export.json"


class ServingModule(tf.Module):
    """A `tf.Module` holding a VTN's variables and its serving function ``serve``.

    Keras 3 layers are not TensorFlow trackables in the usual sense (a Keras model offers
    a default ``serving_default`` of its own that does not fit VTN's dict input), so the
    model stays out of the saved object graph: only its variables are tracked
    (``model_variables``) and the model is called from a closure while tracing.
    """

    def __init__(self, model, image_shape, passes=1):
        super().__init__(name="vtn_serving")
        self.model_variables = [getattr(v, "value", v) for v in model.weights]
        spec = tf.TensorSpec([None, *image_shape, 1], tf.float32)

        def serve(fixed, moving):
            """``fixed``, ``moving`` ``[B, X, Y, Z, 1]`` -> flow ``[B, X, Y, Z, 3]``, warped ``[B, X, Y, Z, 1]``."""
            if passes > 1:  # test-time recursion (VTN.register), baked into the graph
                out = model.register(fixed, moving, passes)
            else:
                out = model({"fixed": fixed, "moving": moving}, training=False)
            return {"flow": tf.identity(out["flow"], name="flow"),
                    "warped": tf.identity(out["warped"], name="warped")}

        self.serve = tf.function(serve, input_signature=[
            tf.TensorSpec.from_spec(spec, name="fixed"), tf.TensorSpec.from_spec(spec, name="moving")])


@contextlib.contextmanager
def warp_without_xla():
    """While tracing, run `vtn_tf.core.sampling`'s samplers, and the warp's hand-written gradients
    (which a SavedModel keeps beside the forward), as plain (non-XLA) `tf.function`s."""
    names = ("sample_linear_forward", "linear_flow_gradient", "linear_image_gradient", "sample_nearest")
    saved = {name: getattr(sampling, name) for name in names}
    try:
        for name, function in saved.items():
            setattr(sampling, name, tf.function(function.python_function, reduce_retracing=True))
        yield
    finally:
        for name, function in saved.items():
            setattr(sampling, name, function)


def save_serving(model, image_shape, out, metadata=None, overwrite=False, xla=False, passes=1):
    """Write ``model`` as a SavedModel in ``out`` (via a temporary folder and a rename).

    Args:
      model: a built VTN (or any Keras model with the same call).
      image_shape: ``(X, Y, Z)`` of the serving grid.
      out: target folder; refused if it exists, unless ``overwrite``.
      metadata: dict written to ``out/vtn_export.json``.
      xla: keep the XLA-compiled warp (see the module doc); default: plain TensorFlow ops.
      passes: test-time recursion passes served (:meth:`vtn_tf.nn.model.VTN.register`; 1 = the paper).
    Returns:
      ``out`` as a `pathlib.Path`.
    """
    out = io.check_output_folder(out, overwrite)
    module = ServingModule(model, tuple(int(n) for n in image_shape), passes)
    with io.staged_folder(out, replace=True) as staging:  # an old export goes once the new one is complete
        with contextlib.nullcontext() if xla else warp_without_xla():  # saving traces the function
            tf.saved_model.save(module, str(staging), signatures={SIGNATURE: module.serve})
        (staging / METADATA).write_text(json.dumps(metadata or {}, indent=2) + "\n")
        if (metadata or {}).get("preprocessing"):  # the input contract, beside the graph's assets
            (staging / "assets").mkdir(exist_ok=True)
            (staging / "assets" / "preprocessing.json").write_text(
                json.dumps(metadata["preprocessing"], indent=2) + "\n")
    return out


def export_model(run_dir, out, overwrite=False, xla=False, log=print, passes=1, precision="float32"):
    """Export a run directory's model (latest checkpoint) as a SavedModel in ``out``.

    ``precision``: the network's compute type (`vtn_tf.nn.checkpoints.restore_model`); the
    signature's inputs and outputs are float32 whatever it is.

    Raises `vtn_tf.io.InputError` (before writing) for an existing ``out`` without
    ``overwrite`` or a missing or corrupt run directory. Returns ``out``."""
    from vtn_tf.registration.network import load_contract, load_model

    io.check_output_folder(out, overwrite)  # refused before the model loads
    model, image_shape, checkpoint = load_model(os.fspath(run_dir), precision)
    has_contract = any(os.path.isfile(os.path.join(run_dir, n)) for n in ("preprocessing.json", "config.json"))
    contract = load_contract(run_dir).to_json() if has_contract else None
    metadata = {"run_dir": os.path.abspath(run_dir), "checkpoint": os.path.abspath(checkpoint),
                "spec": model.spec, "image_shape": list(image_shape), "signature": SIGNATURE,
                "inputs": {"fixed": [None, *image_shape, 1], "moving": [None, *image_shape, 1]},
                "outputs": {"flow": [None, *image_shape, 3], "warped": [None, *image_shape, 1]},
                "flow_convention": "voxels of the input grid, pulling: warped(x) = moving(x + flow(x))",
                "xla_warp": bool(xla), "passes": int(passes), "network_precision": precision,
                "preprocessing": contract,
                "preprocessing_note": "inputs are prepared as vtn_tf.preprocessing.preparation does with this contract "
                                      "(crop box, grid, intensity map); the initial alignment, refinement "
                                      "(--refine, --refine_network) and native-resolution resampling run "
                                      "outside the served graph"}
    out = save_serving(model, image_shape, out, metadata, overwrite, xla, passes)
    shape = ", ".join(map(str, image_shape))
    log(f"exported {run_dir} ({checkpoint}, spec {model.spec}) to {out}: signature {SIGNATURE!r}, "
        f"inputs fixed/moving float32 [None, {shape}, 1] -> flow [None, {shape}, 3], warped [None, {shape}, 1]; "
        f"warp {'XLA-compiled' if xla else 'without XLA'}"
        f"{f'; {passes} test-time passes' if passes > 1 else ''}"
        f"{f'; network in {precision}' if precision != 'float32' else ''}")
    return out
