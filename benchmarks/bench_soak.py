"""Soak: 100 hippocampus pairs in one batch, one model load; resident memory and seconds per pair
every 10 pairs, and whether anything traced again after the first pair of each grid size.

Each pair goes through the batch's own per-row path (`vtn_tf.registration.batch.register_row`:
the output folder's lock, its completion record, read, register, write), into a temporary
folder. Pairs: consecutive crops of ``$VTN_DATA/hippocampus/images`` (sorted; fixed ``k``,
moving ``k + 1``), all 64^3. Settings: ``--set section.field=value`` as ``vtn-register``'s
(default: the headers trusted, refinement 40x12 at 1/2 and full resolution, the hippocampus
schedule). The model: ``--model`` (a vtn-train run directory), e.g. a throwaway tiny one::

    python -m vtn_tf.cli.train --config experiments/tiny-ci.json --run_dir /tmp/soak-model \\
        --set data.manifest=prepared/hippocampus/manifest.json

Columns: pairs done; resident set (``VmRSS``) after them and its change since pair 10 (after
warm-up); seconds per pair over the last 10 (the row's read, registration, write and record;
the counting below is outside it); TensorFlow functions traced during those 10 (the sum of
every live ``tf.function``'s tracing count, read after each pair). "Traced again" counts traces on a pair
whose grid sizes (fixed, moving) an earlier pair already had: it should be 0.
"""

import gc
import os
import pathlib
import sys
import tempfile
import time

from common import base_parser, current_memory_mb, data_dir, finish, print_machine, print_table, setup_tensorflow

DEFAULT_SETTINGS = ("alignment.init=none", "refine.steps=40x12", "refine.resolution=[0.5,1]")


def tracing_count(tf):
    """Traces so far of every live tf.function (Keras's and the library's kernels)."""
    total = 0
    for thing in gc.get_objects():
        if isinstance(thing, tf.types.experimental.PolymorphicFunction):
            try:
                total += thing.experimental_get_tracing_count()
            except Exception:  # noqa: BLE001 - a function mid-construction
                pass
    return total


def main():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/soak-model", help="vtn-train run directory")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--every", type=int, default=10, help="a table row every N pairs")
    parser.add_argument("--set", action="append", dest="settings", metavar="SECTION.FIELD=VALUE",
                        help="a registration setting (repeatable; default: " + " ".join(DEFAULT_SETTINGS) + ")")
    args = parser.parse_args()
    args.settings = args.settings or list(DEFAULT_SETTINGS)
    if args.quick:
        args.pairs, args.every = min(args.pairs, 6), min(args.every, 3)
    images = sorted((data_dir() / "hippocampus" / "images").glob("*.nii.gz"))
    if len(images) < 2:
        print(f"skipped: no hippocampus crops in {data_dir() / 'hippocampus' / 'images'} (set VTN_DATA)")
        return 0
    if not (pathlib.Path(args.model) / "model.json").is_file():
        print(f"skipped: no model at {args.model}; train a throwaway one with\n  python -m vtn_tf.cli.train "
              "--config experiments/tiny-ci.json --run_dir /tmp/soak-model "
              "--set data.manifest=prepared/hippocampus/manifest.json")
        return 0
    tf = setup_tensorflow(args)
    import nibabel as nib

    from vtn_tf.registration import batch, pipeline
    from vtn_tf.registration.settings import RegistrationSettings

    count = min(args.pairs, len(images) - 1)
    settings = RegistrationSettings().with_overrides(args.settings)
    print_machine(args, [f"model {args.model}; {count} pairs of {data_dir() / 'hippocampus' / 'images'}; "
                         f"settings {' '.join(args.settings)}"])
    registrar = pipeline.Registrar(args.model, settings, log=lambda *_: None)
    seen, traces_per_pair, table, traced_again = set(), [], [], 0
    with tempfile.TemporaryDirectory(prefix="vtn-soak-") as folder:
        spent, traces, warm = 0.0, tracing_count(tf), None
        for k in range(count):
            fixed, moving = images[k], images[k + 1]
            grids = (nib.load(fixed).shape, nib.load(moving).shape)
            row = {"fixed": str(fixed), "moving": str(moving), "out": os.path.join(folder, f"pair{k:03d}"),
                   "moving_labels": [], "line": k + 2, "index": k}
            start = time.perf_counter()
            batch.register_row(registrar, row)
            spent += time.perf_counter() - start
            now = tracing_count(tf)
            if grids in seen:
                traced_again += now - traces
            traces_per_pair.append(now - traces)
            traces = now
            seen.add(grids)
            if (k + 1) % args.every == 0 or k + 1 == count:
                span = (k + 1) % args.every or args.every
                seconds, spent = spent / span, 0.0
                rss = current_memory_mb()
                warm = rss if warm is None else warm
                table.append([k + 1, f"{rss:.0f}", f"{100 * (rss - warm) / warm:+.1f} %", f"{seconds:.2f}",
                              sum(traces_per_pair[-span:])])
                print(f"  {k + 1} pairs: {rss:.0f} MB, {seconds:.2f} s per pair", file=sys.stderr, flush=True)
    print_table(["pairs", "resident MB", f"since pair {args.every}", f"s / pair (last {args.every})",
                 f"traces (last {args.every})"], table)
    print(f"{len(seen)} grid size pair(s) (fixed, moving); traced again after the first pair of a grid size: "
          f"{'no' if traced_again == 0 else f'yes, {traced_again} traces'}")
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
