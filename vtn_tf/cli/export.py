"""Export a trained model as a TensorFlow SavedModel for serving: ``vtn-export``.

Usage:
  vtn-export --model runs/X --out exported/X [--xla] [--overwrite] [--verbose]

(``python -m vtn_tf.cli.export`` is the same.) The SavedModel's ``serving_default``
signature takes ``fixed`` and ``moving`` float32 ``[None, X, Y, Z, 1]`` (the run's grid,
intensities normalised as in training) and returns ``flow`` ``[None, X, Y, Z, 3]`` (voxels,
pulling) and ``warped`` ``[None, X, Y, Z, 1]``. It loads with TensorFlow alone:
``tf.saved_model.load("exported/X").signatures["serving_default"]``. ``--xla`` keeps the
XLA-compiled warp (TensorFlow Serving then needs ``--xla_cpu_compilation_enabled=true``);
see `vtn_tf.serving.export` for TensorFlow Serving commands and the REST request format.
"""

from absl import app, flags, logging

from vtn_tf.cli.common import define_inference_flags, setup, user_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "vtn-train run directory (model.json + checkpoints/)")
flags.DEFINE_string("out", None, "SavedModel folder to create (refused if it exists)")
flags.DEFINE_boolean("xla", False, "keep the XLA-compiled warp in the SavedModel (default: plain "
                     "TensorFlow ops, which every TensorFlow Serving build runs)")
flags.DEFINE_boolean("overwrite", False, "replace an existing --out")
define_inference_flags()
flags.DEFINE_boolean("verbose", False, "show tracebacks")


def main(argv):
    setup()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.model or not FLAGS.out:
        raise app.UsageError("usage: vtn-export --model RUN_DIR --out EXPORT_DIR [--overwrite]")
    if not FLAGS.verbose:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's saving chatter
    with user_errors("vtn-export", FLAGS.verbose):
        from vtn_tf.serving import export

        export.export_model(FLAGS.model, FLAGS.out, overwrite=FLAGS.overwrite, xla=FLAGS.xla,
                             passes=FLAGS.passes, precision=FLAGS.precision)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
