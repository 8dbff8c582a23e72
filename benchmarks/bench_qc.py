"""What the quality check adds to a vtn-register --pairs registration, and its parts.

``vtn-register --pairs`` per pair with ``output.qc=false`` and ``output.qc=true``, side by side
in one run, and the check's parts.

Pairs (``--data``): LPBA40 S01 <- S02, S03, ... (160x192x160, 1 mm), or consecutive
hippocampus crops (64^3, 1 mm; the headers trusted, as the hippocampus models register), with
the moving labels, as stored. The model: a run directory (``--model``, e.g. runs/brain-labels or
runs/hippocampus-labels), or an untrained ADD at half width on a 64^3 grid (speed only; its
fields are random). Rows: batch mode with the model's ``fast``
preset (its alignment and passes, no refinement), then with ``--refine N`` (``--refine``,
default 60) on the default levels.

Columns (seconds, medians over the pairs after a warm-up pair; the parts over ``--repeats``
passes):

* batch per pair with ``output.qc=false`` and ``output.qc=true``, each pair registered both
  ways one after the other (read, register, write; the model loaded once), their difference
  (the median of the pairs' differences) and its share of the registration; the check's own
  ``qc_seconds`` (``qc.json``: placing, figures, picture) and its share;
* the check's parts on one pair: placing the moving image by the headers (the figures'
  "before"; no resampling when the two scans share their grid, as LPBA40's), the figures
  (`vtn_tf.qc.figures.compute`), the picture (`vtn_tf.qc.picture.draw`), and the cohort
  report per pair (`vtn_tf.qc.report.write`).
"""

import os
import statistics
import tempfile
import time

import nibabel
from common import base_parser, data_dir, format_seconds, model_dir, print_machine, print_table, setup_tensorflow


def pair_names(data, count):
    """``(fixed, moving)`` file names (without folder) of the first ``count`` pairs of ``data``."""
    if data == "lpba40":
        return [("S01.nii.gz", f"S{k:02d}.nii.gz") for k in range(2, 2 + count)]
    names = sorted(path.name for path in (data_dir() / data / "images").glob("*.nii.gz"))
    return list(zip(names[0:2 * count:2], names[1:2 * count:2]))


def _pairs_file(folder, data, count, tag):
    root = data_dir() / data
    path = os.path.join(folder, f"pairs-{tag}.csv")
    with open(path, "w") as stream:
        stream.write("fixed,moving,out,moving_labels\n")
        for fixed, moving in pair_names(data, count):
            stream.write(f"{root}/images/{fixed},{root}/images/{moving},{folder}/{tag}/{moving.split('.')[0]},"
                         f"{root}/labels/{moving}\n")
    return path


def per_pair(registrar, folder, data, count, tag):
    """Seconds per pair of the batch run (``--pairs``), each pair with the check off then on
    (the two runs side by side, so that a change in the machine's load falls on both): the
    medians over the pairs after the first of the time off, on, their difference, and the
    check's own ``qc_seconds``."""
    import io as text_io
    import json

    from vtn_tf.registration import batch

    rows = {qc: batch.read_pairs(_pairs_file(folder, data, count, f"{tag}-{'on' if qc else 'off'}"))
            for qc in (False, True)}
    seconds = {False: [], True: [], "qc": []}
    for off_row, on_row in zip(rows[False], rows[True]):
        for qc, row in ((False, off_row), (True, on_row)):
            registrar.settings.output.qc = qc
            begin = time.perf_counter()
            batch.run(registrar, [row], overwrite=True, stream=text_io.StringIO())
            seconds[qc].append(time.perf_counter() - begin)
        with open(os.path.join(on_row["out"], "qc.json"), encoding="utf-8") as stream:
            seconds["qc"].append(json.load(stream)["qc_seconds"])
    kept = {key: values[1:] if len(values) > 1 else values for key, values in seconds.items()}
    added = [on - off for off, on in zip(kept[False], kept[True])]
    return (statistics.median(kept[False]), statistics.median(kept[True]), statistics.median(added),
            statistics.median(kept["qc"]))


def parts(registrar, data, repeats):
    """Median seconds of the check's parts on the first pair."""
    import numpy as np

    from vtn_tf.qc import figures, picture, report
    from vtn_tf.registration import pipeline, quality, resampling

    root = data_dir() / data
    fixed_name, moving_name = pair_names(data, 1)[0]
    fixed, moving, labels = pipeline.read_inputs(root / "images" / fixed_name, root / "images" / moving_name,
                                                 [root / "labels" / moving_name])
    result = registrar.register(fixed, moving, labels)
    times = {"headers": [], "figures": [], "picture": [], "report": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeats + 1):
            begin = time.perf_counter()
            headers = resampling.resample_through(moving.data, np.linalg.inv(moving.affine) @ fixed.affine,
                                                  fixed.data.shape)
            times["headers"].append(time.perf_counter() - begin)
            begin = time.perf_counter()
            mask = figures.foreground(fixed.data)
            numbers = figures.compute(fixed.data, headers, result.warped, result.flow_voxels, fixed.affine,
                                      np.asarray(result.affine["world_ras"]), mask=mask, moving=moving.data,
                                      moving_affine=moving.affine, modality="MRI")
            times["figures"].append(time.perf_counter() - begin)
            begin = time.perf_counter()
            picture.draw(os.path.join(folder, "qc.png"), fixed.data, headers, result.warped, result.flow_voxels,
                         fixed.affine, numbers, [], result.warped_labels[0], mask=mask)
            times["picture"].append(time.perf_counter() - begin)
            check = quality.quality_check(result, fixed, moving, labels)
            with open(os.path.join(folder, "qc.json"), "w") as stream:
                stream.write(check.json_text())
            entries = [report.entry(f"pair {k}", folder) for k in range(20)]
            begin = time.perf_counter()
            report.write(folder, entries)
            times["report"].append((time.perf_counter() - begin) / len(entries))
    return {key: statistics.median(values[1:]) for key, values in times.items()}


def main():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", help="run directory (default: an untrained ADD, width 0.5, 64^3)")
    parser.add_argument("--pairs", type=int, default=5, help="pairs per cell (the first one is a warm-up)")
    parser.add_argument("--refine", type=int, default=60, help="also with --refine N (0: skip)")
    parser.add_argument("--data", choices=("lpba40", "hippocampus"), default="lpba40", help="which scans")
    args = parser.parse_args()
    if not (data_dir() / args.data).is_dir():
        print(f"{args.data} not found under {data_dir()} (set VTN_DATA): nothing to measure")
        return
    setup_tensorflow(args)
    from vtn_tf.registration import pipeline
    from vtn_tf.registration.settings import RefineSettings, resolve

    count = 2 if args.quick else args.pairs
    repeats = args.repeats or (1 if args.quick else 3)
    print_machine(args)
    with tempfile.TemporaryDirectory() as folder:
        model = model_dir(args, folder)
        # the model's fast preset (its alignment and passes, no refinement), as --preset fast
        registrar = pipeline.Registrar(model, resolve(model, "fast") if args.model else None, log=lambda *_: None)
        rows = []
        for refine in [0] + ([args.refine] if args.refine and not args.quick else []):
            registrar.settings.refine = RefineSettings(steps=refine)
            off, on, added, check = per_pair(registrar, folder, args.data, count, f"refine{refine}")
            rows.append([f"--refine {refine}" if refine else "no refinement", format_seconds(off),
                         format_seconds(on), format_seconds(added), f"{100 * added / off:.0f} %",
                         format_seconds(check), f"{100 * check / off:.0f} %"])
        fixed_name = pair_names(args.data, 1)[0][0]
        grid = "x".join(str(n) for n in nibabel.load(data_dir() / args.data / "images" / fixed_name).shape)
        print_table([f"registration ({args.data}, {grid})", "batch per pair, output.qc=false", "output.qc=true",
                     "added", "added / registration", "the check (qc_seconds)", "check / registration"], rows)
        registrar.settings.refine = RefineSettings(steps=0)
        timed = parts(registrar, args.data, repeats)
        print_table(["headers placement", "figures", "picture", "report.html + .csv, per pair"],
                    [[format_seconds(timed[key]) for key in ("headers", "figures", "picture", "report")]])


if __name__ == "__main__":
    main()
