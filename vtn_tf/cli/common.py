"""What every command-line tool shares: the process set-up each command's `main` runs first,
one-line errors and a non-zero exit, and the shared flags."""

import contextlib
import logging
import os
import sys

from vtn_tf.cli.compile_cache import configure_compile_cache
from vtn_tf.io import error_line, faults
from vtn_tf.io.errors import USER_ERRORS


def setup(environ=None):
    """Prepare the process for a command, before TensorFlow compiles anything: the compiled-kernel
    cache between runs (`vtn_tf.cli.compile_cache`), TensorFlow's C++ log level (warnings and
    errors only, unless the user chose), and the filter that keeps TensorFlow's retracing warning
    for the compiled kernels quiet (they trace once per grid size by design). Returns the cache
    folder, or None when it is off."""
    environ = os.environ if environ is None else environ
    workspace = configure_compile_cache(environ)
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from vtn_tf.registration.kernels import expected_retracing

    logger = logging.getLogger("tensorflow")
    if expected_retracing not in logger.filters:
        logger.addFilter(expected_retracing)
    return workspace


def define_passes_flag():
    """``--passes N``: test-time recursion of the cascade (`vtn_tf.nn.model.VTN.register`)."""
    from absl import flags

    if "passes" in flags.FLAGS:  # already defined by another tool imported in this process
        return
    flags.DEFINE_integer("passes", 1, "test-time recursion: run the cascade this many times, each on the "
                         "previous pass's warped image, composing the flows (1 = the paper; 0 = do not run the "
                         "network: the initial alignment and --refine alone, the optimiser without the network)",
                         lower_bound=0)


def define_precision_flag():
    """``--precision``: the network's compute type at inference (`vtn_tf.nn.checkpoints.PRECISIONS`)."""
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
    """vtn-evaluate's ``--init`` and ``--refine*`` flags: each given one overrides its setting
    (:data:`LEGACY_FLAGS`; vtn-register takes ``--set`` instead)."""
    from absl import flags

    from vtn_tf.registration.settings import INIT_STEPS

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
    flags.DEFINE_boolean("refine_anneal", False, "lower Adam's rate on each level along a half cosine, from "
                         "--refine_rate at its first step towards 0 at its last (Adam's steps keep their size "
                         "near the optimum; annealed, the last steps settle instead of jittering the field)")
    flags.DEFINE_float("refine_smoothness", 2.0, "weight of the smoothness term during refinement")
    flags.DEFINE_float("refine_folding", 3.0, "weight of the penalty on negative Jacobian determinants during "
                       "refinement (0 = none)")
    flags.DEFINE_integer("refine_network", 0, "fine-tune the network's weights on the pair for this many Adam "
                         "steps (its training loss, on the network grid) before taking its field; the weights "
                         "return to the trained ones for the next pair (0 = off)", lower_bound=0)
    flags.DEFINE_float("refine_network_rate", 1e-4, "Adam learning rate of --refine_network")
    flags.DEFINE_enum("refine_similarity", "ncc", ["ncc", "cc"], "refinement similarity: local (--refine_window^3 "
                      "windows) or global correlation")
    flags.DEFINE_boolean("recommended", False, "the accurate preset (kept for older scripts; --preset names it)")
    flags.DEFINE_integer("refine_window", 5, "side of the local correlation's cubes in voxels of each refinement "
                         "level (odd; ANTs' CC radius r is a side of 2r + 1)", lower_bound=1)


def define_settings_flags():
    """``--preset`` and ``--set``: the registration settings (`vtn_tf.registration.settings`)."""
    from absl import flags

    from vtn_tf.registration.settings import DEFAULT_PRESET, PRESETS

    if "preset" in flags.FLAGS:
        return
    flags.DEFINE_enum("preset", DEFAULT_PRESET, list(PRESETS), "test-time settings by name: accurate = "
                      "the schedule validated for the model (its config's register section: initial alignment, "
                      "passes, refinement); fast = the network alone (no refinement); optimiser = accurate "
                      "without the network (the initial alignment and refinement alone)")
    flags.DEFINE_multi_string("set", [], "override one setting, section.field=value (repeatable), e.g. "
                              "refine.rate=0.5, refine.steps=60x60x20, network.passes=2, network.precision=bfloat16, "
                              "alignment.init=none, output.compression=0; every field: docs/usage.md")


# The legacy flags of vtn-evaluate -> the settings they override (vtn-register takes --set).
LEGACY_FLAGS = {
    "init": "alignment.init", "init_steps": "alignment.steps", "passes": "network.passes",
    "precision": "network.precision", "refine_network": "network.finetune_steps",
    "refine_network_rate": "network.finetune_rate", "refine": "refine.steps", "refine_seconds": "refine.seconds",
    "refine_resolution": "refine.resolution", "refine_rate": "refine.rate", "refine_anneal": "refine.anneal",
    "refine_smoothness": "refine.smoothness", "refine_folding": "refine.folding",
    "refine_similarity": "refine.similarity", "refine_window": "refine.window",
}


def legacy_overrides():
    """The ``--set`` words of the legacy flags given on the command line (:data:`LEGACY_FLAGS`)."""
    from absl import flags

    words = []
    for name, key in LEGACY_FLAGS.items():
        if name in flags.FLAGS and flags.FLAGS[name].present:
            value = flags.FLAGS[name].value
            text = ",".join(map(str, value)) if isinstance(value, list) else json_word(value)
            words.append(f"{key}={text}")
    return words


def json_word(value):
    """``value`` as ``--set`` reads it back (JSON for numbers and booleans, text otherwise)."""
    import json

    return value if isinstance(value, str) else json.dumps(value)


def registration_settings(model_dir, log=print, legacy=False):
    """The :class:`~vtn_tf.registration.settings.RegistrationSettings` of ``--preset`` (default
    accurate) for ``model_dir``, then the legacy flags given (``legacy``), then ``--set``."""
    from absl import flags

    from vtn_tf.registration import settings

    values = flags.FLAGS
    overrides = (legacy_overrides() if legacy else []) + list(values.set)
    return settings.resolve(model_dir, values.preset, overrides, log)


@contextlib.contextmanager
def user_errors(tool, verbose=False):
    """Turn user errors into ``tool: error: message`` on stderr and their exit status
    (`vtn_tf.io.faults.status_of`: 2, or 3-5 for an unwritable, full or busy output folder).

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
        sys.exit(faults.status_of(error))
