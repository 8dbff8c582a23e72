"""A trained model's files: the run directory's ``model.json`` and checkpoints.

A run directory (written by `vtn_tf.training.loop.train`, or by `save_model_dir`) holds

* ``model.json``: the VTN's constructor arguments, its grid ``image_shape`` ``(X, Y, Z)``
  and the dataset's ``label_values`` (plain JSON; nothing in it is executed);
* ``checkpoints/``: `tf.train.Checkpoint` files whose model variables are keyed by their
  Keras layer paths (`make_checkpoint`), with the optimizer's slots (training resumes from them);
* ``weights/``: the model's variables alone, written at the end of training
  (`write_inference_weights`): the same keys and values as the checkpoint they come from, and
  named after it, without the optimizer's slots (a third of the size with Adam).

`restore_model` rebuilds the network from these for inference, in a chosen compute
precision. This module imports no training code (no optimizer, no data pipeline), so
registration, evaluation and export load a model without it.
"""

import contextlib
import json
import pathlib

import keras
import tensorflow as tf

from vtn_tf import io
from vtn_tf.nn.model import VTN
from vtn_tf.nn.spec import MODEL_DEFAULTS, PRECISIONS


def make_checkpoint(model, optimizer=None):
    """A `tf.train.Checkpoint` of the model's (and optimizer's) variables.

    Keras 3 layers are not TensorFlow trackables, so the variables are listed
    explicitly. Model variables are keyed by their layer paths, so a checkpoint of
    another architecture fails to restore instead of loading into the wrong layers."""
    tree = {"model": {_variable_key(v): _value(v) for v in model.weights}}
    if optimizer is not None:  # optimizer slots follow the model's variable order
        tree["optimizer"] = {f"{k:05d}": _value(v) for k, v in enumerate(optimizer.variables)}
    return tf.train.Checkpoint(**tree)



def write_model_description(run_dir, model_config, image_shape, label_values=()):
    """``run_dir/model.json``: what `restore_model` needs to rebuild the network."""
    io.atomic_write_text(pathlib.Path(run_dir) / "model.json", json.dumps(
        {"model": model_config, "image_shape": [int(n) for n in image_shape],
         "label_values": [int(v) for v in label_values]}, indent=2) + "\n", overwrite=True)


def save_model_dir(model, image_shape, run_dir, label_values=()):
    """Write a run directory for ``model`` (model.json + one checkpoint), e.g. for tests."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in model.get_config().items() if k in MODEL_DEFAULTS}
    write_model_description(run_dir, config, image_shape, label_values)
    tf.train.CheckpointManager(make_checkpoint(model), str(run_dir / "checkpoints"), 1).save(0)
    return run_dir


# Inference precisions: the Keras policy each one builds the network under. Weights stay
# float32 (checkpoints are shared by all); the network's convolutions compute in the named
# type; flows, warps and compositions stay float32 (`vtn_tf.nn.model.VTN` casts the flows).


@contextlib.contextmanager
def network_precision(precision):
    """Layers built inside compute in ``precision`` (a key of `PRECISIONS`); the global
    Keras policy is put back on leaving. `vtn_tf.io.InputError` for an unknown name."""
    if precision not in PRECISIONS:
        raise io.InputError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(PRECISIONS[precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def restore_model(run_dir, precision="float32"):
    """The trained model of a run directory, from its latest checkpoint.

    Reads only ``model.json`` (architecture and grid, plain JSON) and the
    checkpoint's tensors: nothing in the run directory is executed.
    ``precision`` (a key of `PRECISIONS`) is the network's compute type: ``bfloat16``
    speeds up inference on CPUs with AVX512_BF16 or AMX, ``float16`` on GPUs; the
    global Keras policy is left as it was. Returns ``(model, image_shape, checkpoint_path)``.

    Raises:
      FileNotFoundError: no ``model.json`` or no checkpoint in ``run_dir``.
      vtn_tf.io.InputError: an unknown precision, an unreadable ``model.json``, or a
        checkpoint that is truncated, corrupt or of another architecture.
    """
    with network_precision(precision):
        return _restore_model(pathlib.Path(run_dir))


WEIGHTS = "weights"


def inference_weights(checkpoint):
    """The inference-only copy of ``checkpoint`` (``run/checkpoints/ckpt-N`` ->
    ``run/weights/ckpt-N``), or None when there is none (older runs; a later checkpoint)."""
    checkpoint = pathlib.Path(checkpoint)
    copy = checkpoint.parent.parent / WEIGHTS / checkpoint.name
    return str(copy) if pathlib.Path(f"{copy}.index").is_file() else None


def write_inference_weights(model, checkpoint):
    """Write ``model``'s variables alone beside the run's checkpoints, as :func:`inference_weights`
    of ``checkpoint`` (the checkpoint they equal): the files are written under temporary
    names and renamed, the index last, so a reader sees a whole copy or none; older copies go.
    Returns the copy's prefix."""
    checkpoint = pathlib.Path(checkpoint)
    folder = checkpoint.parent.parent / WEIGHTS
    folder.mkdir(exist_ok=True)
    staging = folder / f".{checkpoint.name}.partial"
    copy = make_checkpoint(model)
    copy.save_counter  # noqa: B018 - created on first use; written, so a restore matches every object
    written = copy.write(str(staging))
    data = sorted(folder.glob(f"{staging.name}.data-*"))
    for path in [*data, pathlib.Path(f"{written}.index")]:
        path.replace(folder / path.name.replace(staging.name, checkpoint.name))
    for old in folder.iterdir():
        if not old.name.startswith((f"{checkpoint.name}.", ".")):
            old.unlink()
    return str(folder / checkpoint.name)


def latest_weights(run_dir):
    """``(latest checkpoint, what to read its model variables from)`` of a run directory: the
    checkpoint's inference-only copy when there is one (the same values, without the optimizer's
    slots), else the checkpoint; ``(None, None)`` without a checkpoint."""
    latest = tf.train.latest_checkpoint(str(pathlib.Path(run_dir) / "checkpoints"))
    return latest, (inference_weights(latest) or latest) if latest else None


def initialise_from(model, run_dir, log=print):
    """Load into a built ``model`` the variables of ``run_dir``'s latest weights that have the
    same layer path and shape (fine-tuning, or a deeper cascade starting from a shallower one:
    stages are named ``affine``, ``dense1``, ``dense2``, ... whatever follows them).

    Variables the source lacks keep their initial values; a variable the source holds with
    another shape, or a source that shares none, is an :class:`vtn_tf.io.InputError` naming
    the files. Returns ``(loaded names, new names)``."""
    latest, source = latest_weights(run_dir)
    if latest is None:
        raise io.InputError(f"train.init_from: {run_dir} holds no checkpoint (looked in "
                            f"{pathlib.Path(run_dir) / 'checkpoints'}).")
    try:
        stored = dict(tf.train.list_variables(source))
    except (tf.errors.OpError, ValueError) as error:
        raise io.InputError(f"train.init_from: checkpoint {source} is unreadable: {io.error_line(error)}") from None
    variables, new, clashes = {}, [], []
    for v in model.weights:
        key = _variable_key(v)
        shape = stored.get(f"model/{key.replace('.', '..')}/.ATTRIBUTES/VARIABLE_VALUE")
        if shape is None:
            new.append(key)
        elif list(shape) != list(v.shape):
            clashes.append(f"{key} {list(shape)} there, {list(v.shape)} here")
        else:
            variables[key] = _value(v)
    if clashes or not variables:
        problem = ("shapes differ: " + "; ".join(clashes[:3])) if clashes else "no variable in common"
        raise io.InputError(f"train.init_from: checkpoint {source} does not fit this model ({problem}).")
    try:
        tf.train.Checkpoint(model=variables).restore(source).expect_partial().assert_existing_objects_matched()
    except (AssertionError, tf.errors.OpError) as error:
        raise io.InputError(f"train.init_from: checkpoint {source} is unreadable: {io.error_line(error)}") from None
    stages = sorted({key.split(".", 1)[0] for key in new})
    log(f"initialised {len(variables)} of {len(model.weights)} variables from {source}"
        + (f"; new: {', '.join(stages)}" if stages else ""))
    return sorted(variables), new


def _value(v):
    """The TensorFlow variable behind a Keras variable (what `tf.train.Checkpoint` tracks)."""
    return getattr(v, "value", v)


def _variable_key(v):
    """A variable's key in the checkpoints: its layer path without the model's own name
    (which Keras uniquifies per process), dots for slashes."""
    return v.path.split("/", 1)[-1].replace("/", ".")


def _restore_model(run_dir):
    description = run_dir / "model.json"
    if not description.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vtn-tf run directory (no model.json).")
    config, image_shape = _read_description(description)
    latest, source = latest_weights(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint (looked in {run_dir / 'checkpoints'}).")
    try:
        model = VTN(**config)
        model.build((None, *image_shape, 1))
    except (TypeError, ValueError) as error:
        raise io.InputError(f"{description} does not describe a usable VTN: {io.error_line(error)}") from None
    try:
        status = make_checkpoint(model).restore(source).expect_partial()
        status.assert_existing_objects_matched()
        stored = {name for name, _ in tf.train.list_variables(source) if name.startswith("model/")}
        if len(stored) != len(model.weights):
            raise ValueError(f"it holds {len(stored)} model tensors, the model has {len(model.weights)}")
    except (IndexError, tf.errors.DataLossError) as error:  # truncated or damaged files
        raise io.InputError(f"checkpoint {source} is unreadable (truncated or corrupt: "
                            f"{io.error_line(error)})") from None
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise io.InputError(f"checkpoint {source} does not fit the model in {description}: "
                            f"{io.error_line(error)}") from None
    return model, image_shape, latest


def _read_description(description):
    """``model.json``'s VTN arguments and grid ``(X, Y, Z)``."""
    try:
        info = json.loads(description.read_text())
        return info["model"], tuple(int(n) for n in info["image_shape"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise io.InputError(f"{description} is not a readable model description "
                            f"({type(error).__name__}: {io.error_line(error)})") from None
