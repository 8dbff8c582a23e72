"""Evaluation of registration methods on a prepared dataset (paper §V), and their comparison.

For every pair ``(fixed, moving)`` of a protocol, a method gives a flow ``[X, Y, Z, 3]`` (voxels
of the fixed grid, pulling; see :mod:`vtn_tf.core`) and the moving labels warped with nearest
neighbour. Each pair and method gives one row:

* ``fixed``, ``moving``, ``method``;
* ``dice``, ``iou``: Dice and Jaccard (the paper's Seg. IoU) averaged over the dataset's
  non-zero ``label_values`` (labels absent from both maps left out), and ``dice_<label>`` each;
* ``landmark_mm``, ``landmark_voxels``: mean distance between the fixed landmarks carried
  through the flow and the moving landmarks (NaN unless both subjects have landmarks);
* ``jacobian_std``: standard deviation over the volume of ``det(I + ∇flow)``;
* ``folding_percent``: percent of voxels with that determinant ≤ 0 (NaN where the method's
  field is not available);
* ``seconds``: wall clock per pair (VTN: after a warm-up call, the network forward with its
  flow composition plus the final label warp; ANTs / elastix: the registration call);
* ``device``: ``GPU`` or ``CPU`` (what VTN ran on; the classical tools always run on CPU).

Methods: ``vtn`` (a trained run directory), ``identity`` (no registration: the unregistered
baseline), ``ants`` and ``elastix`` (:mod:`vtn_tf.evaluation.baselines`, optional packages).
Protocols (:func:`vtn_tf.training.data.evaluation_pairs`): ``consecutive`` (sorted ids, pairs
(2k fixed, 2k+1 moving)), ``pairwise`` (all ordered pairs), ``atlas`` (atlas fixed, every other
subject of the split moving).
"""

import csv
import io as text_io
import math
import os
import time

import numpy as np
import tensorflow as tf

from vtn_tf import io
from vtn_tf.core import metrics, sampling
from vtn_tf.evaluation import baselines
from vtn_tf.training import data

METHODS = ("vtn", "identity") + baselines.METHODS
PROTOCOLS = ("consecutive", "pairwise", "atlas")
FIELD_COLUMNS = ("landmark_mm", "landmark_voxels", "jacobian_std", "folding_percent")


def scored_labels(label_values):
    """The label ids to score: the dataset's, without background 0."""
    return [int(v) for v in label_values if int(v) != 0]


def columns(label_values, extra=()):
    """CSV column names, in order, for a dataset with ``label_values`` (``extra`` after the
    field columns)."""
    return (["fixed", "moving", "method", "dice", "iou"]
            + [f"dice_{v}" for v in scored_labels(label_values)]
            + list(FIELD_COLUMNS) + list(extra) + ["seconds", "device"])


def pair_metrics(fixed_labels, warped_labels, label_values, flow, spacing=(1.0, 1.0, 1.0),
                 landmarks=None):
    """Scores of one registered pair.

    Args:
      fixed_labels, warped_labels: ``[X, Y, Z]`` integer label maps (warped = moving labels
        carried onto the fixed grid).
      label_values: label ids to score (0 is ignored).
      flow: ``[X, Y, Z, 3]`` float, voxels, pulling; None if the method gives no field.
      spacing: voxel size in mm of the grid.
      landmarks: ``(fixed_points, moving_points)``, each ``[N, 3]`` voxels, or None.
    Returns:
      dict with the metric columns of :func:`columns` (not fixed/moving/method/seconds/device).
    """
    values = scored_labels(label_values)
    per_label, dice = metrics.dice(fixed_labels, warped_labels, values)
    _, iou = metrics.jaccard(fixed_labels, warped_labels, values)
    row = {"dice": dice, "iou": iou}
    row.update({f"dice_{v}": per_label[v] for v in values})
    row.update({name: math.nan for name in FIELD_COLUMNS})
    if flow is not None:
        determinant = metrics.jacobian_determinant(tf.convert_to_tensor(flow, tf.float32)).numpy()
        row["jacobian_std"] = float(np.std(determinant))
        row["folding_percent"] = 100.0 * float(np.mean(determinant <= 0))
        if landmarks is not None:
            distance = metrics.landmark_distance(flow, *landmarks, spacing=spacing)
            row["landmark_mm"], row["landmark_voxels"] = distance["mean_mm"], distance["mean_voxels"]
    return row


# ---- methods: (fixed, moving, moving_labels, spacing) -> (warped_labels, flow, seconds) -----
def identity_method(fixed, moving, moving_labels, spacing):
    """No registration: the moving labels as they are, a zero flow, no time."""
    del fixed, moving, spacing
    return np.asarray(moving_labels, np.int32), np.zeros((*np.shape(moving_labels), 3), np.float32), 0.0


class VTNMethod:
    """A trained VTN as an evaluation method; the first call also does an untimed warm-up.

    Args:
      model: a built :class:`vtn_tf.nn.model.VTN`.
      passes: test-time recursion of the cascade (:meth:`vtn_tf.nn.model.VTN.register`; 1 = the paper).
    """

    def __init__(self, model, passes=1):
        self.model = model
        self.passes = int(passes)
        self.warmed_up = False

        @tf.function(reduce_retracing=True, autograph=False)
        def register(fixed, moving, moving_labels):
            flow = model.register(fixed, moving, self.passes)["flow"]
            return sampling.warp(moving_labels, flow, "nearest"), flow

        self._register = register

    @staticmethod
    def device():
        return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"

    def __call__(self, fixed, moving, moving_labels, spacing):
        del spacing
        inputs = (tf.constant(fixed[None, ..., None], tf.float32),
                  tf.constant(moving[None, ..., None], tf.float32),
                  tf.constant(moving_labels[None, ..., None], tf.int32))
        if not self.warmed_up:  # tracing and first-call allocations are not timed
            [t.numpy() for t in self._register(*inputs)]
            self.warmed_up = True
        start = time.perf_counter()
        warped_labels, flow = self._register(*inputs)
        warped_labels, flow = warped_labels.numpy(), flow.numpy()  # waits for the device
        seconds = time.perf_counter() - start
        return warped_labels[0, ..., 0], flow[0], seconds


def baseline_method(name):
    """ANTs or elastix as an evaluation method (see :mod:`vtn_tf.evaluation.baselines`)."""
    def register(fixed, moving, moving_labels, spacing):
        result = baselines.register(name, fixed, moving, moving_labels, spacing)
        return result["warped_labels"], result["flow"], result["seconds"]
    return register


# ---- running a protocol -------------------------------------------------------------------
def make_methods(names, model_dir=None, log=print, passes=1, precision="float32"):
    """Evaluation methods by name, in order; baselines whose package is missing are skipped.

    Args:
      names: from :func:`parse_methods`.
      model_dir: run directory of a trained VTN (needed for ``"vtn"``).
      log: told, in one line, about every skipped method.
      passes: test-time recursion passes of the VTN (1 = the paper).
      precision: the VTN network's compute type (`vtn_tf.training.loop.restore_model`).
    Returns:
      ``({name: callable}, image_shape or None)``, the model's grid for ``"vtn"``.
    Raises:
      ValueError / FileNotFoundError: ``vtn`` without a usable run directory; no method left.
    """
    methods, image_shape = {}, None
    for name in names:
        if name == "vtn":
            if not model_dir:
                raise io.InputError("method vtn needs --model (a run directory with model.json)")
            if not os.path.isdir(model_dir):
                raise FileNotFoundError(f"model {model_dir} does not exist (a run directory "
                                        "with model.json and checkpoints/ is required)")
            from vtn_tf.nn import checkpoints

            model, image_shape, _ = checkpoints.restore_model(model_dir, precision)
            methods[name] = VTNMethod(model, passes)
        elif name == "identity":
            methods[name] = identity_method
        else:
            reason = baselines.unavailable(name)
            if reason:
                log(reason)
                continue
            methods[name] = baseline_method(name)
    if not methods:
        raise io.InputError("no method left to run (every requested baseline was skipped)")
    return methods, image_shape


def parse_methods(text):
    """``"vtn,identity"`` -> ``["vtn", "identity"]``; unknown or repeated names raise ValueError."""
    names = [name.strip().lower() for name in (text or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise io.InputError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise io.InputError(f"method list {text!r} repeats a method")
    if not names:
        raise io.InputError("no method given")
    return names


def load_pairs(manifest, split="evaluation", protocol="consecutive", atlas=None, max_pairs=None):
    """Load the subjects of ``split`` and make the protocol's pairs.

    Returns:
      ``(dataset, pairs)``: :class:`vtn_tf.training.data.PreparedDataset` and ``[(fixed, moving)]``.
    Raises:
      io.InputError / ValueError: unknown protocol or split, no atlas, no pairs, a subject
        without labels.
    """
    if protocol not in PROTOCOLS:
        raise io.InputError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    if max_pairs is not None and int(max_pairs) < 1:
        raise io.InputError(f"max_pairs must be at least 1; got {max_pairs}")
    dataset = data.load_prepared(manifest, splits=(split,),
                                 extra_subjects=(atlas,) if atlas else ())
    ids = dataset.ids(split)
    if protocol == "atlas":
        atlas = atlas or dataset.atlas
        if atlas is None:
            raise io.InputError(f"the atlas protocol needs --atlas: manifest {dataset.manifest_path} "
                             "names no atlas")
    pairs = data.evaluation_pairs(ids, protocol, atlas=atlas, max_pairs=max_pairs)
    if not pairs:
        raise io.InputError(f"split {split!r} of manifest {dataset.manifest_path} gives no "
                         f"{protocol} pairs ({len(ids)} subjects)")
    unlabelled = sorted({i for pair in pairs for i in pair if dataset.labels.get(i) is None})
    if unlabelled:
        raise io.InputError(f"subject {unlabelled[0]} of manifest {dataset.manifest_path} has no "
                         "labels; evaluation needs a label map for every subject")
    return dataset, pairs


def _spacing(dataset, subject_id):
    entry = dataset.subjects[subject_id]
    if entry.get("spacing") is not None:
        return tuple(float(s) for s in entry["spacing"])
    return io.read_volume(entry["image"], role=f"image of subject {subject_id}").spacing


def _landmarks(dataset, fixed_id, moving_id):
    paths = [dataset.subjects[i].get("landmarks") for i in (fixed_id, moving_id)]
    if any(path is None for path in paths):
        return None
    points = [io.read_landmarks(path) for path in paths]
    if points[0].shape != points[1].shape:
        raise io.InputError(f"landmarks {paths[0]} hold {len(points[0])} points but {paths[1]} "
                            f"hold {len(points[1])}; they must correspond one to one")
    return points


def evaluate(dataset, pairs, methods, log=None):
    """Run every method on every pair and score it.

    Args:
      dataset: :class:`vtn_tf.training.data.PreparedDataset` holding every subject of ``pairs``.
      pairs: ``[(fixed_id, moving_id)]``.
      methods: ``{name: callable}``; each callable takes ``(fixed, moving, moving_labels,
        spacing)`` (``[X, Y, Z]`` arrays) and returns ``(warped_labels [X, Y, Z], flow
        [X, Y, Z, 3] or None, seconds)``.
      log: called with a progress line per pair (None: silent).
    Returns:
      list of row dicts (keys :func:`columns`), method by method, pairs in order.
    """
    rows = []
    for name, method in methods.items():
        device = method.device() if hasattr(method, "device") else "CPU"
        for k, (fixed_id, moving_id) in enumerate(pairs):
            spacing = _spacing(dataset, fixed_id)
            warped_labels, flow, seconds = method(dataset.images[fixed_id], dataset.images[moving_id],
                                                  dataset.labels[moving_id], spacing)
            row = {"fixed": fixed_id, "moving": moving_id, "method": name}
            row.update(pair_metrics(dataset.labels[fixed_id], warped_labels, dataset.label_values,
                                    flow, spacing, _landmarks(dataset, fixed_id, moving_id)))
            row.update({"seconds": float(seconds), "device": device})
            rows.append(row)
            if log:
                log(f"{name} {k + 1}/{len(pairs)} {fixed_id} <- {moving_id}: Dice {row['dice']:.4f}, "
                    f"IoU {row['iou']:.4f}, folding {row['folding_percent']:.3f}%, {seconds:.2f} s")
    return rows


def run_protocol(manifest, out, methods=("vtn", "identity"), model_dir=None, split="evaluation",
                 protocol="consecutive", atlas=None, max_pairs=None, overwrite=False, log=print,
                 passes=1, precision="float32"):
    """Everything ``vtn-evaluate`` does: check, load, register, score, write CSV + summary.

    Every check that can fail (output files, methods, model, manifest, pairs, grids) runs
    before the first registration. Returns ``(rows, summary_markdown)``.
    """
    check_output(out, overwrite)
    names = parse_methods(methods) if isinstance(methods, str) else parse_methods(",".join(methods))
    if "vtn" in names and not model_dir:
        raise io.InputError("method vtn needs --model (a run directory with model.json)")
    if model_dir and not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model {model_dir} does not exist (a run directory with "
                                "model.json and checkpoints/ is required)")
    dataset, pairs = load_pairs(manifest, split, protocol, atlas, max_pairs)
    callables, image_shape = make_methods(names, model_dir, log, passes, precision)
    if image_shape is not None and tuple(image_shape) != tuple(dataset.grid):
        grid = "x".join(map(str, dataset.grid))
        raise io.InputError(f"model {model_dir} was built for a {'x'.join(map(str, image_shape))} "
                         f"grid but manifest {dataset.manifest_path} has {grid}")
    rows = evaluate(dataset, pairs, callables, log)
    header = (f"# {dataset.name}: {split} split, {protocol} protocol, {len(pairs)} pairs\n\n"
              f"Dice / IoU averaged over labels {scored_labels(dataset.label_values)[:8]}"
              f"{' ...' if len(scored_labels(dataset.label_values)) > 8 else ''}; mean ± std over "
              f"pairs. VTN runs on: {VTNMethod.device()}"
              f"{f' in {precision}' if precision != 'float32' else ''}"
              f"{f' with {passes} test-time passes' if passes > 1 else ''}; ANTs / elastix on CPU "
              f"({baselines.THREADS} threads).")
    summary = write_results(rows, out, dataset.label_values, overwrite, header)
    return rows, summary


# ---- result files -------------------------------------------------------------------------
def summary_path(csv_path):
    """The markdown summary written next to a result CSV: ``name.csv`` -> ``name.md``."""
    root, extension = os.path.splitext(os.fspath(csv_path))
    return (root if extension.lower() == ".csv" else os.fspath(csv_path)) + ".md"


def check_output(csv_path, overwrite=False):
    """Raise io.InputError now, before any work, if the CSV or its summary cannot be written
    (:func:`vtn_tf.io.check_output_file`)."""
    for path in (csv_path, summary_path(csv_path)):
        io.check_output_file(path, overwrite)


def _format(value):
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_results(rows, csv_path, label_values, overwrite=False, header="", extra=()):
    """Write the rows as CSV and the summary as markdown next to it (atomic writes), and the
    Dice box plots beside them (:func:`plots_line`).

    Returns the markdown summary (``header`` first, then :func:`summary_table`).
    """
    check_output(csv_path, overwrite)
    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(label_values, extra), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _format(value) for key, value in row.items()})
    summary = (header + "\n\n" if header else "") + summary_table(rows) + "\n" + plots_line(rows, csv_path)
    io.atomic_write_text(csv_path, buffer.getvalue(), overwrite=overwrite)
    io.atomic_write_text(summary_path(csv_path), summary, overwrite=overwrite)
    return summary


def plots_line(rows, csv_path):
    """Draw the Dice box plots beside ``csv_path`` (`vtn_tf.qc.plots`: per pair and per structure,
    per method) and say where they are; without matplotlib (the ``plot`` extra), say so."""
    try:
        import matplotlib  # noqa: F401 - the plot extra
    except ImportError:
        return "\nDice box plots: matplotlib is not installed (pip install -e \".[plot]\")\n"
    from vtn_tf.qc import plots

    written = plots.draw(rows, os.fspath(csv_path))
    return ("\nDice box plots: " + ", ".join(os.path.basename(p) for p in written) + "\n") if written else ""


def read_results(path):
    """Rows of a result CSV, numbers as floats (``nan`` for missing values)."""
    if not os.path.isfile(path):
        raise io.InputError(f"results {path} do not exist")
    with open(path, encoding="utf-8", newline="") as stream:
        rows = list(csv.DictReader(stream))
    required = {"fixed", "moving", "method", "dice"}
    if not rows or not required <= set(rows[0]):
        raise io.InputError(f"results {path} are not a vtn-evaluate CSV (need columns "
                            f"{', '.join(sorted(required))} and at least one row)")
    for row in rows:
        for key, value in row.items():
            if key not in ("fixed", "moving", "method", "device"):
                row[key] = float(value) if value not in ("", None) else math.nan
    return rows


def _mean_std(values, digits):
    values = np.asarray([v for v in values if not math.isnan(v)], np.float64)
    if not values.size:
        return "n/a"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def summary_table(rows):
    """Markdown table: per method, mean ± std over pairs of every score, and the pair count."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    with_landmarks = any(not math.isnan(row.get("landmark_mm", math.nan)) for row in rows)
    head = ["method", "pairs", "Dice", "IoU"] + (["landmark mm"] if with_landmarks else []) \
        + ["folding %", "std Jacobian", "s / pair", "device"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        cells = [method, str(len(mine)), _mean_std([r["dice"] for r in mine], 4),
                 _mean_std([r["iou"] for r in mine], 4)]
        if with_landmarks:
            cells.append(_mean_std([r["landmark_mm"] for r in mine], 2))
        folding = _mean_std([r["folding_percent"] for r in mine], 3)
        if "folding_central_percent" in mine[0]:
            folding += f" (central {_mean_std([r['folding_central_percent'] for r in mine], 3)})"
        cells += [folding,
                  _mean_std([r["jacobian_std"] for r in mine], 3),
                  _mean_std([r["seconds"] for r in mine], 3),
                  ",".join(sorted({str(r.get("device", "")) for r in mine}))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- comparison ---------------------------------------------------------------------------
def select_method(rows, method=None, source="results"):
    """The rows of one method; ``method`` may be None when ``rows`` hold only one."""
    present = list(dict.fromkeys(row["method"] for row in rows))
    if method is None:
        if len(present) != 1:
            raise io.InputError(f"{source} hold methods {', '.join(present)}; name the one to "
                             "compare with --methods")
        method = present[0]
    mine = [row for row in rows if row["method"] == method]
    if not mine:
        raise io.InputError(f"{source} hold no rows of method {method!r} "
                         f"(they hold {', '.join(present)})")
    return mine


def compare(rows_a, rows_b, metric="dice"):
    """Paired Wilcoxon signed-rank test of a per-pair score between two sets of rows.

    Pairs are matched by ``(fixed, moving)``; pairs in only one set, or with a NaN score, are
    left out. Returns a dict: ``n``, ``statistic``, ``p_value`` (two-sided,
    ``scipy.stats.wilcoxon`` defaults; 1.0 when every difference is zero), ``median_difference``
    (a − b), ``mean_a``, ``mean_b``, ``only_in_a``, ``only_in_b``.
    """
    from scipy import stats

    scores_a = {(r["fixed"], r["moving"]): float(r[metric]) for r in rows_a}
    scores_b = {(r["fixed"], r["moving"]): float(r[metric]) for r in rows_b}
    common = [key for key in scores_a if key in scores_b
              and not (math.isnan(scores_a[key]) or math.isnan(scores_b[key]))]
    if not common:
        raise io.InputError("the two result sets share no (fixed, moving) pair with a score")
    a = np.array([scores_a[key] for key in common])
    b = np.array([scores_b[key] for key in common])
    difference = a - b
    if np.all(difference == 0):
        statistic, p_value = math.nan, 1.0
    else:
        result = stats.wilcoxon(a, b)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return {"metric": metric, "n": len(common), "statistic": statistic, "p_value": p_value,
            "median_difference": float(np.median(difference)), "mean_a": float(a.mean()),
            "mean_b": float(b.mean()), "only_in_a": len(set(scores_a) - set(scores_b)),
            "only_in_b": len(set(scores_b) - set(scores_a))}


def format_comparison(result, name_a, name_b):
    """Lines a person reads: the test, n, means, median difference."""
    return (f"Wilcoxon signed-rank test on per-pair mean {result['metric']}: {name_a} vs {name_b}\n"
            f"n = {result['n']} pairs (only in {name_a}: {result['only_in_a']}, "
            f"only in {name_b}: {result['only_in_b']})\n"
            f"mean {name_a} = {result['mean_a']:.4f}, mean {name_b} = {result['mean_b']:.4f}, "
            f"median difference ({name_a} - {name_b}) = {result['median_difference']:+.4f}\n"
            f"statistic = {result['statistic']:.6g}, p-value = {result['p_value']:.4g}")
