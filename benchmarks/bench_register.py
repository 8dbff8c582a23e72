"""End-to-end registration speed on original scans: vtn-register's parts, batch mode, one CLI call,
beside ANTs SyN and elastix on the same files.

Pairs: LPBA40 S02 -> S01 as stored (160x192x160, 1 mm) and a 256x256x160-class brain made from
them (each volume resampled to 0.9375 x 0.75 x 1 mm on its own grid, world space kept: the
size of a typical T1 scan). The model: a run directory (``--model``, e.g. runs/brain-cpu), or an
untrained ADD at half width on a 64^3 grid (speed only; its fields are random).

Rows (seconds, median of ``--repeats`` after a warm-up):

* ``register_volumes`` parts: preprocess (crop, intensity maps, initial alignment, both images
  onto the network grid), network, field (network flow onto the fixed grid, the alignment
  composed), resample (moving image and labels through the field), plus read and write;
* the network alone (the same call as inside: `vtn_tf.registration.network.network_outputs`, one
  TensorFlow graph), and ``register_volumes`` / network; ``register_volumes`` again without
  the affine search (``--set alignment.steps=0``: the initialiser alone) and its ratio;
* batch mode per pair (``vtn-register --pairs``, model loaded once, read + register + write),
  gzip level 1 (the default), ``.nii`` (``--set output.compression=0``), and gzip with
  ``--set refine.steps=N`` (``--refine``, default 60: the instance optimisation);
* one ``vtn-register`` CLI call (a fresh process: Python and TensorFlow start-up, model load),
  with a new compiled-kernel cache (``VTN_XLA_CACHE``; every kernel compiled, as with the cache
  off) and again with the cache it left (the usual case from the second call on);
* ANTs SyN (``ants.registration`` + ``ants.apply_transforms`` of the labels) and elastix
  (affine + B-spline, then transformix of the labels) on the same files, once each
  (``--no-classical`` skips them), and the ratios.

A call table (``--call``): one ``vtn-register`` call as a user or a script makes it, part by
part, on a hippocampus crop pair (64^3, ``--hippocampus-model``) and on the LPBA40 pair
(``--model``), each with the model's ``--preset`` (default accurate): the process start (Python,
its set-up), importing the registration code (TensorFlow), the model (build + restore), then
read, registration and write of the first pair in that process, and the same pair again (the
work alone: a batch's pair; first - second is the tracing and compiling of the first); the
whole process's wall clock with a new compiled-kernel cache and with the one it left; a call
handed to a running ``vtn-register --serve`` (the client's wall clock, the second pair sent;
the first one pays the server's tracing); ANTs SyN's and elastix's whole processes on the same
files (import, read, register, write the warped image and labels), and the ratios.

A second table: the peak resident memory of one ``vtn-register`` CLI call (a fresh process;
its own ``ru_maxrss``), with and without ``--refine``, for the pairs of ``--memory-sizes``:
``lpba40``, ``256`` and ``512`` (a 512x512x400-class pair, the LPBA40 pair resampled to
0.31 x 0.375 x 0.4 mm).
"""

import dataclasses
import os
import subprocess
import sys
import tempfile
import time

from common import (
    REPO_ROOT,
    base_parser,
    data_dir,
    format_seconds,
    model_dir,
    print_machine,
    print_table,
    ratio,
    setup_tensorflow,
)


def _brain_pair(folder, size):
    """Paths of (fixed, moving, moving_labels) for ``size`` ``"lpba40"`` or ``"256"``."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    root = data_dir() / "lpba40"
    paths = [root / "images" / "S01.nii.gz", root / "images" / "S02.nii.gz", root / "labels" / "S02.nii.gz"]
    if size == "lpba40":
        return [str(p) for p in paths]
    out = []
    for path, order in zip(paths, (1, 1, 0)):
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
        zoom = np.array([256 / 160, 256 / 192, 1.0]) if size == "256" else np.array([512 / 160, 512 / 192, 400 / 160])
        resampled = ndimage.zoom(data, zoom, order=order)
        affine = image.affine.copy()
        affine[:3, :3] = affine[:3, :3] / zoom
        suffix = ".nii.gz" if size == "256" else ".nii"  # uncompressed: quicker to make at 512
        target = os.path.join(folder, f"big{size}_" + path.name.replace(".nii.gz", "")
                              + ("_lab" if order == 0 else "") + suffix)
        nib.save(nib.Nifti1Image(resampled.astype(data.dtype), affine), target)
        out.append(target)
    return out


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def measure_vtn(registrar, paths, folder, repeats):
    """Per-part seconds of ``Registrar.register_files`` and the network alone."""
    from vtn_tf.registration import inputs, network, pipeline

    parts_runs, network_seconds = [], []
    for k in range(repeats + 1):
        out = os.path.join(folder, f"out{k}")
        _, result, parts = registrar.register_files(paths[0], paths[1], out, [paths[2]], overwrite=True)
        if k:
            parts_runs.append(parts)
    fixed, moving, labels = pipeline.read_inputs(*paths[:2], [paths[2]])
    prepared = inputs.network_inputs(registrar.contract or network.default_contract(
        registrar.network_shape), fixed, moving, registrar.settings.alignment.init, lambda *_: None)
    for _ in range(repeats + 1):
        start = time.perf_counter()
        pair = (prepared[0][None, ..., None], prepared[1][None, ..., None])
        network.network_outputs(registrar.model, *pair, registrar.settings.network.passes)["flow"].numpy()
        network_seconds.append(time.perf_counter() - start)
    no_search = []
    searching = registrar.settings
    registrar.settings = dataclasses.replace(searching, alignment=dataclasses.replace(searching.alignment, steps=0))
    for _ in range(repeats + 1):
        result = registrar.register(fixed, moving, labels)
        no_search.append(sum(result.seconds[key] for key in ("preprocess", "network", "field", "resample")))
    registrar.settings = searching
    parts = {key: _median([run[key] for run in parts_runs]) for key in parts_runs[0]}
    return parts, _median(network_seconds[1:]), _median(no_search[1:])


def measure_batch(args, model, paths, folder, pairs=3, refine=0, compression=1):
    """Seconds per pair of ``vtn-register --pairs`` (one process, model loaded once), excluding start-up;
    ``refine``: refinement steps (``--set refine.steps``; 0: none); ``compression``: as
    ``--set output.compression`` (0: ``.nii``)."""
    from vtn_tf.registration import batch, pipeline
    from vtn_tf.registration.settings import RegistrationSettings

    csv_path = os.path.join(folder, "pairs.csv")
    with open(csv_path, "w") as stream:
        stream.write("fixed,moving,out,moving_labels\n")
        for k in range(pairs):
            stream.write(f"{paths[0]},{paths[1]},{os.path.join(folder, f'batch{k}')},{paths[2]}\n")
    settings = RegistrationSettings().with_overrides([f"refine.steps={refine}", f"output.compression={compression}"])
    registrar = pipeline.Registrar(model, settings, log=lambda *_: None)
    with open(os.devnull, "w") as quiet:
        batch.run(registrar, batch.read_pairs(csv_path)[:1], True, stream=quiet)  # warm-up
        start = time.perf_counter()
        batch.run(registrar, batch.read_pairs(csv_path), True, stream=quiet)
    return (time.perf_counter() - start) / pairs


def measure_cli(model, paths, folder):
    """Seconds of two fresh ``vtn-register`` processes sharing a new compiled-kernel cache:
    the first compiles every kernel (as with the cache off), the second reads them."""
    command = [sys.executable, "-m", "vtn_tf.cli.register", "--model", model, paths[0], paths[1],
               "--moving_labels", paths[2], "--out", os.path.join(folder, "cli"), "--overwrite", "--preset", "fast"]
    cache = tempfile.mkdtemp(dir=folder, prefix="xla-cache-")
    env = {key: value for key, value in os.environ.items() if key != "TF_XLA_FLAGS"}
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, env=dict(env, VTN_XLA_CACHE=cache))
        seconds.append(time.perf_counter() - start)
    return seconds


def measure_memory(model, paths, folder, extra=()):
    """Peak resident memory (GB) and seconds of one fresh ``vtn-register`` process."""
    command = [sys.executable, "-m", "vtn_tf.cli.register", "--model", model, paths[0], paths[1],
               "--moving_labels", paths[2], "--out", os.path.join(folder, "memory"), "--overwrite", "--preset", "fast",
               *extra]
    start = time.perf_counter()
    with open(os.path.join(folder, "memory.log"), "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"vtn-register failed ({process.returncode}): see {log.name}")
    return usage.ru_maxrss / 1e6, time.perf_counter() - start  # ru_maxrss: KiB on Linux


def measure_classical(name, paths):
    from vtn_tf.evaluation import baselines

    if baselines.unavailable(name):
        return None
    import nibabel as nib

    from vtn_tf.evaluation import native

    start = time.perf_counter()
    register = native._ants if name == "ants" else native._elastix
    register(paths[0], paths[1], paths[2], nib.load(paths[0]).affine)
    return time.perf_counter() - start


ANTS_PROCESS = """
import sys, ants
fixed, moving, labels, out = sys.argv[1:]
f, m = ants.image_read(fixed), ants.image_read(moving)
r = ants.registration(f, m, type_of_transform="SyN", outprefix=out + "/a_")
ants.image_write(r["warpedmovout"], out + "/warped.nii.gz")
w = ants.apply_transforms(f, ants.image_read(labels), r["fwdtransforms"], interpolator="nearestNeighbor")
ants.image_write(w, out + "/warped_labels.nii.gz")
"""
ELASTIX_PROCESS = """
import sys, itk
fixed, moving, labels, out = sys.argv[1:]
p = itk.ParameterObject.New()
p.AddParameterMap(p.GetDefaultParameterMap("affine"))
p.AddParameterMap(p.GetDefaultParameterMap("bspline"))
warped, t = itk.elastix_registration_method(itk.imread(fixed, itk.F), itk.imread(moving, itk.F),
                                            parameter_object=p, log_to_console=False, output_directory=out)
itk.imwrite(warped, out + "/warped.nii.gz")
for k in range(t.GetNumberOfParameterMaps()):
    t.SetParameter(k, "FinalBSplineInterpolationOrder", "0")
    t.SetParameter(k, "ResampleInterpolator", "FinalNearestNeighborInterpolator")
itk.imwrite(itk.transformix_filter(itk.imread(labels, itk.F), t), out + "/warped_labels.nii.gz")
"""


def _timed(command, env=None):
    """Wall-clock seconds of one process (raises when it fails)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, command[:4]))} ... failed: {done.stderr[-1500:]}")
    return time.perf_counter() - start, done.stdout


def hippocampus_pair():
    root = data_dir() / "hippocampus"
    return [str(root / "images" / "hippocampus_287.nii.gz"), str(root / "images" / "hippocampus_288.nii.gz"),
            str(root / "labels" / "hippocampus_288.nii.gz")]


def measure_call(model, paths, folder, preset, classical=True):
    """One call's parts (call_parts.py), its whole process (new and warm kernel cache), a
    served call, and the classical tools' whole processes; seconds in a dict."""
    import json

    cache = tempfile.mkdtemp(dir=folder, prefix="xla-cache-")
    env = dict({k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"}, VTN_XLA_CACHE=cache,
               XDG_RUNTIME_DIR=tempfile.mkdtemp(dir=folder, prefix="run-"))
    call = [sys.executable, "-m", "vtn_tf.cli.register", "--model", model, paths[0], paths[1],
            "--moving_labels", paths[2], "--overwrite", "--preset", preset, "--out"]
    seconds = {"cold": _timed(call + [os.path.join(folder, "cold")], env)[0],
               "warm": _timed(call + [os.path.join(folder, "warm")], env)[0]}
    start = time.time()
    _, output = _timed([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "call_parts.py"), model, *paths,
                        os.path.join(folder, "parts"), preset], env)
    parts = json.loads(next(line for line in output.splitlines() if line.startswith("PARTS "))[6:])
    stamps = parts["stamps"]
    seconds.update(start=stamps["began"] - start, imports=stamps["imported"] - stamps["began"],
                   model=stamps["loaded"] - stamps["imported"], first=parts["first"], second=parts["second"],
                   parts_process=stamps["pass0"] - start)
    server = subprocess.Popen([sys.executable, "-m", "vtn_tf.cli.register", "--model", model, "--serve"],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        server.stdout.readline()  # listening
        seconds["served_first"] = _timed(call + [os.path.join(folder, "served0")], env)[0]
        seconds["served"] = _timed(call + [os.path.join(folder, "served1")], env)[0]
    finally:
        server.terminate()
        server.wait()
    for name, script in (("ants", ANTS_PROCESS), ("elastix", ELASTIX_PROCESS)):
        from vtn_tf.evaluation import baselines

        if classical and not baselines.unavailable(name):
            out = tempfile.mkdtemp(dir=folder, prefix=name)
            seconds[name] = _timed([sys.executable, "-c", script, *paths[:3], out])[0]
    return seconds


def call_rows(results):
    """The call table: one column per pair set, one row per part."""
    def cell(values, key, part=None):
        value = values.get(key)
        if part is not None:
            value = None if value is None else value.get(part)
        return format_seconds(value) if value is not None else "n/a"

    names = list(results)
    rows = [["process start (Python, set-up)"] + [cell(results[n], "start") for n in names],
            ["import the registration code (TensorFlow)"] + [cell(results[n], "imports") for n in names],
            ["model: build + restore"] + [cell(results[n], "model") for n in names]]
    for part in ("read", "preprocess", "network", "field", "refine", "resample", "qc", "write", "total"):
        rows.append([f"first pair: {part}"] + [cell(results[n], "first", part) for n in names])
    for part in ("network", "refine", "total"):
        rows.append([f"same pair again (the work): {part}"] + [cell(results[n], "second", part) for n in names])
    rows.append(["tracing + compiling (first - again)"] + [
        format_seconds(results[n]["first"]["total"] - results[n]["second"]["total"]) for n in names])
    rows += [["one call: whole process, new kernel cache"] + [cell(results[n], "cold") for n in names],
             ["one call: whole process, kernel cache of an earlier call"] + [cell(results[n], "warm") for n in names],
             ["one call handed to `--serve` (client's wall clock)"] + [cell(results[n], "served") for n in names],
             ["  the first call a new server gets"] + [cell(results[n], "served_first") for n in names],
             ["ANTs SyN: whole process"] + [cell(results[n], "ants") for n in names],
             ["elastix: whole process"] + [cell(results[n], "elastix") for n in names]]
    for label, top, bottom in (("one call (warm cache) / the work", "warm", None),
                               ("served call / the work", "served", None),
                               ("ANTs SyN / one call (warm cache)", "ants", "warm"),
                               ("ANTs SyN / served call", "ants", "served")):
        row = [label]
        for n in names:
            value = results[n]
            lower = value["second"]["total"] if bottom is None else value.get(bottom)
            row.append(ratio(value[top], lower) if value.get(top) and lower else "n/a")
        rows.append(row)
    return ["part"] + names, rows


def main():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", help="run directory (default: an untrained ADD, width 0.5, 64^3)")
    parser.add_argument("--sizes", nargs="*", default=["lpba40", "256"], choices=["lpba40", "256", "512"],
                        help="pairs of the speed table (none: skip it)")
    parser.add_argument("--memory-sizes", nargs="*", default=["lpba40", "512"], choices=["lpba40", "256", "512"],
                        help="pairs of the peak-memory table (none: skip it)")
    parser.add_argument("--no-classical", action="store_true", help="skip ANTs SyN and elastix")
    parser.add_argument("--tables", nargs="*", default=["call", "speed", "memory"], choices=["call", "speed", "memory"],
                        help="which tables (default all)")
    parser.add_argument("--hippocampus-model", help="run directory for the call table's hippocampus pair "
                        "(default: runs/hippocampus-labels when it exists, else the pair is left out)")
    parser.add_argument("--preset", default="accurate", help="the call table's preset (default accurate)")
    parser.add_argument("--refine", type=int, default=60,
                        help="also time batch mode with --refine N (default 60, the make targets'; 0: skip)")
    args = parser.parse_args()
    if not (data_dir() / "lpba40").is_dir():
        print(f"LPBA40 not found under {data_dir()} (set VTN_DATA): nothing to measure")
        return
    setup_tensorflow(args)
    import nibabel as nib
    import numpy as np

    from vtn_tf.registration import pipeline

    repeats = args.repeats or (1 if args.quick else 3)
    print_machine(args)
    with tempfile.TemporaryDirectory() as folder:
        model = model_dir(args, folder)
        if "call" in args.tables:
            results = {}
            default = os.path.join(REPO_ROOT, "runs", "hippocampus-labels")
            hippocampus = args.hippocampus_model or (default if os.path.isdir(default) else None)
            if hippocampus and (data_dir() / "hippocampus").is_dir():
                results["hippocampus 64^3"] = measure_call(hippocampus, hippocampus_pair(), folder, args.preset,
                                                           not args.no_classical)
            results["LPBA40 160x192x160"] = measure_call(model, _brain_pair(folder, "lpba40"), folder, args.preset,
                                                         not args.no_classical)
            print_table(*call_rows(results))
        registrar = pipeline.Registrar(model, log=lambda *_: None)
        rows = []
        for size in ([] if "speed" not in args.tables else ["lpba40"] if args.quick else args.sizes):
            paths = _brain_pair(folder, size)
            shape = "x".join(map(str, nib.load(paths[0]).shape))
            parts, network, no_search = measure_vtn(registrar, paths, folder, repeats)
            core = sum(parts[key] for key in ("preprocess", "network", "field", "resample"))
            per_pair = measure_batch(args, model, paths, folder, 1 if args.quick else 3)
            uncompressed = measure_batch(args, model, paths, folder, 1 if args.quick else 3, compression=0)
            refined = None
            if args.refine:
                refined = measure_batch(args, model, paths, folder, 1 if args.quick else 3, args.refine)
            cli = measure_cli(model, paths, folder)
            classical = {} if args.no_classical or args.quick else {
                name: measure_classical(name, paths) for name in ("ants", "elastix")}
            rows.append([shape] + [format_seconds(parts[key]) for key in
                                   ("read", "preprocess", "network", "field", "resample", "write")]
                        + [format_seconds(core), format_seconds(network), ratio(core, network),
                           format_seconds(no_search), ratio(no_search, network),
                           format_seconds(per_pair), format_seconds(uncompressed),
                           format_seconds(refined) if refined else "n/a",
                           format_seconds(cli[0]), format_seconds(cli[1])]
                        + [format_seconds(classical[n]) if classical.get(n) else "n/a" for n in ("ants", "elastix")]
                        + [ratio(classical[n], per_pair) if classical.get(n) else "n/a" for n in ("ants", "elastix")]
                        + [ratio(classical["ants"], uncompressed) if classical.get("ants") else "n/a"]
                        + [ratio(classical["ants"], refined) if refined and classical.get("ants") else "n/a"])
        if rows:
            print_table(["fixed grid", "read", "preprocess", "network", "field", "resample", "write",
                         "register_volumes", "network alone", "register / network",
                         "register_volumes, alignment.steps=0", "(alignment.steps=0) / network", "batch, per pair",
                         "batch, .nii, per pair",
                         f"batch + refine {args.refine}, per pair", "one CLI call, cold cache",
                         "one CLI call, warm cache", "ANTs SyN", "elastix",
                         "ANTs / batch", "elastix / batch", "ANTs / (batch, .nii)",
                         "ANTs / (batch + refine)"], rows)
        memory_rows, steps = [], args.refine or 60
        for size in ([] if "memory" not in args.tables else ["lpba40"] if args.quick else args.memory_sizes):
            paths = _brain_pair(folder, size)
            shape = nib.load(paths[0]).shape
            input_gb = 4 * int(np.prod(shape)) / 1e9  # one image as float32 (about as read)
            plain, seconds = measure_memory(model, paths, folder)
            refined, refined_seconds = measure_memory(model, paths, folder, ["--set", f"refine.steps={steps}"])
            memory_rows.append(["x".join(map(str, shape)), f"{1000 * input_gb:.0f} MB", f"{plain:.2f} GB",
                                ratio(plain, input_gb), format_seconds(seconds), f"{refined:.2f} GB",
                                ratio(refined, input_gb), format_seconds(refined_seconds)])
        if memory_rows:
            print_table(["fixed grid (both images)", "one image, float32", "peak memory, one CLI call",
                         "peak / image", "seconds", f"peak, --refine {steps}", "peak / image",
                         "seconds"], memory_rows)


if __name__ == "__main__":
    main()
