"""Network fine-tuning on one pair (uniGradICON's instance optimisation): Adam steps on the
model's own training loss, the weights restored afterwards."""

import contextlib
import time

import numpy as np
import tensorflow as tf

from vtn_tf.registration.optimiser import progress

# id(model) -> (optimizer, compiled step), for the life of the process (the step holds the model, so
# the id stays its own): traced once per model and network grid, reused by every pair of a batch.
_FINETUNE_STEPS: dict[int, tuple] = {}


def finetune_step(model):
    """The compiled fine-tuning step of ``model`` and its optimizer (built once, reused)."""
    import keras

    key = id(model)
    if key not in _FINETUNE_STEPS:
        optimizer = keras.optimizers.Adam(1e-4)

        @tf.function(autograph=False)
        def step(fixed, moving, rate):
            optimizer.learning_rate.assign(rate)
            with tf.GradientTape() as tape:
                loss = model.loss_terms(fixed, moving, training=False)["loss"]
            optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            return loss

        _FINETUNE_STEPS[key] = (optimizer, step)
    return _FINETUNE_STEPS[key]


@contextlib.contextmanager
def finetuned(model, fixed, moving, steps, learning_rate, log=print):
    """Within the block, ``model``'s weights are fine-tuned on one pair; restored on leaving.

    ``steps`` Adam steps (rate ``learning_rate``, fresh moments) on the model's own training
    loss (`vtn_tf.nn.model.VTN.loss_terms`: similarity, smoothness, the invertibility term when
    the model was trained with it) of ``fixed`` and ``moving``, ``[1, X, Y, Z, 1]`` on the
    network grid: uniGradICON's instance optimisation. The weights return to their loaded
    values when the block ends, error or not, so the next pair starts from the trained model.
    """
    if steps <= 0:
        yield model
        return
    saved = [variable.numpy() for variable in model.trainable_variables]
    optimizer, step = finetune_step(model)
    fixed = tf.constant(np.asarray(fixed, np.float32))
    moving = tf.constant(np.asarray(moving, np.float32))
    try:
        began, first = time.perf_counter(), None
        for k in range(int(steps)):
            loss = float(step(fixed, moving, tf.constant(float(learning_rate))))
            first = loss if first is None else first
            if (k + 1) % 10 == 0 or k + 1 == steps:
                progress(log, k + 1, int(steps), loss, "fine-tune")
        log(f"fine-tuned the network {steps} steps in {time.perf_counter() - began:.1f} s: training loss "
            f"{first:.4f} -> {loss:.4f}")
        yield model
    finally:
        for variable, value in zip(model.trainable_variables, saved):
            variable.assign(value)
        for variable in optimizer.variables:  # fresh moments and step count for the next pair
            variable.assign(tf.zeros_like(variable))
