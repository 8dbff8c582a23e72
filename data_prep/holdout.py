"""Carve a tuning fold out of a prepared manifest's training split.

Settings chosen after training (test-time passes, refinement schedules) need pairs the model
has not trained on. A dataset's validation split may be small (the hippocampus crops have 4
validation subjects, 12 ordered pairs); this writes a copy of the manifest whose ``train``
split leaves out its last ``--count`` subjects (sorted ids) and names them ``--split``. A model
trained on the copy scores choices on those subjects' pairs; the choice then goes to the model
trained on the whole training split. The evaluation split is copied unchanged.

    python -m data_prep.holdout --manifest prepared/hippocampus/manifest.json --count 40 \\
        --out prepared/hippocampus/manifest-tuning.json
"""

import argparse
import json
import os
import sys


def holdout(manifest, count, split="tuning"):
    """A copy of ``manifest`` (a dict) with the last ``count`` sorted training ids moved to ``split``."""
    splits = manifest["splits"]
    if split in splits:
        raise ValueError(f"the manifest already has a split named {split!r}")
    train = sorted(splits["train"])
    if not 0 < count < len(train):
        raise ValueError(f"--count must be between 1 and {len(train) - 1} "
                         f"(the training split has {len(train)} subjects)")
    copy = dict(manifest, splits={**splits, "train": train[:-count], split: train[-count:]})
    copy["holdout"] = {"split": split, "count": count, "from": "train"}
    return copy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="a prepared manifest.json")
    parser.add_argument("--count", type=int, required=True, help="training subjects to hold out (the last, sorted)")
    parser.add_argument("--split", default="tuning", help="name of the held-out split")
    parser.add_argument("--out", required=True,
                        help="where to write the copy (beside the original: its paths are relative)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        sys.exit(f"holdout: error: {args.out} exists (--overwrite to replace it)")
    if os.path.dirname(os.path.abspath(args.out)) != os.path.dirname(os.path.abspath(args.manifest)):
        sys.exit(f"holdout: error: write {args.out} beside {args.manifest} (its file paths are relative to its folder)")
    try:
        with open(args.manifest) as handle:
            manifest = json.load(handle)
        copy = holdout(manifest, args.count, args.split)
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"holdout: error: {args.manifest}: {error}")
    with open(args.out, "w") as handle:
        json.dump(copy, handle, indent=1)
    print(f"{args.out}: train {len(copy['splits']['train'])}, {args.split} {args.count} "
          f"({copy['splits'][args.split][0]} .. {copy['splits'][args.split][-1]})")


if __name__ == "__main__":
    main()
