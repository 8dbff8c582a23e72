"""Shared helpers for the benchmark scripts: machine description, timing, memory, tables.

Benchmarks print markdown tables and compare side by side in one run (ratios); they never
assert wall-clock times. Timings are the median of ``--repeats`` runs after ``--warmup``
runs (the first call of a tf.function traces and compiles; warm-up keeps that out).

Peak memory:
* CPU: the process's peak resident set. Before each measured cell the kernel's high-water
  mark is reset (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0), so the number read back
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which then equals ``VmHWM``) is the peak
  *of that cell* plus whatever the process already held (TensorFlow itself, earlier
  models still alive). Where the reset is not permitted it is the running process peak.
* GPU: ``tf.config.experimental.get_memory_info('GPU:0')['peak']`` after
  ``reset_memory_stats``: the allocator's peak during the cell.
"""

import argparse
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/bench_x.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))


def base_parser(description):
    """Flags every script shares; scripts add their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--full", action="store_true", help="the full sweep (slow on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (median)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per cell first")
    parser.add_argument("--threads", type=int, default=0,
                        help="TF intra- and inter-op threads (0 = TensorFlow's default)")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="keras mixed_float16 policy (warps and losses stay float32)")
    return parser


def setup_tensorflow(args):
    """Import TensorFlow with the flags' thread and precision settings (before any op)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as vtn_tf does
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    if args.mixed_precision:
        import keras
        keras.mixed_precision.set_global_policy("mixed_float16")
    return tf


def data_dir():
    """Real data: ``$VTN_DATA`` or ``../shared/data`` relative to the repository root."""
    return pathlib.Path(os.environ.get("VTN_DATA", REPO_ROOT.parent / "shared" / "data"))


def has_gpu():
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def load_average():
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_machine(args, extra=()):
    """Describe the machine and the settings the numbers below were taken with."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"- machine: {cpu_model()}, {cores} cores usable ({os.cpu_count()} online), "
          f"Python {platform.python_version()}")
    print(f"- TensorFlow {tf.__version__}, Keras {keras.__version__}; "
          f"GPU: {', '.join(names) if names else 'none'}")
    print(f"- load average (1, 5, 15 min) at start: {load_average()} "
          "(other work on a shared machine makes the timings noisy)")
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (TF default)")
    print(f"- threads: {args.threads or 'TF default'}; TF_ENABLE_ONEDNN_OPTS={onednn}; "
          f"precision: {'mixed_float16' if args.mixed_precision else 'float32'}")
    for line in extra:
        print(f"- {line}")
    print()


def sync():
    """Wait until every queued device op has finished (GPU timings need it)."""
    import tensorflow as tf
    if has_gpu():
        tf.test.experimental.sync_devices()


def time_call(function, repeats, warmup, max_seconds=None):
    """Median seconds of ``function()`` over ``repeats`` runs after ``warmup`` runs.

    The function's result is synchronised (GPU) before the clock stops. With
    ``max_seconds``, stops repeating once that much time was spent (at least one run).
    Returns ``(median, times)``.
    """
    for _ in range(warmup):
        function()
        sync()
    times, start = [], time.perf_counter()
    for _ in range(max(1, repeats)):
        begin = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - begin)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times), times


_window_start_mb = 0.0


def current_memory_mb():
    """Memory in use now, MiB: the GPU allocator's, or this process's resident set."""
    import tensorflow as tf
    if has_gpu():
        return tf.config.experimental.get_memory_info("GPU:0")["current"] / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def reset_peak_memory():
    """Start a new peak-memory window (see the module notes)."""
    import tensorflow as tf
    global _window_start_mb
    _window_start_mb = current_memory_mb()
    if has_gpu():
        tf.config.experimental.reset_memory_stats("GPU:0")
        return
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
    except OSError:
        pass


def peak_memory_mb():
    """Peak memory since the last `reset_peak_memory`, in MiB (GPU allocator or CPU RSS)."""
    import tensorflow as tf
    if has_gpu():
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def peak_memory_text():
    """``"peak (+growth over the window's start)"`` in MiB, for a table cell."""
    peak = peak_memory_mb()
    return f"{peak:.0f} (+{max(0.0, peak - _window_start_mb):.0f})"


def memory_label():
    return "peak GPU MiB (+over start)" if has_gpu() else "peak RSS MiB (+over start)"


def is_out_of_memory(error):
    import tensorflow as tf
    return isinstance(error, (tf.errors.ResourceExhaustedError, MemoryError)) or \
        "out of memory" in str(error).lower() or "OOM" in str(error)


def graph_flops(concrete_function):
    """Floating-point operations of one call, counted from the traced graph's ops.

    Counts the convolutions and matrix products (2 per multiply-add): ``Conv3D`` as
    2 · |output| · kx·ky·kz·C_in, a transposed convolution (``Conv3DBackpropInputV2``) as
    2 · |its input| · kx·ky·kz·C_out, ``MatMul`` as 2·m·k·n. Everything else (warps, activations,
    adds) is left out; in VTN it is well under 1% of the arithmetic. Shapes must be static.
    """
    import numpy as np

    total = 0
    for op in concrete_function.graph.get_operations():
        if op.type == "Conv3D":
            kernel = op.inputs[1].shape.as_list()
            total += 2 * np.prod(op.outputs[0].shape.as_list()) * np.prod(kernel[:4])
        elif op.type == "Conv3DBackpropInputV2":
            kernel = op.inputs[1].shape.as_list()  # [kx, ky, kz, C_out, C_in]
            total += 2 * np.prod(op.inputs[2].shape.as_list()) * np.prod(kernel[:4])
        elif op.type == "MatMul":
            a, b = op.inputs[0].shape.as_list(), op.outputs[0].shape.as_list()
            k = a[0] if op.get_attr("transpose_a") else a[1]
            total += 2 * b[0] * b[1] * k
    return float(total)


def machine_gflops(repeats=5):
    """What this machine sustains, GFLOP/s: a 2048^2 float32 matmul, and a 3x3x3 convolution
    with 32 → 32 channels on a 64^3 volume (VTN's bread and butter), both through TensorFlow."""
    import tensorflow as tf

    a = tf.random.normal([2048, 2048])
    x = tf.random.normal([1, 64, 64, 64, 32])
    k = tf.random.normal([3, 3, 3, 32, 32])
    matmul = tf.function(lambda: tf.linalg.matmul(a, a))
    conv = tf.function(lambda: tf.nn.conv3d(x, k, [1, 1, 1, 1, 1], "SAME"))
    matmul_s, _ = time_call(matmul, repeats, 2)
    conv_s, _ = time_call(conv, repeats, 2)
    return 2 * 2048 ** 3 / matmul_s / 1e9, 2 * 64 ** 3 * 27 * 32 * 32 / conv_s / 1e9


def format_seconds(seconds):
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator <= 0:
        return "—"
    value = numerator / denominator
    return f"{value:.1f}×" if value >= 0.1 else f"{value:.2g}×"


def print_table(headers, rows):
    """A markdown table; cells are converted with str()."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print()
    sys.stdout.flush()


def finish():
    print(f"- load average at end: {load_average()}")


def model_dir(args, folder):
    """``--model``, or an untrained ADD (half width, 64³) saved under ``folder``: its timings are a
    trained model's, its accuracy is not."""
    if args.model:
        return args.model
    from vtn_tf.nn.model import VTN
    from vtn_tf.training import loop

    model = VTN("ADD", width=0.5, flow_head_initializer="small")
    model.build((None, 64, 64, 64, 1))
    return str(loop.save_model_dir(model, (64, 64, 64), os.path.join(folder, "untrained")))
