"""Register a moving image to a fixed one with a trained model: ``vtn-register``.

Usage:
  vtn-register --model runs/X fixed.nii.gz moving.nii.gz --out outdir \\
      [--moving_labels labels.nii.gz ...] [--preset accurate|fast|optimiser] [--set section.field=value ...]
      [--inverse [--fixed_labels atlas_labels.nii.gz ...]] [--overwrite]
  vtn-register --model runs/X --pairs pairs.csv [options]      # many pairs, one model load
  vtn-register --model runs/X --serve    # keep the model loaded: later calls with --model runs/X register there

(``python -m vtn_tf.cli.register`` is the same; ``--fixed`` / ``--moving`` may replace the
two positional arguments.) Images of any size, spacing and orientation (.nii, .nii.gz, .mha,
.mhd, .nrrd), prepared as the model's training volumes were (its ``preprocessing.json``).
``--preset`` names the test-time settings (default ``accurate``: the schedule validated for
the model, its config's ``register`` section); ``--set`` changes one of them, e.g.
``--set refine.steps=60 --set network.passes=2 --set output.compression=0`` (every setting:
`vtn_tf.registration.settings`, docs/usage.md). Outputs in ``outdir``, all on the fixed
image's grid with its affine: ``warped.nii.gz``, ``flow_voxels.nii.gz`` (Learn2Reg layout,
fixed-grid voxels, pulling), ``flow_itk.nii.gz`` (ITK/ANTs displacement field, LPS mm),
``warped_labels_<name>.nii.gz``, ``affine.json`` / ``affine.txt`` (ITK transform file) and
``settings.json`` (the settings used). See `vtn_tf.registration.pipeline` for the conventions.

Batch mode: ``--pairs`` names a CSV with the header ``fixed,moving,out`` and an optional
``moving_labels`` column (one or more label files separated by ``;``), in any column order,
as spreadsheets save it (`vtn_tf.io.pairs`); paths are relative to the CSV's folder or
absolute. The model is loaded once; each pair prints one summary line; a failed row is
reported and skipped. Run again, it skips the output folders already complete with the same
model, settings and inputs (their ``registration.json``; ``--overwrite`` redoes them);
``--shard K/N`` registers the pairs whose index is K modulo N (K from 0); ``--summary_only``
rebuilds the cohort summary (``NAME.summary.csv`` beside the CSV) from all shards' output
folders. Each output folder is locked while written: a second process refuses it at once.

Warm mode: ``--serve`` keeps the model loaded in one process on this machine; while it runs, a
``vtn-register --model`` call with the same run directory hands its pair to it (the same
outputs, without the seconds of start-up: `vtn_tf.serving.warm`), ``--server off`` never.

Exit status (`vtn_tf.io.faults`): 0 done; 1 some pairs failed; 2 bad input; 3 an output
folder cannot be written; 4 no space left on the device (a batch stops); 5 the output folder
is in use by another process.

Example (the ITK field with ANTs, the same resampling as warped.nii.gz):
  antsApplyTransforms -d 3 -i moving.nii.gz -r fixed.nii.gz -t outdir/flow_itk.nii.gz -o w.nii.gz
"""

import dataclasses
import sys

from absl import app, flags

from vtn_tf.cli.common import define_settings_flags, registration_settings, setup, user_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "vtn-train run directory (model.json + checkpoints/)")
flags.DEFINE_string("fixed", None, "fixed image (or the first positional argument)")
flags.DEFINE_string("moving", None, "moving image (or the second positional argument)")
flags.DEFINE_string("out", None, "output folder (created if missing)")
flags.DEFINE_string("pairs", None, "batch mode: CSV with columns fixed,moving,out[,moving_labels]")
flags.DEFINE_string("shard", None, "with --pairs: K/N registers the pairs whose index is K modulo N "
                    "(K from 0: a Slurm array or Kubernetes completion index)")
flags.DEFINE_boolean("summary_only", False, "with --pairs: only rebuild the cohort summary from the output "
                     "folders (all shards'); no model needed")
flags.DEFINE_multi_string("moving_labels", [], "label map on the moving image's grid (repeatable)")
flags.DEFINE_multi_string("fixed_labels", [], "with --inverse: label map on the fixed grid, carried into the "
                          "moving space as warped_fixed_labels_<name> (repeatable)")
flags.DEFINE_boolean("inverse", False, "also write the moving -> fixed field on the moving grid "
                     "(flow_inverse_voxels / flow_inverse_itk) and the fixed image in the moving space (warped_fixed)")
define_settings_flags()
flags.declare_key_flag("preset")  # listed by --help with this command's own flags
flags.declare_key_flag("set")
flags.DEFINE_boolean("overwrite", False, "replace existing outputs")
flags.DEFINE_boolean("serve", False, "keep the --model loaded and register the pairs that later vtn-register calls "
                     "with the same --model send (this machine only, this user; Ctrl-C stops): docs/usage.md")
flags.DEFINE_enum("server", "auto", ["auto", "off"], "auto: hand the pair to a running --serve of the same --model "
                  "when there is one; off: always register in this process")
flags.DEFINE_boolean("verbose", False, "show tracebacks and, in batch mode, every pair's progress")


def settings_of_flags(log):
    """The registration settings: ``--preset``, ``--set``, then ``--inverse``."""
    settings = registration_settings(FLAGS.model, log)
    if FLAGS.inverse:
        settings = dataclasses.replace(settings, output=dataclasses.replace(settings.output, inverse=True))
    return settings


def register_one(fixed, moving):
    from vtn_tf.registration import batch, pipeline

    settings = settings_of_flags(lambda line: print(line, file=sys.stderr))
    batch.register_call(lambda: pipeline.Registrar(FLAGS.model, settings, print), settings, fixed, moving, FLAGS.out,
                        FLAGS.moving_labels, FLAGS.fixed_labels, FLAGS.overwrite)


def served(fixed, moving):
    """The exit status of the call handed to a running ``--serve`` of ``--model``, or None
    when there is none (`vtn_tf.serving.warm`; no TensorFlow is loaded here)."""
    from vtn_tf.serving import warm

    if FLAGS.server == "off":
        return None
    return warm.request(FLAGS.model, {
        "fixed": fixed, "moving": moving, "out": FLAGS.out, "moving_labels": FLAGS.moving_labels,
        "fixed_labels": FLAGS.fixed_labels, "inverse": FLAGS.inverse, "overwrite": FLAGS.overwrite,
        "preset": FLAGS.preset, "set": FLAGS.set})


def serve():
    from vtn_tf.serving import warm

    with user_errors("vtn-register", FLAGS.verbose):  # a busy socket, an unusable model: one line, status 2
        warm.Server(FLAGS.model).serve_forever()


def register_batch():
    from vtn_tf.io import pairs
    from vtn_tf.registration import batch, pipeline

    rows = batch.read_pairs(FLAGS.pairs)
    if FLAGS.summary_only:
        batch.summarise(rows, FLAGS.pairs)
        return
    chosen = rows
    if FLAGS.shard:
        k, n = pairs.parse_shard(FLAGS.shard)
        chosen = pairs.shard(rows, k, n)
        print(f"shard {k}/{n}: {len(chosen)} of {len(rows)} pairs (pair index modulo {n} = {k})", flush=True)
    settings = settings_of_flags(lambda line: print(line, file=sys.stderr))
    registrar = pipeline.Registrar(FLAGS.model, settings,
                                   lambda line: print(line, file=sys.stderr) if FLAGS.verbose else None)
    outcome = batch.run(registrar, chosen, overwrite=FLAGS.overwrite, all_rows=rows, summary=FLAGS.pairs)
    sys.exit(outcome.status)


def main(argv):
    positional = list(argv[1:])
    if FLAGS.serve:
        if positional or FLAGS.fixed or FLAGS.moving or FLAGS.out or FLAGS.pairs or not FLAGS.model:
            raise app.UsageError("--serve takes --model (and --verbose) alone: the pairs come from later "
                                 "vtn-register calls")
        setup()
        serve()
        return
    if (FLAGS.shard or FLAGS.summary_only) and not FLAGS.pairs:
        raise app.UsageError("--shard and --summary_only work on a pairs file: add --pairs pairs.csv")
    if FLAGS.pairs:
        if positional or FLAGS.fixed or FLAGS.moving or FLAGS.out or FLAGS.moving_labels:
            raise app.UsageError("--pairs takes the pairs from the CSV: no images, --out or --moving_labels")
        if not FLAGS.model and not FLAGS.summary_only:
            raise app.UsageError("missing --model; usage: vtn-register --model RUN_DIR --pairs pairs.csv")
        setup()
        with user_errors("vtn-register", FLAGS.verbose):
            register_batch()
        return
    fixed = FLAGS.fixed or (positional.pop(0) if positional else None)
    moving = FLAGS.moving or (positional.pop(0) if positional else None)
    if positional:
        raise app.UsageError(f"unexpected arguments: {positional}")
    missing = [name for name, value in (("--model", FLAGS.model), ("fixed image", fixed),
                                        ("moving image", moving), ("--out", FLAGS.out)) if not value]
    if missing:
        raise app.UsageError(f"missing {', '.join(missing)}; usage: vtn-register --model RUN_DIR "
                             "FIXED MOVING --out OUT_DIR")
    status = served(fixed, moving)  # before TensorFlow loads: a running server needs none here
    if status is not None:
        sys.exit(status)
    setup()
    with user_errors("vtn-register", FLAGS.verbose):
        register_one(fixed, moving)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
