"""End-to-end registration time of one real LPBA40 pair (S02 → S01) at 128^3.

What is timed: the whole VTN forward (every subnetwork, the compositions and the warps of
the original moving image) on one pair, batch 1, after warm-up; median of ``--repeats``.
The weights are untrained (random LeCun-uniform): the arithmetic, hence the time, is that
of a trained model, but the flows are meaningless. The model call is wrapped in a
``tf.function`` with and without ``jit_compile`` (XLA on the whole forward).

Data: ``$VTN_DATA/lpba40/images/S01.nii.gz`` (fixed) and ``S02.nii.gz`` (moving), 160×192×160
at 1 mm. ``--resize zoom`` (default) resamples each volume to 128^3 with
``scipy.ndimage.zoom(order=1)`` (anisotropic factors 0.8, 0.667, 0.8, the whole head kept);
``--resize crop`` centre-crops/pads to 128^3 (1 mm kept, the brain edges cut). Without the
data the script says so and uses two random smooth volumes instead (timings are the same).

Also: a breakdown (one DenseSubnetwork / AffineSubnetwork forward alone, one warp, one
compose), the last spec with its network in bfloat16 (``--precision``), classical tools
on the same pair when installed (ANTs SyN via antspyx, elastix affine + B-spline via
itk-elastix; single run each, wall clock), and the ADDD time
under other thread / oneDNN settings (fresh processes, since TF reads them at start-up).

Usage: ``python benchmarks/bench_inference.py [--quick] [--specs D ADDD] [--no-classical]``.
"""

import json
import os
import subprocess
import sys
import time

import common
import numpy as np

SIZE = 128


def load_pair(resize, size):
    """(fixed, moving) float32 ``[size]*3`` arrays and a description of where they came from."""
    from scipy import ndimage

    folder = common.data_dir() / "lpba40" / "images"
    paths = [next(iter(sorted(folder.glob(f"{s}.nii*"))), None) for s in ("S01", "S02")]
    if not all(paths):
        rng = np.random.default_rng(0)
        volumes = [ndimage.gaussian_filter(rng.random((size,) * 3, dtype=np.float32), 2) for _ in range(2)]
        return volumes, (f"LPBA40 not found under {folder} (set VTN_DATA): using two random smooth "
                         "volumes instead; timings are unaffected, the classical tools' are not meaningful")
    import nibabel

    volumes = []
    for path in paths:
        volume = np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float32)
        if resize == "zoom":
            volume = ndimage.zoom(volume, [size / n for n in volume.shape], order=1)
        else:
            volume = centre_crop_or_pad(volume, size)
        volumes.append(volume.astype(np.float32))
    shape = nibabel.load(str(paths[0])).shape
    how = "scipy.ndimage.zoom(order=1)" if resize == "zoom" else "centre crop/pad"
    return volumes, f"LPBA40 S02 (moving) → S01 (fixed), {'×'.join(map(str, shape))} → {size}^3 by {how}"


def centre_crop_or_pad(volume, size):
    out = np.zeros((size,) * 3, np.float32)
    source, target = [], []
    for n in volume.shape:
        if n >= size:
            start = (n - size) // 2
            source.append(slice(start, start + size))
            target.append(slice(0, size))
        else:
            start = (size - n) // 2
            source.append(slice(0, n))
            target.append(slice(start, start + n))
    out[tuple(target)] = volume[tuple(source)]
    return out


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# ---- VTN -----------------------------------------------------------------------------------
def measure_vtn(tf, spec, fixed, moving, width, repeats, warmup, jit, slow_first=None, precision="float32"):
    """Build ``spec`` with its network computing in ``precision`` (as `restore_model` does),
    time its forward; with ``slow_first`` seconds, a first call slower than that is followed
    by one timed call only (XLA on CPU can take minutes per call)."""
    from vtn_tf.nn.checkpoints import network_precision
    from vtn_tf.nn.model import VTN

    shape = fixed.shape
    with network_precision(precision):
        model = VTN(spec=spec, width=width)
        model.build((None, *shape[1:4], 1))

    @tf.function(jit_compile=jit)
    def register(fixed, moving):
        out = model({"fixed": fixed, "moving": moving})
        return out["flow"], out["warped"]

    common.reset_peak_memory()
    start = time.perf_counter()
    register(fixed, moving)
    common.sync()
    first = time.perf_counter() - start
    if slow_first is not None and first > slow_first:
        repeats, warmup = 1, 0
    seconds, _ = common.time_call(lambda: register(fixed, moving), repeats, warmup)
    flops = common.graph_flops(register.get_concrete_function(fixed, moving))
    return model, seconds, first, common.peak_memory_text(), flops


def breakdown(tf, model, fixed, moving, repeats, warmup, xla=True):
    """Time the pieces of one ADDD-like forward separately."""
    from vtn_tf.core import fields, sampling

    pair = tf.concat([fixed, moving], axis=-1)
    rows = []
    for stage, name in zip(model.stages, model.stage_names):
        if name not in ("affine", "dense1"):
            continue
        for jit in (False, True) if xla else (False,):
            fn = tf.function(lambda x, _stage=stage: _stage(x), jit_compile=jit)
            seconds, _ = common.time_call(lambda: fn(pair), repeats, warmup)
            rows.append([f"{type(stage).__name__} forward", "XLA" if jit else "graph", seconds])
    flow = tf.random.normal([*fixed.shape[:4], 3], stddev=2.0)
    seconds, _ = common.time_call(lambda: sampling.warp(moving, flow), repeats, warmup)
    rows.append(["warp (vtn_tf.warp, linear)", "XLA", seconds])
    compose = tf.function(fields.compose)
    seconds, _ = common.time_call(lambda: compose(flow, flow), repeats, warmup)
    rows.append(["compose (warp of a 3-channel flow + add)", "XLA", seconds])
    return rows


# ---- classical tools -------------------------------------------------------------------------
def run_ants(fixed_np, moving_np):
    try:
        import ants
    except Exception as error:  # noqa: BLE001 - any import failure means "not installed"
        return None, f"antspyx not installed ({type(error).__name__}: {error}); `pip install antspyx`"
    fixed, moving = ants.from_numpy(fixed_np), ants.from_numpy(moving_np)
    start = time.perf_counter()
    result = ants.registration(fixed, moving, type_of_transform="SyN")
    seconds = time.perf_counter() - start
    return seconds, f"r(fixed, warped) = {correlation(fixed_np, result['warpedmovout'].numpy()):.3f}"


def run_elastix(fixed_np, moving_np):
    try:
        import itk
        itk.ElastixRegistrationMethod  # noqa: B018 - fails without itk-elastix
    except Exception as error:  # noqa: BLE001
        return None, f"itk-elastix not installed ({type(error).__name__}: {error}); `pip install itk-elastix`"
    fixed, moving = itk.image_from_array(fixed_np), itk.image_from_array(moving_np)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline"))
    start = time.perf_counter()
    warped, _ = itk.elastix_registration_method(fixed, moving, parameter_object=parameters,
                                                log_to_console=False)
    seconds = time.perf_counter() - start
    return seconds, f"r(fixed, warped) = {correlation(fixed_np, itk.array_from_image(warped)):.3f}"


def print_speed_limit(gflop, fastest, classical_seconds):
    """How far the arithmetic alone lets each spec go: GFLOP ÷ the machine's sustained rate."""
    matmul, conv = common.machine_gflops()
    print("## The arithmetic floor\n")
    print(f"- this machine sustains {matmul:.0f} GFLOP/s on a 2048² float32 matmul and {conv:.0f} GFLOP/s "
          f"on a 3×3×3, 32 → 32 channel convolution at 64³ (TensorFlow, oneDNN)")
    if classical_seconds:
        print(f"- 100× faster than the fastest classical tool here means {classical_seconds / 100:.3f} s per pair")
    print()
    rows = []
    for spec, g in gflop.items():
        floor = g / conv
        needed = g / (classical_seconds / 100) if classical_seconds else None
        rows.append([spec, f"{g:.3g}", common.format_seconds(fastest.get(spec)), common.format_seconds(floor),
                     f"{needed:.0f}" if needed else "—"])
    common.print_table(["spec", "GFLOP per pair", "measured", "GFLOP ÷ conv rate (floor)",
                        "GFLOP/s needed for 100×"], rows)


def print_precisions(tf, args, fixed, moving):
    """The last spec with its network in bfloat16 (and float16 on a GPU) beside float32."""
    spec = args.specs[-1]
    precisions = ["float32", "bfloat16"] + (["float16"] if tf.config.list_physical_devices("GPU") else [])
    print(f"## {spec} with the network in reduced precision (`--precision`; weights, flows and "
          "warps stay float32), tf.function without XLA\n")
    rows, baseline = [], None
    for precision in precisions:
        try:
            _, seconds, _, memory, _ = measure_vtn(tf, spec, fixed, moving, args.width, args.repeats,
                                                   args.warmup, False, precision=precision)
        except Exception as error:  # noqa: BLE001 - e.g. no bfloat16 kernels on this device
            rows.append([precision, f"failed: {type(error).__name__}", "", ""])
            continue
        baseline = baseline or seconds
        rows.append([precision, common.format_seconds(seconds), common.ratio(baseline, seconds), memory])
        print(f"  … {precision} done", flush=True)
    print()
    common.print_table(["network precision", "seconds", "float32 ÷ this", common.memory_label()], rows)


# ---- settings sweep (fresh processes) -------------------------------------------------------
SETTINGS = (
    ("TF defaults", {}, 0),
    ("intra/inter-op threads = 2", {}, 2),
    ("TF_ENABLE_ONEDNN_OPTS=0", {"TF_ENABLE_ONEDNN_OPTS": "0"}, 0),
    ("TF_ENABLE_ONEDNN_OPTS=1, threads = 2", {"TF_ENABLE_ONEDNN_OPTS": "1"}, 2),
)


def settings_sweep(args, spec):
    rows = []
    for name, env, threads in SETTINGS:
        command = [sys.executable, __file__, "--child", "--specs", spec, "--resize", args.resize,
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--width", str(args.width),
                   "--size", str(args.size), "--threads", str(threads)]
        result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            rows.append([name, "failed: " + (result.stderr.strip().splitlines() or ["?"])[-1], ""])
            continue
        values = json.loads(lines[-1][len("RESULT "):])
        rows.append([name, common.format_seconds(values["graph"]), values["memory"]])
        print(f"  … settings '{name}' done", flush=True)
    return rows


def main():
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", default=None, help="cascades (default D AD ADD ADDD)")
    parser.add_argument("--size", type=int, default=None, help=f"cube side (default {SIZE}; --quick 64)")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = paper)")
    parser.add_argument("--resize", choices=("zoom", "crop"), default="zoom")
    parser.add_argument("--no-classical", action="store_true", help="skip ANTs and elastix")
    parser.add_argument("--no-settings", action="store_true", help="skip the thread/oneDNN sweep")
    parser.add_argument("--xla-limit", type=float, default=60.0,
                        help="if a spec's first XLA call takes longer, time it once and skip XLA for the "
                             "larger specs")
    parser.add_argument("--child", action="store_true", help=argparse_suppress())
    args = parser.parse_args()
    args.specs = args.specs or (["D", "ADDD"] if args.quick else ["D", "AD", "ADD", "ADDD"])
    args.size = args.size or (64 if args.quick else SIZE)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else 1
    if args.quick:
        args.width = min(args.width, 0.25)
    tf = common.setup_tensorflow(args)

    (fixed_np, moving_np), source = load_pair(args.resize, args.size)
    fixed = tf.constant(fixed_np[None, ..., None])
    moving = tf.constant(moving_np[None, ..., None])

    if args.child:
        _, graph, _, memory, _ = measure_vtn(tf, args.specs[0], fixed, moving, args.width, args.repeats,
                                          args.warmup, False)
        print("RESULT " + json.dumps({"graph": graph, "memory": memory}))
        return

    print(f"# Inference: one registration at {args.size}^3, batch 1\n")
    common.print_machine(args, [source, f"width {args.width:g} (1 = paper), untrained weights (timing only); "
                                f"median of {args.repeats} after {args.warmup} warm-up"])
    rows, largest, fastest, xla_skip, gflop = [], None, {}, None, {}
    for spec in args.specs:
        times = {}
        for jit in (False, True):
            if jit and xla_skip:
                print(f"  - {spec} with XLA skipped: {xla_skip}")
                times[jit] = (None, None, None)
                continue
            try:
                model, seconds, first, memory, flops = measure_vtn(tf, spec, fixed, moving, args.width,
                                                            args.repeats, args.warmup, jit,
                                                            args.xla_limit if jit else None)
                if jit and first > args.xla_limit:
                    xla_skip = f"{spec}'s first XLA call took {first:.0f} s (> --xla-limit {args.xla_limit:g})"
            except Exception as error:  # noqa: BLE001 - report and go on (e.g. XLA failure, OOM)
                print(f"  ! {spec} jit={jit}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
                times[jit] = (None, None, None)
                continue
            times[jit] = (seconds, first, memory)
            gflop[spec] = flops / 1e9
            largest = model
        (graph, graph_first, graph_memory), (xla, xla_first, xla_memory) = times[False], times[True]
        fastest[spec] = min((t for t in (graph, xla) if t is not None), default=None)
        rate = f"{gflop[spec] / fastest[spec]:.0f}" if fastest[spec] and spec in gflop else "—"
        rows.append([spec, common.format_seconds(graph), common.format_seconds(xla), common.ratio(graph, xla),
                     common.format_seconds(graph_first), common.format_seconds(xla_first),
                     f"{graph_memory or '—'} / {xla_memory or '—'}", f"{gflop.get(spec, 0):.3g}", rate])
        print(f"  … {spec} done", flush=True)
    print()
    common.print_table(["spec", "tf.function", "tf.function(jit_compile)", "graph / XLA",
                        "first call (trace) graph", "first call XLA",
                        common.memory_label() + " graph / XLA", "GFLOP", "GFLOP/s (best)"], rows)

    if largest is not None:
        print("## What one forward is made of (same size, batch 1)\n")
        pieces = breakdown(tf, largest, fixed, moving, args.repeats, args.warmup, xla=not xla_skip)
        common.print_table(["piece", "mode", "seconds"],
                           [[p, m, common.format_seconds(s)] for p, m, s in pieces])

    fastest_classical = None
    if not args.no_classical and not args.quick:
        print("## Classical tools on the same pair (one run each, wall clock)\n")
        reference_spec = args.specs[-1]
        vtn_seconds = fastest.get(reference_spec)
        classical, classical_seconds = [], []  # table rows; seconds of the tools that ran
        for name, run in (("ANTs SyN (antspyx, type_of_transform='SyN')", run_ants),
                          ("elastix affine + B-spline (itk-elastix default maps)", run_elastix)):
            try:
                seconds, note = run(fixed_np, moving_np)
            except Exception as error:  # noqa: BLE001
                seconds, note = None, f"failed: {type(error).__name__}: {error}"
            if seconds is None:
                print(f"- skipped {name}: {note}")
            classical.append([name, common.format_seconds(seconds), common.ratio(seconds, vtn_seconds), note])
            if seconds is not None:
                classical_seconds.append(seconds)
            print(f"  … {name} done", flush=True)
        print()
        common.print_table(["method", "seconds", f"÷ VTN {reference_spec} (best of graph/XLA)", "note"],
                           classical)
        fastest_classical = min(classical_seconds, default=None)
    elif args.quick:
        print("- classical tools skipped in --quick mode\n")

    print_speed_limit(gflop, fastest, fastest_classical)
    print_precisions(tf, args, fixed, moving)

    if not args.no_settings and not args.quick:
        spec = args.specs[-1]
        print(f"## {spec} under other settings (fresh process each)\n")
        common.print_table(["setting", "tf.function (no XLA)", common.memory_label()],
                           settings_sweep(args, spec))
    common.finish()


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
