"""Register a moving image to a fixed one with a trained model: ``vtn-register``.

Usage:
  vtn-register --model runs/X fixed.nii.gz moving.nii.gz --out outdir \\
      [--moving_labels labels.nii.gz ...] [--intensity mri|ct|none] [--passes N] \\
      [--precision float32|bfloat16|float16] [--overwrite] [--verbose]

(``python -m vtn_tf.apps.register`` is the same; ``--fixed`` / ``--moving`` may replace the
two positional arguments.) Images of any size, spacing and orientation (.nii, .nii.gz, .mha,
.mhd, .nrrd). Outputs in ``outdir``, all on the fixed image's grid with its affine:
``warped.nii.gz``, ``flow_voxels.nii.gz`` (Learn2Reg layout, fixed-grid voxels, pulling),
``flow_itk.nii.gz`` (ITK/ANTs displacement field, LPS mm), ``warped_labels_<name>.nii.gz``
and, with an affine stage, ``affine.json`` / ``affine.txt`` (ITK transform file). See
`vtn_tf.registration` for the exact conventions.

Example (the ITK field with ANTs, the same resampling as warped.nii.gz):
  antsApplyTransforms -d 3 -i moving.nii.gz -r fixed.nii.gz -t outdir/flow_itk.nii.gz -o w.nii.gz
"""

from absl import app, flags

from vtn_tf.apps.common import define_inference_flags, user_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "vtn-train run directory (model.json + checkpoints/)")
flags.DEFINE_string("fixed", None, "fixed image (or the first positional argument)")
flags.DEFINE_string("moving", None, "moving image (or the second positional argument)")
flags.DEFINE_string("out", None, "output folder (created if missing)")
flags.DEFINE_multi_string("moving_labels", [], "label map on the moving image's grid (repeatable)")
flags.DEFINE_enum("intensity", "mri", ["mri", "ct", "none"],
                  "normalisation before the network: mri = 0.5/99.5 percentile clip + rescale, "
                  "ct = window 290 / level 120 HU, none = as is (already in [0, 1])")
flags.DEFINE_boolean("overwrite", False, "replace existing outputs")
define_inference_flags()
flags.DEFINE_boolean("verbose", False, "show tracebacks")


def main(argv):
    positional = list(argv[1:])
    fixed = FLAGS.fixed or (positional.pop(0) if positional else None)
    moving = FLAGS.moving or (positional.pop(0) if positional else None)
    if positional:
        raise app.UsageError(f"unexpected arguments: {positional}")
    missing = [name for name, value in (("--model", FLAGS.model), ("fixed image", fixed),
                                        ("moving image", moving), ("--out", FLAGS.out)) if not value]
    if missing:
        raise app.UsageError(f"missing {', '.join(missing)}; usage: vtn-register --model RUN_DIR "
                             "FIXED MOVING --out OUT_DIR")
    with user_errors("vtn-register", FLAGS.verbose):
        from vtn_tf import registration

        registration.register_files(FLAGS.model, fixed, moving, FLAGS.out, moving_labels=FLAGS.moving_labels,
                                    intensity=FLAGS.intensity, overwrite=FLAGS.overwrite,
                                    passes=FLAGS.passes, precision=FLAGS.precision)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
