"""What every command-line tool shares: one-line errors and a non-zero exit."""

import contextlib
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from vtn_tf.config import ConfigError
from vtn_tf.io import InputError, error_line

# Errors a user can fix: the library's InputError (a file, flag or setting that cannot be
# used) and ConfigError, and the FileNotFoundError / FileExistsError / PermissionError it
# raises about user files. Anything else (a bare ValueError, KeyError or OSError) is a bug
# and keeps its traceback.
USER_ERRORS = (InputError, ConfigError, FileNotFoundError, FileExistsError, PermissionError)


def _expected_retracing(record):
    """False for TensorFlow's retracing warning: the compiled resampling and refinement
    kernels trace once per grid size and mode by design (XLA needs static shapes)."""
    return "triggered tf.function retracing" not in record.getMessage()


logging.getLogger("tensorflow").addFilter(_expected_retracing)


def define_passes_flag():
    """``--passes N``: test-time recursion of the cascade (`vtn_tf.model.VTN.register`)."""
    from absl import flags

    if "passes" in flags.FLAGS:  # already defined by another tool imported in this process
        return
    flags.DEFINE_integer("passes", 1, "test-time recursion: run the cascade this many times, each on the "
                         "previous pass's warped image, composing the flows (1 = the paper)", lower_bound=1)


def define_precision_flag():
    """``--precision``: the network's compute type at inference (`vtn_tf.checkpoints.PRECISIONS`)."""
    from absl import flags

    if "precision" in flags.FLAGS:
        return
    flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16", "float16"],
                      "the network's compute type (weights, flows and warps stay float32): "
                      "bfloat16 is faster on CPUs with AVX512_BF16 or AMX, float16 on GPUs")


def define_inference_flags():
    """The flags of every tool that runs a trained model: ``--passes`` and ``--precision``."""
    define_passes_flag()
    define_precision_flag()


def define_refine_flags():
    """``--init`` and the ``--refine*`` flags (`vtn_tf.alignment`, `vtn_tf.refine`)."""
    from absl import flags

    from vtn_tf.registration import INIT_STEPS

    if "refine" in flags.FLAGS:
        return
    flags.DEFINE_enum("init", "best", ["best", "moments", "com", "none"],
                      "initial world-space alignment before the network: moments = centres of mass and "
                      "principal axes, com = centres of mass only, best = whichever of the two correlates "
                      "better on the network grid, none = trust the headers")
    flags.DEFINE_integer("init_steps", INIT_STEPS, "steps of the affine search after --init (global correlation "
                         "on the network grid, as the ANTs and elastix affine stages; 0 = the initialiser alone; "
                         "not run with --init none)",
                         lower_bound=0)
    flags.DEFINE_string("refine", "0", "instance optimisation: Adam steps on the pair after the network, on "
                        "each level of --refine_resolution, or one count per level, coarse to fine, as ANTs' "
                        "convergence schedules (e.g. 60x60x60x20; with auto levels the last counts go to the "
                        "finest levels); 0 = off, 60 is the measured choice")
    flags.DEFINE_float("refine_seconds", None, "time budget for --refine in seconds (stops at whichever "
                       "of steps and seconds comes first)")
    flags.DEFINE_list("refine_resolution", ["auto"], "refinement grid as a fraction of the fixed grid per axis, or "
                      "several, coarse to fine (e.g. 0.25,0.33,0.5: --refine steps on each); auto = 1.5, 1 and "
                      "0.75 times the network grid's spacing, never finer than the fixed grid")
    flags.DEFINE_float("refine_rate", 0.3, "Adam learning rate, voxels of the fixed grid per step")
    flags.DEFINE_float("refine_smoothness", 2.0, "weight of the smoothness term during refinement")
    flags.DEFINE_float("refine_folding", 0.0, "weight of the penalty on negative Jacobian determinants during "
                       "refinement (0 = none)")
    flags.DEFINE_integer("refine_network", 0, "fine-tune the network's weights on the pair for this many Adam "
                         "steps (its training loss, on the network grid) before taking its field; the weights "
                         "return to the trained ones for the next pair (0 = off)", lower_bound=0)
    flags.DEFINE_float("refine_network_rate", 1e-4, "Adam learning rate of --refine_network")
    flags.DEFINE_enum("refine_similarity", "ncc", ["ncc", "cc"], "refinement similarity: local (5^3 windows) "
                      "or global correlation")


def refine_steps(text):
    """``--refine``'s steps: ``"60"`` -> 60 (on every level), ``"60x60x20"`` -> (60, 60, 20)."""
    from vtn_tf.io import InputError

    try:
        counts = tuple(int(part) for part in str(text).replace(",", "x").split("x"))
    except ValueError:
        raise InputError(f"--refine takes a step count or counts per level such as 60x60x20; got {text!r}") from None
    if any(n < 0 for n in counts):
        raise InputError(f"--refine steps must be >= 0; got {text!r}")
    return counts[0] if len(counts) == 1 else counts


def refine_settings():
    """The :class:`vtn_tf.refine.RefineSettings` of the flags, or None without ``--refine``."""
    from absl import flags

    values = flags.FLAGS
    steps = refine_steps(values.refine)
    if not any(steps if isinstance(steps, tuple) else (steps,)) and not values.refine_network:
        return None
    from vtn_tf.io import InputError
    from vtn_tf.refine import RefineSettings

    try:
        try:
            resolution = "auto" if list(values.refine_resolution) == ["auto"] else tuple(
                float(r) for r in values.refine_resolution)
        except ValueError:
            raise ValueError(f"--refine_resolution takes numbers; got {','.join(values.refine_resolution)}") from None
        return RefineSettings(steps=steps, seconds=values.refine_seconds, learning_rate=values.refine_rate,
                              similarity=values.refine_similarity, smoothness=values.refine_smoothness,
                              folding=values.refine_folding, resolution=resolution,
                              network_steps=values.refine_network, network_rate=values.refine_network_rate)
    except ValueError as error:
        raise InputError(f"--refine options: {error}") from None


@contextlib.contextmanager
def user_errors(tool, verbose=False):
    """Turn user errors into ``tool: error: message`` on stderr and exit status 2.

    With ``verbose`` the traceback is kept (re-raised), unfiltered by Keras."""
    if verbose:
        import keras

        keras.config.disable_traceback_filtering()
    try:
        yield
    except USER_ERRORS as error:
        if verbose:
            raise
        print(f"{tool}: error: {error_line(error)}", file=sys.stderr)
        sys.exit(2)
