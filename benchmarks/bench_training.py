"""Training throughput (steps/s) and peak memory of VTN cascades through the real path.

The real path: `vtn_tf.training.loop.build_model` (VTN + Adam with the paper's schedule) and
``model.fit`` over `vtn_tf.training.data.pair_dataset` (augmented random pairs; the subjects are
random smooth volumes held in memory, so no data files are needed) with
``steps_per_epoch``. Per cell: ``--warmup`` steps (the first traces and compiles) then
``--repeats`` timed steps; the step time is the median interval between
``on_train_batch_end`` calls after warm-up.

Cells: spec × size × batch × invertibility (``VTN(invertibility_weight=1e-3)``, which adds a
second, swapped forward pass). On CPU, a cell whose predicted time (from the cheapest
measured cell, scaled by voxels × batch × stages × passes) exceeds ``--max-seconds`` is
skipped and listed as such.

Diagnostics (``--diagnose``, on by default, for one small cell): traces of the train step
and of the warp (retracing), the augmented ``pair_dataset`` against a pre-made tensor
dataset (pipeline stalls), the warp with XLA on and off, and the warp with TensorFlow's
autodiff gradients instead of its hand-written ones.

GPU: ``--find-max-batch`` searches the largest ADDD batch at 128^3 that trains (doubling,
then bisection, catching out-of-memory errors).

Usage: ``python benchmarks/bench_training.py [--quick] [--full] [--max-seconds 60]``.
"""

import argparse
import json
import subprocess
import sys
import time

import common
import numpy as np

INVERTIBILITY = 1e-3


def synthetic_dataset(size, subjects=4, seed=0):
    """A `vtn_tf.training.data.PreparedDataset` of random smooth volumes (no files)."""
    from scipy import ndimage

    from vtn_tf.training.data import PreparedDataset

    rng = np.random.default_rng(seed)
    ids = [f"R{i:02d}" for i in range(subjects)]
    images = {}
    for i in ids:
        coarse = rng.random((size // 8,) * 3, dtype=np.float32)
        images[i] = ndimage.zoom(coarse, 8, order=1).astype(np.float32)
    return PreparedDataset(
        manifest_path="<random volumes>", name="random", modality="none", synthetic=True,
        grid=(size,) * 3, label_values=[], atlas=None, splits={"train": ids}, loaded_splits=("train",),
        subjects={i: {"id": i} for i in ids}, images=images, labels={i: None for i in ids})


def make_stream(tf, size, batch, kind):
    """``pairs``: the training pipeline (augmented); ``pairs-noaug``; ``tensor``: one pre-made batch."""
    from vtn_tf.training import data as data_lib

    dataset = synthetic_dataset(size)
    pairs = data_lib.training_pairs(dataset)
    if kind == "tensor":
        first = next(iter(data_lib.pair_dataset(dataset, pairs, batch, augment=False)))
        return tf.data.Dataset.from_tensors(first).repeat()
    return data_lib.pair_dataset(dataset, pairs, batch, augment=(kind == "pairs"))


class StepTimer:
    """Keras callback: wall-clock time at the end of every training batch."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.stamps = []

            def on_train_begin(self, logs=None):
                self.stamps = [time.perf_counter()]

            def on_train_batch_end(self, batch, logs=None):
                common.sync()
                self.stamps.append(time.perf_counter())

        return _Timer()


def build(tf, spec, size, batch, invertibility, width):
    from vtn_tf.training import config as config_lib
    from vtn_tf.training.loop import build_model

    config = config_lib.load_config(None, [
        f"model.spec={spec}", f"model.width={width}",
        f"model.invertibility_weight={INVERTIBILITY if invertibility else 0.0}",
        f"train.batch_size={batch}", "train.steps_per_epoch=1000"])
    return build_model(config, (size,) * 3)


def measure_cell(args, spec, size, batch, invertibility, warmup, repeats, stream_kind="pairs", warp="xla"):
    """Run one cell in a fresh process (memory is returned, peaks are the cell's own).

    Returns (seconds per step, first-step seconds, peak memory text, train-step traces,
    warp traces); raises RuntimeError (with the child's message) when the cell fails."""
    cell = {"spec": spec, "size": size, "batch": batch, "invertibility": invertibility, "warmup": warmup,
            "repeats": repeats, "stream_kind": stream_kind, "warp": warp}
    command = [sys.executable, __file__, "--cell", json.dumps(cell), "--width", str(args.width),
               "--threads", str(args.threads)] + (["--mixed-precision"] if args.mixed_precision else [])
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return tuple(json.loads(line[len("RESULT "):]))
    error = [line for line in result.stderr.strip().splitlines() if "Error" in line or "error" in line]
    message = (error or result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    if result.returncode in (-9, 137):
        message = f"killed (out of host memory?): {message}"
    raise RuntimeError(message)


def run_cell(tf, cell, width):
    """The child side of `measure_cell`."""
    import contextlib

    from vtn_tf.core import sampling
    from vtn_tf.serving import export

    variant = contextlib.nullcontext()
    if cell["warp"] == "no-xla":  # the same maths (forward and gradients) in plain tf.functions
        variant = export.warp_without_xla()
    elif cell["warp"] == "autodiff":  # the XLA forward with TensorFlow's own gradients
        sampling.sample_linear = sampling.sample_linear_forward
    with variant:
        print("RESULT " + json.dumps(_measure_in_process(
            tf, cell["spec"], cell["size"], cell["batch"], cell["invertibility"], width, cell["warmup"],
            cell["repeats"], cell["stream_kind"])))


def _measure_in_process(tf, spec, size, batch, invertibility, width, warmup, repeats, stream_kind="pairs"):
    from vtn_tf.core import sampling
    common.reset_peak_memory()
    model = build(tf, spec, size, batch, invertibility, width)
    traces = {"train_step": 0}
    original = model.train_step

    def counted_train_step(data):
        traces["train_step"] += 1  # Python runs only while tracing
        return original(data)

    model.train_step = counted_train_step
    warp_traces = sampling.sample_linear_forward.experimental_get_tracing_count()
    timer = StepTimer()
    stream = make_stream(tf, size, batch, stream_kind)
    model.fit(stream, epochs=1, steps_per_epoch=warmup + repeats, callbacks=[timer], verbose=0)
    intervals = np.diff(timer.stamps)
    step = float(np.median(intervals[warmup:])) if len(intervals) > warmup else float(intervals[-1])
    memory = common.peak_memory_text()
    warp_traces = sampling.sample_linear_forward.experimental_get_tracing_count() - warp_traces
    return step, float(intervals[0]), memory, traces["train_step"], warp_traces


def predicted_cost(base, cell):
    """Predicted step seconds of ``cell`` from a measured ``base`` = (cell, seconds)."""

    (spec0, size0, batch0, inv0), seconds = base
    spec, size, batch, inv = cell
    work = lambda s, n, b, i: len(s) * n**3 * b * (2 if i else 1)  # noqa: E731
    return seconds * work(spec, size, batch, inv) / work(spec0, size0, batch0, inv0)


def main():
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", default=None, help="default D ADD ADDD")
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="default 64 128")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = paper)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="skip a cell predicted to take longer than this (warm-up + timed steps)")
    parser.add_argument("--no-diagnose", action="store_true", help="skip the diagnostics table")
    parser.add_argument("--find-max-batch", action="store_true",
                        help="GPU: largest ADDD batch that trains at 128^3 (binary search)")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tf = common.setup_tensorflow(args)
    if args.cell:
        run_cell(tf, json.loads(args.cell), args.width)
        return
    gpu = common.has_gpu()
    if args.quick:
        args.specs = args.specs or ["D", "ADD"]
        args.sizes = args.sizes or [64]
        args.batches = args.batches or [1, 2]
        args.width = min(args.width, 0.25)
    args.specs = args.specs or ["D", "ADD", "ADDD"]
    args.sizes = args.sizes or [64, 128]
    args.batches = args.batches or [1, 8]
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else 2
    if args.max_seconds is None:
        args.max_seconds = float("inf") if (args.full or gpu) else 30.0

    print("# Training: steps per second through model.fit\n")
    common.print_machine(args, [
        f"width {args.width:g} (1 = paper); Adam; augmented vtn_tf.training.data.pair_dataset of random smooth volumes",
        f"{args.warmup} warm-up steps (trace + compile) then median of {args.repeats} steps; "
        f"cells predicted above {args.max_seconds:g} s skipped"])

    cells = [(spec, size, batch, inv) for size in args.sizes for spec in args.specs
             for batch in args.batches for inv in (False, True)]
    cells.sort(key=lambda c: predicted_cost((("D", 64, 1, False), 1.0), c))  # cheapest first
    rows, skipped, base = [], [], None
    for cell in cells:
        spec, size, batch, inv = cell
        label = [spec, f"{size}^3", batch, "yes" if inv else "no"]
        if base is not None:
            predicted = predicted_cost(base, cell) * (args.warmup + args.repeats)
            if predicted > args.max_seconds:
                skipped.append(f"{spec} {size}^3 batch {batch} inv {label[3]}: predicted ≈ {predicted:.0f} s")
                continue
        try:
            step, first, memory, traces, warp_traces = measure_cell(
                args, spec, size, batch, inv, args.warmup, args.repeats)
        except RuntimeError as error:  # OOM or other failure in the child: report, go on
            kind = "out of memory" if common.is_out_of_memory(error) else str(error)[:120]
            rows.append(label + ["—", "—", "—", "—", f"failed: {kind}"])
            continue
        base = base or (cell, step)
        rows.append(label + [f"{1 / step:.3f}", common.format_seconds(step), common.format_seconds(first),
                             memory, f"{traces} / {warp_traces}"])
        print(f"  … {spec} {size}^3 batch {batch} inv {label[3]}: {step:.2f} s/step", flush=True)
    print()
    common.print_table(["spec", "size", "batch", "invertibility", "steps/s", "s/step",
                        "first step (compile)", common.memory_label(), "traces: train_step / warp"], rows)
    for line in skipped:
        print(f"- skipped {line} (> --max-seconds {args.max_seconds:g}; use --full or raise it)")
    if skipped:
        print()

    if not args.no_diagnose:
        diagnose(tf, args)
    if args.find_max_batch:
        find_max_batch(tf, args)
    common.finish()


def diagnose(tf, args):
    """Pipeline stalls and XLA-on/off for the warp, on one small cell."""
    spec, size, batch = args.specs[0], args.sizes[0], max(args.batches)
    print(f"## Diagnostics ({spec}, {size}^3, batch {batch}, no invertibility)\n")
    rows = []
    variants = [("pair_dataset, augmented (training path)", "pairs"),
                ("pair_dataset, no augmentation", "pairs-noaug"),
                ("pre-made tensor dataset (no pipeline work)", "tensor")]
    results = {}
    for name, kind in variants:
        step, _, memory, traces, warp_traces = measure_cell(
            args, spec, size, batch, False, args.warmup, args.repeats, kind)
        results[kind] = step
        rows.append([name, common.format_seconds(step), common.ratio(step, results["pairs"]),
                     memory, f"{traces} / {warp_traces}"])
    # The warp swapped for the same maths in plain tf.functions, or with autodiff gradients.
    for name, warp in (("warp without XLA (tf.function, same maths)", "no-xla"),
                       ("warp with TensorFlow's autodiff gradients", "autodiff")):
        step, _, memory, traces, _ = measure_cell(args, spec, size, batch, False, args.warmup, args.repeats,
                                                  "pairs", warp=warp)
        rows.append([name, common.format_seconds(step), common.ratio(step, results["pairs"]), memory,
                     f"{traces} / —"])
    augment_s = time_pipeline(tf, size, batch, "pairs", args.repeats + 2)
    plain_s = time_pipeline(tf, size, batch, "pairs-noaug", args.repeats + 2)
    common.print_table(["variant", "s/step", "÷ training path", common.memory_label(),
                        "traces: train_step / warp"], rows)
    print(f"- the pipeline alone (no model): {common.format_seconds(augment_s)} per augmented batch, "
          f"{common.format_seconds(plain_s)} per plain batch (it runs concurrently with the step "
          "through prefetch, but shares the same cores on a CPU)\n")


def time_pipeline(tf, size, batch, kind, count):
    iterator = iter(make_stream(tf, size, batch, kind))
    next(iterator)
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return (time.perf_counter() - start) / count


def find_max_batch(tf, args):
    print("## Largest ADDD batch at 128^3 that trains\n")
    if not common.has_gpu():
        print("- skipped: no GPU (on a CPU the limit is host memory and time, not a batch size)\n")
        return

    def fits(batch):
        try:
            step, _, memory, _, _ = measure_cell(args, "ADDD", 128, batch, False, 1, 1)
            print(f"  … batch {batch}: {step:.2f} s/step, {memory} MiB", flush=True)
            return step
        except RuntimeError as error:
            if not common.is_out_of_memory(error):
                raise
            print(f"  … batch {batch}: out of memory", flush=True)
            return None

    good, bad, last = 0, None, None
    batch = 1
    while bad is None:
        result = fits(batch)
        if result is None:
            bad = batch
        else:
            good, last = batch, result
            batch *= 2
            if batch > 1024:
                break
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        result = fits(middle)
        if result is None:
            bad = middle
        else:
            good, last = middle, result
    if good:
        print(f"- largest batch: {good} ({good / last:.1f} pairs/s)\n")
    else:
        print("- even batch 1 does not fit\n")


if __name__ == "__main__":
    main()
