"""Evaluate registration methods on a prepared dataset, or compare two result files.

Examples:
  vtn-evaluate --model runs/hippo --manifest prepared/hippocampus/manifest.json \\
      --protocol consecutive --methods vtn,identity --out results/hippo.csv
  vtn-evaluate --manifest prepared/lpba40-64/manifest.json --protocol atlas --atlas S01 \\
      --methods identity,ants,elastix --out results/lpba-classical.csv
  vtn-evaluate --compare results/a.csv results/b.csv        # one method in each file
  vtn-evaluate --compare results/a.csv --methods vtn,ants   # two methods of one file
The CSV holds one row per pair and method; a markdown summary is printed and written next to
it (name.md). Progress lines and skipped methods go to stderr.
"""

import dataclasses
import os
import sys

from absl import app, flags

from vtn_tf.cli.common import (
    define_inference_flags,
    define_refine_flags,
    define_settings_flags,
    legacy_overrides,
    registration_settings,
    setup,
    user_errors,
)
from vtn_tf.io import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "run directory of a trained VTN (for method vtn)")
flags.DEFINE_string("manifest", None, "manifest.json of a prepared dataset (or its folder)")
flags.DEFINE_string("split", "evaluation", "split whose subjects are registered")
flags.DEFINE_enum("protocol", "consecutive", ["consecutive", "pairwise", "atlas"],
                  "consecutive: sorted ids, (2k fixed, 2k+1 moving); pairwise: all ordered "
                  "pairs; atlas: the atlas fixed, every other subject moving")
flags.DEFINE_string("atlas", None, "atlas subject id for --protocol atlas "
                    "(default: the manifest's atlas)")
flags.DEFINE_integer("max_pairs", None, "keep only the first N pairs")
flags.DEFINE_string("methods", None, "comma-separated: vtn, identity, ants, elastix "
                    "(default vtn,identity; with --compare: the method(s) to compare)")
flags.DEFINE_string("out", None, "result CSV (a .md summary is written next to it)")
flags.DEFINE_boolean("overwrite", False, "replace an existing result CSV and summary")
define_inference_flags()
define_refine_flags()
define_settings_flags()
flags.declare_key_flag("preset")  # listed by --help with this command's own flags
flags.declare_key_flag("set")
flags.DEFINE_boolean("native", False, "register the manifest's ORIGINAL files through the vtn-register "
                     "code and score on the fixed image's native grid (default: the prepared grid, a fast proxy)")
flags.DEFINE_enum("misalign", None, ["rigid", "affine"], "with --native: move every moving scan by a known "
                  "random transform in its header (20 degrees about a random axis, 25 mm; affine adds scale/shear)")
flags.DEFINE_integer("misalign_seed", 0, "seed of the --misalign transforms")
flags.DEFINE_boolean("inverse", False, "with --native: also invert VTN's field; report the Dice of the fixed "
                     "labels carried into the moving space and the inverse consistency (RMS, p95 in mm)")
flags.DEFINE_list("compare", None, "result CSV(s) to compare with a paired Wilcoxon test: "
                  "--compare a.csv b.csv, or --compare a.csv --methods m1,m2")
flags.DEFINE_enum("metric", "dice", ["dice", "iou", "landmark_mm"],
                  "per-pair score compared by --compare")
flags.DEFINE_boolean("verbose", False, "show tracebacks")


def log(line):
    print(line, file=sys.stderr, flush=True)


def compare(files, methods):
    from vtn_tf.evaluation import protocols

    if len(files) == 1:
        if len(methods) != 2:
            raise InputError("--compare with one file needs --methods naming two methods, "
                             "e.g. --methods vtn,ants")
        rows = protocols.read_results(files[0])
        sides = [(protocols.select_method(rows, m, files[0]), m) for m in methods]
    elif len(files) == 2:
        if len(methods) > 2:
            raise InputError("--compare with two files takes at most two --methods")
        chosen = methods * 2 if len(methods) == 1 else (methods or [None, None])
        sides = []
        for path, method in zip(files, chosen):
            rows = protocols.select_method(protocols.read_results(path), method, path)
            sides.append((rows, f"{rows[0]['method']} ({os.path.basename(path)})"))
    else:
        raise InputError(f"--compare takes one or two result files; got {len(files)}")
    result = protocols.compare(sides[0][0], sides[1][0], FLAGS.metric)
    print(protocols.format_comparison(result, sides[0][1], sides[1][1]))


def evaluate():
    from vtn_tf.evaluation import protocols

    if not FLAGS.manifest:
        raise InputError("--manifest is required (a prepared dataset's manifest.json)")
    if not FLAGS.out:
        raise InputError("--out is required (the result CSV to write)")
    if FLAGS.native:
        from vtn_tf.evaluation import native

        settings = registration_settings(FLAGS.model, log, legacy=True)
        if FLAGS.inverse:
            settings = dataclasses.replace(settings, output=dataclasses.replace(settings.output, inverse=True))
        _, summary = native.run(
            FLAGS.manifest, FLAGS.out, methods=FLAGS.methods or "vtn,identity", model_dir=FLAGS.model,
            split=FLAGS.split, protocol=FLAGS.protocol, atlas=FLAGS.atlas, max_pairs=FLAGS.max_pairs,
            overwrite=FLAGS.overwrite, log=log, settings=settings, misalign=FLAGS.misalign,
            misalign_seed=FLAGS.misalign_seed)
        print(summary, end="")
        return
    prepared_grid = {"network.passes", "network.precision"}  # the prepared-grid proxy takes --passes, --precision
    unused = [w for w in legacy_overrides() if w.split("=")[0] not in prepared_grid]
    if FLAGS.misalign or FLAGS.inverse or unused or FLAGS.set or FLAGS.recommended or FLAGS["preset"].present:
        raise InputError("--misalign, --inverse, --preset, --set, --recommended and the alignment and refinement "
                         "flags need --native (the original files)")
    _, summary = protocols.run_protocol(
        FLAGS.manifest, FLAGS.out, methods=FLAGS.methods or "vtn,identity", model_dir=FLAGS.model,
        split=FLAGS.split, protocol=FLAGS.protocol, atlas=FLAGS.atlas, max_pairs=FLAGS.max_pairs,
        overwrite=FLAGS.overwrite, log=log, passes=FLAGS.passes, precision=FLAGS.precision)
    print(summary, end="")


def main(argv):
    setup()
    with user_errors("vtn-evaluate", FLAGS.verbose):
        if FLAGS.compare:
            # `--compare a.csv b.csv`: absl leaves b.csv as a positional argument.
            files = list(FLAGS.compare) + list(argv[1:])
            methods = [m.strip() for m in (FLAGS.methods or "").split(",") if m.strip()]
            compare(files, methods)
            return
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        evaluate()


def run():
    app.run(main)


if __name__ == "__main__":
    run()
