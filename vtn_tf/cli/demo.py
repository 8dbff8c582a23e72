"""The quickstart: prepare data, train briefly, evaluate held-out pairs, register one, draw.

``make demo`` (or ``python -m vtn_tf.cli.demo``). Uses the real hippocampus MRI crops
under ``VTN_DATA`` (default ../shared/data) when present; otherwise synthesises toy
volumes and says so. Minutes on 2 CPU cores. Writes ``outputs/demo/``.
"""

import os
import pathlib
import sys

from absl import app, flags

from vtn_tf.cli.common import setup, user_errors
from vtn_tf.io import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("data", os.environ.get("VTN_DATA", "../shared/data"), "folder of the real scans")
flags.DEFINE_string("prepared", "prepared", "where prepared datasets go")
flags.DEFINE_string("run_dir", "runs/demo", "training run directory (resumed if present)")
flags.DEFINE_string("out", "outputs/demo", "where the picture and the registration outputs go")
flags.DEFINE_integer("steps", 200, "training steps (about 1.3 s each on 2 cores)")
flags.DEFINE_integer("pairs", 10, "held-out pairs to evaluate")
flags.DEFINE_boolean("synthetic", False, "use synthetic toy data even when real data are present")
flags.DEFINE_boolean("verbose", False, "show tracebacks")

REPO = pathlib.Path(__file__).resolve().parents[2]


def prepare(data_root, prepared_root, synthetic):
    """A prepared dataset: real hippocampus crops if available, else synthetic toys."""
    from data_prep.__main__ import main as prepare_main

    hippocampus = pathlib.Path(data_root) / "hippocampus"
    if hippocampus.is_dir() and not synthetic:
        target = pathlib.Path(prepared_root) / "hippocampus"
        if not (target / "manifest.json").exists():
            print(f"preparing the real hippocampus MRI crops from {hippocampus}")
            _check(prepare_main(["--layout", "hippocampus", "--input", str(hippocampus), "--output", str(target),
                          "--no-crop", "--grid", "64", "64", "64", "--overwrite"]))
        return target / "manifest.json", "real Learn2Reg hippocampus MRI crops"
    from data_prep.toy import write_toy_folder

    print(f"no real data at {hippocampus}: using SYNTHETIC toy volumes instead")
    target = pathlib.Path(prepared_root) / "toy"
    if not (target / "manifest.json").exists():
        write_toy_folder(target.with_name("toy-raw"), subjects=24, overwrite=True)
        _check(prepare_main(["--layout", "folder", "--input", str(target.with_name("toy-raw")), "--modality", "MRI",
                      "--no-crop", "--grid", "64", "64", "64", "--output", str(target), "--overwrite"]))
    return target / "manifest.json", "SYNTHETIC toy volumes (not real scans)"


def _check(status):
    if status:
        raise InputError("data preparation failed (see the message above).")


def train(manifest, run_dir, steps):
    from vtn_tf.training import config as config_lib
    from vtn_tf.training import loop

    config = config_lib.load_config(REPO / "experiments" / "hippocampus-cpu.json", [
        f"data.manifest={manifest}", f"train.steps_per_epoch={steps}", "train.epochs=1",
        "train.halve_after_epoch=1", f"train.checkpoint_every={min(100, steps)}",
        f"train.validate_every={min(100, steps)}"])
    return loop.train(config, run_dir, verbose=2 if not sys.stdout.isatty() else 1)


def evaluate(manifest, run_dir, pairs):
    """Dice of the held-out pairs before and after registration (`vtn_tf.evaluation`)."""
    from vtn_tf.evaluation import protocols

    dataset, chosen = protocols.load_pairs(manifest, "evaluation", "consecutive", max_pairs=pairs)
    methods, _ = protocols.make_methods(["identity", "vtn"], run_dir)
    rows = protocols.evaluate(dataset, chosen, methods)
    before = {(r["fixed"], r["moving"]): r["dice"] for r in rows if r["method"] == "identity"}
    print("\n| fixed | moving | Dice before | Dice after | folding % |\n|---|---|---|---|---|")
    for row in (r for r in rows if r["method"] == "vtn"):
        print(f"| {row['fixed']} | {row['moving']} | {before[row['fixed'], row['moving']]:.3f} "
              f"| {row['dice']:.3f} | {row['folding_percent']:.3f} |")
    print("\n" + protocols.summary_table(rows) + "\n")
    return methods["vtn"].model, dataset, chosen[0]


def draw(model, dataset, pair, path):
    """fixed | moving | warped with label contours, and the deformation grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from vtn_tf.core import sampling

    fixed_id, moving_id = pair
    fixed, moving = dataset.images[fixed_id], dataset.images[moving_id]
    out = model({"fixed": fixed[None, ..., None], "moving": moving[None, ..., None]})
    flow = out["flow"].numpy()[0]
    warped = out["warped"].numpy()[0, ..., 0]
    warped_labels = sampling.warp(dataset.labels[moving_id][None, ..., None], out["flow"], "nearest").numpy()[0, ..., 0]
    z = int(np.argmax((dataset.labels[fixed_id] > 0).sum(axis=(0, 1))))
    panels = [("fixed", fixed, dataset.labels[fixed_id]), ("moving", moving, dataset.labels[moving_id]),
              ("warped moving", warped, warped_labels)]
    region = np.argwhere((dataset.labels[fixed_id] > 0) | (dataset.labels[moving_id] > 0))
    low = np.maximum(region.min(0) - 12, 0) if len(region) else np.zeros(3, int)
    high = np.minimum(region.max(0) + 13, fixed.shape) if len(region) else np.array(fixed.shape)
    view = (slice(low[0], high[0]), slice(low[1], high[1]))
    extent = (low[0] - 0.5, high[0] - 0.5, low[1] - 0.5, high[1] - 0.5)
    figure, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    for axis, (title, image, labels) in zip(axes, panels):
        axis.imshow(image[view + (z,)].T, cmap="gray", origin="lower", extent=extent)
        for value, colour in zip(dataset.label_values, ("tab:red", "tab:cyan", "tab:orange", "tab:green")):
            if (labels[view + (z,)] == value).any():
                axis.contour((labels[view + (z,)] == value).T, levels=[0.5], colors=colour, linewidths=1.2,
                             extent=extent)
        if title != "fixed":
            axis.contour((dataset.labels[fixed_id][view + (z,)] > 0).T, levels=[0.5], colors="yellow",
                         linewidths=0.8, linestyles="dashed", extent=extent)
        axis.set_title(title)
        axis.axis("off")
    axis = axes[3]
    axis.imshow(warped[view + (z,)].T, cmap="gray", origin="lower", alpha=0.5, extent=extent)
    grid_x, grid_y = np.meshgrid(np.arange(fixed.shape[0]), np.arange(fixed.shape[1]), indexing="ij")
    points_x, points_y = grid_x + flow[:, :, z, 0], grid_y + flow[:, :, z, 1]
    points_x, points_y = points_x[view], points_y[view]
    for k in range(0, points_x.shape[0], 2):
        axis.plot(points_x[k, :], points_y[k, :], color="tab:blue", linewidth=0.6)
    for k in range(0, points_x.shape[1], 2):
        axis.plot(points_x[:, k], points_y[:, k], color="tab:blue", linewidth=0.6)
    axis.set_xlim(extent[0], extent[1])
    axis.set_ylim(extent[2], extent[3])
    axis.set_title("deformation grid (x + flow)")
    axis.set_aspect("equal")
    axis.axis("off")
    figure.suptitle(f"VTN: {moving_id} registered to {fixed_id}, slice z={z} "
                    "(solid: each panel's own labels, fixed, moving and warped moving; "
                    "dashed yellow: the fixed labels' outline, for comparison)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    print(f"picture: {path}")


def main(argv):
    setup()
    del argv
    with user_errors("vtn-demo", FLAGS.verbose):
        manifest, description = prepare(FLAGS.data, FLAGS.prepared, FLAGS.synthetic)
        print(f"data: {description} ({manifest})")
        train(manifest, FLAGS.run_dir, FLAGS.steps)
        model, dataset, pair = evaluate(manifest, FLAGS.run_dir, FLAGS.pairs)
        out = pathlib.Path(FLAGS.out)
        draw(model, dataset, pair, out / "demo.png")
        register_pair(manifest, dataset, pair, out / "registration")


def register_pair(manifest, dataset, pair, out):
    """Register the pair's source NIfTI files with the command-line tool's library."""
    try:
        from vtn_tf.registration import pipeline
    except ImportError:
        return
    subjects = {s["id"]: s for s in __import__("json").loads(pathlib.Path(manifest).read_text())["subjects"]}
    fixed, moving = (subjects[i] for i in pair)
    root = pathlib.Path(manifest).parent
    print(f"registering {moving['id']} to {fixed['id']} with vtn-register into {out}")
    pipeline.register_files(FLAGS.run_dir, root / fixed["image"], root / moving["image"], out,
                                moving_labels=[root / moving["labels"]], overwrite=True)


def run():
    app.run(main)


if __name__ == "__main__":
    run()
