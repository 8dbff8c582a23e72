"""Training: a config in, a monitored, checkpointed, resumable VTN run out.

`train(config, run_dir)` builds the model under a `tf.distribute` strategy, feeds it
the deterministic pair stream of `vtn_tf.training.data`, and writes to ``run_dir``:

* ``config.json``: the exact effective config (a later start must match it);
* ``checkpoints/``: `tf.train.Checkpoint` files of the model and the optimizer
  every ``train.checkpoint_every`` steps and at the end. `tf.train.CheckpointManager`
  writes the data first and the index last, so a write interrupted half-way never
  replaces the last good checkpoint;
* ``logs/``: TensorBoard events: every loss term of every stage, the learning rate,
  validation Dice (with the unregistered Dice for reference) and images.

Resuming: batch k of the pair stream depends only on (seed, k) and the learning
rate only on the optimizer's step, so a restarted run continues from the last
checkpoint with the same step count, data and schedule.
"""

import contextlib
import json
import math
import os
import pathlib
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from vtn_tf import io
from vtn_tf.core import metrics, sampling
from vtn_tf.io import InputError

# Loading a trained model lives in vtn_tf.checkpoints; these names stay importable from here.
from vtn_tf.nn.checkpoints import (  # noqa: F401
    PRECISIONS,
    initialise_from,
    latest_weights,
    make_checkpoint,
    network_precision,
    restore_model,
    save_model_dir,
    write_inference_weights,
    write_model_description,
)
from vtn_tf.nn.model import VTN
from vtn_tf.preprocessing import augment
from vtn_tf.training import config as config_lib
from vtn_tf.training import data as data_lib


@keras.saving.register_keras_serializable(package="vtn_tf")
class PaperSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Constant rate, halved every epoch after ``halve_after_epoch`` (paper §V): the
    schedule of `vtn_tf.training.config.learning_rate_at`, as a Keras schedule."""

    def __init__(self, learning_rate, steps_per_epoch, halve_after_epoch):
        self.learning_rate = float(learning_rate)
        self.steps_per_epoch = int(steps_per_epoch)
        self.halve_after_epoch = int(halve_after_epoch)

    def __call__(self, step):
        return config_lib.learning_rate_at({"train": self.get_config()}, tf.cast(step, tf.float32))

    def get_config(self):
        return {"learning_rate": self.learning_rate, "steps_per_epoch": self.steps_per_epoch,
                "halve_after_epoch": self.halve_after_epoch}


def step_of(model):
    """The optimizer's step count (works for mirrored variables too)."""
    return int(tf.convert_to_tensor(getattr(model.optimizer.iterations, "value", model.optimizer.iterations)))


def choose_strategy(name):
    """The `tf.distribute` strategy for ``train.distribute``."""
    if name == "auto":
        if os.environ.get("TF_CONFIG"):
            name = "multiworker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "none"
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def build_model(config, image_shape):
    """A compiled VTN for ``image_shape = (X, Y, Z)`` from a config's model section."""
    model = VTN(**config["model"])
    model.build((None, *image_shape, 1))
    train = config["train"]
    schedule = PaperSchedule(train["learning_rate"], train["steps_per_epoch"], train["halve_after_epoch"])
    model.compile(optimizer=keras.optimizers.Adam(schedule))
    model.skip_nonfinite(train["on_nonfinite"] == "skip")
    model.optimizer.build(model.trainable_variables)
    return model


# Fields a finished or interrupted run may change when it is started again: more epochs
# extend its schedule (the learning-rate halving goes on where it stopped).
EXTENDABLE = {("train", "epochs")}


def prepare_run_dir(run_dir, config, restart=False, log=print):
    """Write the config beside the checkpoints; refuse to resume a different experiment.

    The one change allowed is more ``train.epochs``: the run then goes on from its last
    checkpoint to the new total (``vtn-train ... --set train.epochs=5`` on a 3-epoch run).
    """
    run_dir = pathlib.Path(run_dir)
    saved = run_dir / "config.json"
    if saved.exists() and not restart:
        # a field the saved config lacks (added to the defaults since) is its default value
        previous = {section: {**config_lib.DEFAULTS.get(section, {}), **fields}
                    for section, fields in json.loads(saved.read_text()).items()}
        trained = [s for s in config if s not in config_lib.TEST_TIME]
        if any(previous.get(s) != config[s] for s in trained):
            changed = sorted((s, k) for s in trained for k in config[s]
                             if previous.get(s, {}).get(k) != config[s][k])
            names = ", ".join(f"{s}.{k}" for s, k in changed)
            extended = (changed and set(changed) <= EXTENDABLE
                        and config["train"]["epochs"] > previous["train"]["epochs"])
            if not extended:
                raise config_lib.ConfigError(
                    f"{run_dir} holds a run with another config (differs in {names}); "
                    "use a new run directory, or --restart to start over there "
                    "(only more train.epochs may extend a run).")
            log(f"extending {run_dir} from {previous['train']['epochs']} to "
                f"{config['train']['epochs']} epochs.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"run directory {run_dir} cannot be created: it, or a folder above it, "
                         "is a file") from None
    io.atomic_write_text(saved, json.dumps(config, indent=2, sort_keys=True) + "\n", overwrite=True)
    return run_dir


def mid_slices(volume):
    """``[X, Y, Z]`` → the middle slice along Z, scaled to [0, 1], as ``[X, Y, 1]``."""
    picture = np.asarray(volume)[:, :, volume.shape[2] // 2].astype(np.float32)
    span = picture.max() - picture.min()
    return ((picture - picture.min()) / span if span > 0 else picture * 0)[..., None]


class Validation(keras.callbacks.Callback):
    """Every ``every`` steps: Dice of warped moving labels on held-out pairs, plus images."""

    def __init__(self, batches, label_values, writer, every, log=print):
        super().__init__()
        self.batches, self.label_values = batches, label_values
        self.writer, self.every, self.log = writer, every, log
        self.last = None
        self.unregistered = [  # computed once: the pairs never change
            metrics.dice(b["fixed_labels"].numpy()[0, ..., 0], b["moving_labels"].numpy()[0, ..., 0],
                         label_values)[1] for b in batches]

    def evaluate(self, step):
        scores, folds = [], []
        for k, batch in enumerate(self.batches):
            out = self.model({"fixed": batch["fixed"], "moving": batch["moving"]})
            warped_labels = sampling.warp(batch["moving_labels"], out["flow"], "nearest")
            fixed_labels = batch["fixed_labels"].numpy()[0, ..., 0]
            scores.append(metrics.dice(fixed_labels, warped_labels.numpy()[0, ..., 0], self.label_values)[1])
            folds.append(metrics.folding_fraction(out["flow"]))
            if k == 0:
                pictures = [mid_slices(batch[name].numpy()[0, ..., 0]) for name in ("fixed", "moving")]
                pictures.append(mid_slices(out["warped"].numpy()[0, ..., 0]))
                pictures.append(mid_slices(np.linalg.norm(out["flow"].numpy()[0], axis=-1)))
        result = {"dice": float(np.nanmean(scores)), "dice_unregistered": float(np.nanmean(self.unregistered)),
                  "folding_percent": 100.0 * float(np.mean(folds))}
        with self.writer.as_default(step=step):
            for name, value in result.items():
                tf.summary.scalar(f"validation/{name}", value)
            tf.summary.image("validation/fixed_moving_warped_flow-magnitude", np.stack(pictures), max_outputs=4)
        self.writer.flush()
        self.log(f"step {step}: validation Dice {result['dice']:.4f} "
                 f"(unregistered {result['dice_unregistered']:.4f}), folding {result['folding_percent']:.3f}%")
        self.last = result
        return result

    def on_train_begin(self, logs=None):
        self.evaluate(step_of(self.model))

    def on_train_batch_end(self, batch, logs=None):
        step = step_of(self.model)
        if step % self.every == 0:
            self.evaluate(step)


class Scalars(keras.callbacks.Callback):
    """Every loss term and the learning rate to TensorBoard, stamped with the global step."""

    def __init__(self, writer, every):
        super().__init__()
        self.writer, self.every = writer, every

    def on_train_batch_end(self, batch, logs=None):
        step = step_of(self.model)
        if step % self.every:
            return
        with self.writer.as_default(step=step):
            for name, value in (logs or {}).items():
                tf.summary.scalar(f"train/{name}", float(value))
            rate = self.model.optimizer.learning_rate
            tf.summary.scalar("train/learning_rate", float(rate(step) if callable(rate) else rate))


class NonFiniteGuard(keras.callbacks.Callback):
    """Stop at once (before any checkpoint) when the loss turns NaN or Inf."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"the training loss became {float(loss)} at step {step_of(self.model)}; "
                "stopped without writing a checkpoint (set train.on_nonfinite=skip to skip such batches, "
                "or lower train.learning_rate).")


class Checkpoints(keras.callbacks.Callback):
    """Save model + optimizer every ``every`` steps and at the end (never non-finite weights)."""

    def __init__(self, manager, every, total_steps):
        super().__init__()
        self.manager, self.every, self.total_steps = manager, every, total_steps

    def save(self):
        step = step_of(self.model)
        if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(f"-{step}"):
            return
        if not all(np.all(np.isfinite(v.numpy())) for v in self.model.trainable_variables):
            raise FloatingPointError(f"weights are not finite at step {step}; no checkpoint written.")
        self.manager.save(checkpoint_number=step)

    def on_train_batch_end(self, batch, logs=None):
        step = step_of(self.model)
        if step % self.every == 0 or step >= self.total_steps:
            self.save()


def train(config, run_dir, restart=False, verbose=1, log=print):
    """Train (or resume) the experiment ``config`` in ``run_dir``. Returns a summary dict.

    With ``train.mixed_precision`` the network computes in float16 for the run; the global
    Keras policy is put back when it ends, also when it fails."""
    config_lib.validate(config)
    train_cfg, data_cfg = config["train"], config["data"]
    if not data_cfg["manifest"]:
        raise config_lib.ConfigError("data.manifest is not set: point it at a prepared dataset's manifest.json.")
    keras.utils.set_random_seed(train_cfg["seed"])
    # The global Keras policy is put back when training ends, also on an error.
    with network_precision("float16") if train_cfg["mixed_precision"] else contextlib.nullcontext():
        return _train(config, run_dir, restart, verbose, log)


def _train(config, run_dir, restart, verbose, log):
    train_cfg, data_cfg = config["train"], config["data"]
    strategy = choose_strategy(train_cfg["distribute"])
    chief = is_chief(strategy)
    run_dir = pathlib.Path(run_dir)
    # The data are read and checked before the run directory is written: a bad manifest
    # leaves no run directory behind.
    splits = ("train", "validation")
    dataset = data_lib.load_prepared(data_cfg["manifest"], splits=splits, extra_subjects=(
        [data_cfg["atlas"]] if data_cfg["pair_mode"] == "atlas" else []))
    pairs = data_lib.training_pairs(dataset, "train", data_cfg["pair_mode"], data_cfg["atlas"])
    if config["model"]["label_weight"] and not all(dataset.labels.get(i) is not None for p in pairs for i in p):
        raise config_lib.ConfigError(
            f"model.label_weight is {config['model']['label_weight']} but some training subjects of "
            f"{data_cfg['manifest']} have no label map; set model.label_weight=0 for unsupervised training.")
    image_shape = tuple(dataset.grid)
    source = train_cfg["init_from"]
    if source and latest_weights(source)[0] is None:
        raise config_lib.ConfigError(f"train.init_from: {source} is not a run directory with a checkpoint.")
    if chief:
        prepare_run_dir(run_dir, config, restart, log)
    writer_dir = run_dir / "logs" if chief else pathlib.Path(tempfile.mkdtemp())
    checkpoint_dir = run_dir / "checkpoints" if chief else pathlib.Path(tempfile.mkdtemp())
    if chief:
        write_model_description(run_dir, config["model"], image_shape, dataset.label_values)
        write_input_contract(run_dir, data_cfg["manifest"], log)

    with strategy.scope():
        model = build_model(config, image_shape)
    checkpoint = make_checkpoint(model, model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, str(checkpoint_dir), max_to_keep=train_cfg["keep_checkpoints"])
    if manager.latest_checkpoint and not restart:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        log(f"resuming from {manager.latest_checkpoint}")
    elif source:
        initialise_from(model, source, log)
    start_step = step_of(model)
    total_steps = train_cfg["epochs"] * train_cfg["steps_per_epoch"]
    if start_step >= total_steps:
        log(f"{run_dir} already finished ({start_step} of {total_steps} steps).")
        return {"start_step": start_step, "steps": total_steps, "run_dir": str(run_dir)}

    labelled = bool(config["model"]["label_weight"])
    if labelled:
        log(f"anatomy-aware training: soft Dice on {len(data_lib.foreground_values(dataset.label_values))} "
            f"warped training structures at weight {config['model']['label_weight']}")
    stream = data_lib.pair_dataset(
        dataset, pairs, train_cfg["batch_size"], seed=train_cfg["seed"], start_step=start_step,
        augment=data_cfg["augment"], max_displacement=data_cfg["max_displacement"],
        control_points=data_cfg["control_points"], include_labels=labelled,
        one_hot=data_lib.foreground_values(dataset.label_values) if labelled else None, **affine_ranges(data_cfg))
    writer = tf.summary.create_file_writer(str(writer_dir))
    callbacks = [Scalars(writer, train_cfg["log_every"]),
                 Checkpoints(manager, train_cfg["checkpoint_every"], total_steps)]
    if train_cfg["on_nonfinite"] == "stop":
        callbacks.insert(0, NonFiniteGuard())
    validation = None
    val_pairs = validation_pairs(dataset, data_cfg) if dataset.has_labels and chief else []
    if chief and not val_pairs:
        log("no labelled validation pairs: validation Dice is not tracked.")
    if val_pairs:
        validation = Validation(list(data_lib.evaluation_batches(dataset, val_pairs, include_labels=True)),
                                dataset.label_values, writer, train_cfg["validate_every"], log)
        callbacks.insert(0, validation)
    began = time.perf_counter()
    model.fit(stream, epochs=1, steps_per_epoch=total_steps - start_step, callbacks=callbacks, verbose=verbose,
              shuffle=False)
    seconds = time.perf_counter() - began
    steps = step_of(model) - start_step
    summary = {"run_dir": str(run_dir), "start_step": start_step, "steps": step_of(model),
               "seconds": seconds, "steps_per_second": steps / seconds if seconds else float("nan")}
    if validation and validation.last:
        summary["validation"] = validation.last
    if chief and manager.latest_checkpoint:
        write_inference_weights(model, manager.latest_checkpoint)  # what registration loads
    log(f"trained {steps} steps in {seconds:.1f} s ({summary['steps_per_second']:.2f} steps/s); "
        f"checkpoints in {checkpoint_dir}")
    return summary


def affine_ranges(data_cfg):
    """The affine augmentation ranges of a config's data section (all 0 when it is off)."""
    on = data_cfg["affine_augment"]
    return {field: data_cfg[field] if on else 0.0 for field in augment.AFFINE_RANGES}


def validation_pairs(dataset, data_cfg):
    ids = sorted(dataset.splits.get("validation") or [])
    if len(ids) < 2:
        return []
    if data_cfg["pair_mode"] == "atlas":
        pairs = data_lib.evaluation_pairs(ids, "atlas", data_cfg["atlas"])
    else:
        pairs = data_lib.evaluation_pairs(ids, "pairwise")
    return pairs[: data_cfg["validation_pairs"]]


def write_input_contract(run_dir, manifest, log=print):
    """``run_dir/preprocessing.json``: how the training volumes were prepared
    (`vtn_tf.preprocessing.preparation.InputContract`), which registration applies to new scans."""
    try:
        contract = data_lib.input_contract(manifest)
    except ValueError as error:
        log(f"no input contract ({error}); this model can score prepared volumes only")
        return
    io.atomic_write_text(pathlib.Path(run_dir) / "preprocessing.json",
                         json.dumps(contract.to_json(), indent=2) + "\n", overwrite=True)
