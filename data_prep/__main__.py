"""Command line: ``python -m data_prep --layout LAYOUT --input DIR --output DIR [options]``.

Examples::

  python -m data_prep --layout hippocampus --input ../shared/data/hippocampus \\
      --output prepared/hippocampus
  python -m data_prep --layout lpba40 --input ../shared/data/lpba40 --output prepared/lpba40
  python -m data_prep --layout abdomen-synthetic --input ../shared/data/abdomen_ct_labels \\
      --output prepared/abdomen --limit 4
  python -m data_prep --layout folder --images scans/ --labels masks/ --modality CT \\
      --input scans/ --output prepared/mine
"""

import argparse
import sys
import time

from data_prep import layouts
from data_prep.prepare import Settings, prepare_dataset
from vtn_tf.io import InputError

DEFAULTS = Settings(layout="", input="", output="")


def parser():
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Crop, resample and normalise a 3-D dataset for VTN; write manifest.json.",
        epilog="Layout defaults: hippocampus 64^3, no crop; lpba40 128^3 around the brain "
               "foreground, atlas S01; abdomen-synthetic 128^3 around the body foreground, "
               "SYNTHETIC CT-like images; lits/sliver07 128^3 around the body foreground. "
               "Crops never use labels unless asked (--crop labels), and a model trained on "
               "label crops cannot register new scans, which have none.")
    p.add_argument("--layout", required=True, choices=sorted(layouts.LAYOUTS))
    p.add_argument("--input", required=True, help="dataset folder")
    p.add_argument("--output", required=True, help="folder for the prepared dataset")
    p.add_argument("--images", help="folder layout: image folder (default INPUT/images)")
    p.add_argument("--labels",
                   help="folder layout: label folder (default INPUT/labels if present)")
    p.add_argument("--modality", choices=("CT", "MRI"), help="default: the layout's")
    p.add_argument("--grid", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="output grid, each a multiple of 64 (default: the layout's)")
    p.add_argument("--crop", choices=("labels", "foreground", "none"),
                   help="what to crop around (default: the layout's)")
    p.add_argument("--no-crop", dest="crop", action="store_const", const="none",
                   help="same as --crop none")
    p.add_argument("--crop-label", type=int, help="crop around this label id (implies --crop labels)")
    p.add_argument("--margin-mm", type=float, default=DEFAULTS.margin_mm)
    p.add_argument("--foreground-threshold", type=float, default=DEFAULTS.foreground_threshold,
                   help="foreground = percentile-scaled intensity above this (0..1)")
    p.add_argument("--window-width", type=float, default=DEFAULTS.window_width, help="CT, HU")
    p.add_argument("--window-level", type=float, default=DEFAULTS.window_level, help="CT, HU")
    p.add_argument("--percentiles", type=float, nargs=2, default=DEFAULTS.percentiles,
                   metavar=("LOW", "HIGH"), help="MRI clipping percentiles")
    p.add_argument("--no-histogram-matching", dest="histogram_matching", action="store_false")
    p.add_argument("--landmarks", help="folder of ID.csv / ID.txt landmark files")
    p.add_argument("--landmark-coordinates", choices=("voxel", "ras", "lps"),
                   default=DEFAULTS.landmark_coordinates,
                   help="landmark units: voxels of the input image, or world mm (RAS or LPS)")
    p.add_argument("--validation-count", type=int, default=DEFAULTS.validation_count,
                   help="validation subjects carved out of the training split")
    p.add_argument("--evaluation-fraction", type=float, default=DEFAULTS.evaluation_fraction,
                   help="layouts without fixed splits: share of subjects held out for evaluation")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--limit", type=int, help="prepare only the first N subjects of each split")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--verbose", action="store_true", help="show tracebacks")
    return p


def main(argv=None):
    args = vars(parser().parse_args(argv))
    verbose = args.pop("verbose")
    args["percentiles"] = tuple(args["percentiles"])
    args["grid"] = tuple(args["grid"]) if args["grid"] else None
    start = time.perf_counter()
    try:
        manifest = prepare_dataset(Settings(**args))
    except (InputError, OSError) as error:
        if verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {len(v)}" for k, v in manifest["splits"].items())
    print(f"prepared {len(manifest['subjects'])} subjects ({counts}) in "
          f"{time.perf_counter() - start:.1f} s -> {args['output']}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
