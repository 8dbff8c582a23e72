"""Dice box plots of an evaluation (``vtn-evaluate``'s rows), as in the paper's figures.

Rows are dicts with ``fixed``, ``moving``, ``method``, ``dice`` (the mean over structures of
one pair) and ``dice_<label>`` per structure (the result CSV's columns, read back with
`vtn_tf.evaluation`'s ``read_results`` or as written). Two PNGs beside the CSV:

* ``<name>_dice_pairs.png``: per method, the distribution over pairs of the pair's mean Dice
  (a box: median, quartiles, whiskers at 1.5 IQR; every pair a dot);
* ``<name>_dice_structures.png``: per structure, one box per method side by side (the Dice of
  that structure over the pairs).

Matplotlib (the ``plot`` extra), Agg backend, imported only when called.
"""

import math
import os

import numpy as np

DPI = 80
STRUCTURES_PER_ROW = 28  # more structures go on further rows


def _values(rows, method, key):
    values = [float(row.get(key, math.nan)) for row in rows if row["method"] == method]
    return [v for v in values if math.isfinite(v)]


def _structures(rows):
    keys = [key for key in rows[0] if key.startswith("dice_") and key[5:].lstrip("-").isdigit()]
    return sorted(keys, key=lambda key: int(key[5:]))


def paths_for(csv_path):
    """``(pairs plot, structures plot)`` beside ``csv_path``."""
    stem = os.path.splitext(os.fspath(csv_path))[0]
    return stem + "_dice_pairs.png", stem + "_dice_structures.png"


def _save(fig, path):
    """Save a figure atomically (a temporary file renamed into place)."""
    temporary = path + ".partial.png"
    fig.savefig(temporary)
    os.replace(temporary, path)


def draw(rows, csv_path, title=""):
    """Draw both box plots beside ``csv_path``; returns the paths written (none without rows)."""
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    methods = list(dict.fromkeys(row["method"] for row in rows))
    colours = plt.get_cmap("tab10")(np.arange(len(methods)) % 10)
    pairs_path, structures_path = paths_for(csv_path)
    written = []

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods), 4.2), dpi=DPI)
    data = [_values(rows, method, "dice") for method in methods]
    boxes = ax.boxplot([d if d else [math.nan] for d in data], patch_artist=True, widths=0.6, showfliers=False)
    jitter = np.random.default_rng(0)
    for k, (values, box) in enumerate(zip(data, boxes["boxes"])):
        box.set_facecolor((*colours[k][:3], 0.35))
        ax.plot(k + 1 + jitter.uniform(-0.15, 0.15, len(values)), values, ".", color=colours[k], markersize=5)
    ax.set_xticks(range(1, len(methods) + 1), [f"{m}\n({len(d)} pairs)" for m, d in zip(methods, data)], fontsize=8)
    ax.set_ylabel("Dice per pair (mean over structures)")
    ax.set_title(title or "Dice per pair", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, pairs_path)
    plt.close(fig)
    written.append(pairs_path)

    structures = _structures(rows)
    if structures:
        lines = [structures[k:k + STRUCTURES_PER_ROW] for k in range(0, len(structures), STRUCTURES_PER_ROW)]
        longest = max(len(line) for line in lines)
        width = 0.8 / len(methods)
        fig, axes = plt.subplots(len(lines), 1, squeeze=False, dpi=DPI,
                                 figsize=(2.0 + 0.2 * longest * (len(methods) + 1), 1.0 + 3.0 * len(lines)))
        for ax, line in zip(axes[:, 0], lines):
            for k, method in enumerate(methods):
                data = [_values(rows, method, key) for key in line]
                positions = np.arange(len(line)) - 0.4 + width * (k + 0.5)
                boxes = ax.boxplot([d if d else [math.nan] for d in data], positions=positions,
                                   widths=width * 0.9, patch_artist=True, showfliers=False, manage_ticks=False)
                for box in boxes["boxes"]:
                    box.set_facecolor((*colours[k][:3], 0.6))
                ax.plot([], [], "s", color=colours[k], label=method)
            ax.set_xticks(range(len(line)), [key[5:] for key in line], fontsize=7, rotation=90)
            ax.set_xlim(-0.6, longest - 0.4)
            ax.set_ylabel("Dice over pairs")
            ax.grid(axis="y", alpha=0.3)
        axes[0, 0].set_title((title + ": " if title else "") + "Dice per structure", fontsize=10)
        axes[0, 0].legend(fontsize=8, ncol=len(methods), loc="lower right")
        axes[-1, 0].set_xlabel("structure (label id)")
        fig.tight_layout()
        _save(fig, structures_path)
        plt.close(fig)
        written.append(structures_path)
    return written
