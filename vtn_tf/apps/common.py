"""What every command-line tool shares: one-line errors and a non-zero exit."""

import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from vtn_tf.config import ConfigError
from vtn_tf.io import InputError

# Errors a user can fix: the library's InputError (a file, flag or setting that cannot be
# used) and ConfigError, and the FileNotFoundError / FileExistsError / PermissionError it
# raises about user files. Anything else (a bare ValueError, KeyError or OSError) is a bug
# and keeps its traceback.
USER_ERRORS = (InputError, ConfigError, FileNotFoundError, FileExistsError, PermissionError)


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
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{tool}: error: {message}", file=sys.stderr)
        sys.exit(2)
