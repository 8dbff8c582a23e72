"""The quality-control picture of one registration (``qc.png``).

Three orthogonal slices through the centre of the fixed image's foreground (rows: axial,
coronal, sagittal, shown in RAS orientation: the patient's right on the right, anterior and
superior up), and in columns: the fixed image; the moving image placed by its headers alone;
the warped moving image; a checkerboard of fixed and warped tiles; the Jacobian determinant
of the field (diverging colours about 1, folding voxels marked); and, with labels, the warped
label outlines over the fixed image. A title gives the verdict and the figures; a caption
says what every colour means.

Matplotlib (the ``plot`` extra) draws it with the Agg backend, imported only when called.
"""

import numpy as np

from vtn_tf.qc import figures as figures_lib

COLUMNS = ("fixed", "moving, headers alone", "warped moving", "checkerboard fixed | warped",
           "Jacobian determinant", "warped labels on fixed")
FOLDING_RGBA = (0.0, 1.0, 0.0, 1.0)  # folding voxels: bright green over the diverging map
CHECKER_TILES = 8


def _orientation(affine):
    """For each RAS axis, the array axis nearest to it and whether it runs backwards."""
    linear = np.asarray(affine, float)[:3, :3]
    axes, flips = [], []
    for world in range(3):
        column = int(np.argmax([abs(linear[world, a]) if a not in axes else -1 for a in range(3)]))
        axes.append(column)
        flips.append(linear[world, column] < 0)
    return axes, flips


def to_ras(volume, affine):
    """``volume`` with its axes permuted and flipped to the nearest RAS order (no resampling)."""
    axes, flips = _orientation(affine)
    out = np.transpose(np.asarray(volume), axes)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
    return out


def _slices(volume, centre):
    """Axial ``[R, A]``, coronal ``[R, S]`` and sagittal ``[A, S]`` slices through ``centre``."""
    i, j, k = centre
    return volume[:, :, k], volume[:, j, :], volume[i, :, :]


def _window(slices, nonzero=False):
    values = np.concatenate([np.asarray(s, np.float32).ravel() for s in slices])
    if nonzero and np.any(values != 0):
        values = values[values != 0]
    low, high = np.percentile(values, [1, 99.5])
    return float(low), float(high if high > low else low + 1.0)


def _scaled(image, window):
    low, high = window
    return np.clip((np.asarray(image, np.float32) - low) / (high - low), 0.0, 1.0)


def _checkerboard(a, b):
    tile = max(1, int(round(max(a.shape) / CHECKER_TILES)))
    i, j = np.meshgrid(np.arange(a.shape[0]) // tile, np.arange(a.shape[1]) // tile, indexing="ij")
    return np.where((i + j) % 2 == 0, a, b)


def _outlines(labels):
    """Pixels of a 2-D label map whose right or upper neighbour has another label (non-zero ones)."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    return edge & (labels != 0)


def _label_rgba(labels, colour=None):
    """RGBA outlines of a 2-D label map: one colour per id (tab20 by id) or the one ``colour``."""
    from matplotlib import colormaps

    edge = _outlines(labels)
    rgba = np.zeros(labels.shape + (4,), np.float32)
    if colour is not None:
        rgba[edge] = colour
    else:
        table = colormaps["tab20"](np.arange(20))
        rgba[edge] = table[np.asarray(labels)[edge].astype(np.int64) % 20]
    return rgba


def summary_line(figures):
    """The figures in one line (the picture's title, the printed summary)."""
    parts = []
    similarity = figures.get("similarity")
    if similarity:
        b, a = similarity["before"], similarity["after"]
        parts.append(f"local correlation {b['lcc']:.3f} -> {a['lcc']:.3f} (global {b['cc']:.3f} -> {a['cc']:.3f})")
    field = figures.get("field")
    if field:
        parts.append(f"folding {field['folding_percent']:.2f} %, Jacobian sd {field['jacobian_std']:.3f}")
        parts.append(f"largest displacement {field['largest_displacement_mm']:.1f} mm")
    affine = figures.get("affine")
    if affine:
        parts.append("affine rotation " + "/".join(f"{v:.1f}" for v in affine["rotation_degrees"])
                     + " deg, scales " + "/".join(f"{v:.2f}" for v in affine["scales"]))
    if figures.get("dice"):
        parts.append(f"Dice {figures['dice']['mean']:.3f}")
    if figures.get("inverse_consistency"):
        ic = figures["inverse_consistency"]
        parts.append(f"inverse consistency {ic['rms_mm']:.2f} mm RMS")
    return "; ".join(parts)


def draw(path, fixed, moving_headers, warped, jacobian, fixed_affine, figures=None, flag_list=(),
         warped_labels=None, fixed_labels=None, name="", dpi=72):
    """Draw the picture into ``path`` (PNG) and return ``path``.

    Args:
      fixed, moving_headers, warped: ``[X, Y, Z]`` images on the fixed grid (see
        `vtn_tf.qc.figures`).
      jacobian: ``[X-1, Y-1, Z-1]`` forward-difference determinant of the field (edge-padded here).
      fixed_affine: 4x4 voxel -> RAS mm of the fixed grid (orientation and pixel aspect).
      figures, flag_list: :func:`vtn_tf.qc.figures.compute`'s dict and
        :func:`vtn_tf.qc.flags.flags`'s list, for the title.
      warped_labels, fixed_labels: optional ``[X, Y, Z]`` label maps on the fixed grid.
      name: the pair's name, first in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colors
    from matplotlib import pyplot as plt

    fixed = np.asarray(fixed, np.float32)
    jacobian = np.pad(np.asarray(jacobian, np.float32), [(0, 1)] * 3, mode="edge")
    mask = figures_lib.foreground(fixed)
    index = np.argwhere(mask) if mask.any() else np.argwhere(np.ones_like(mask))
    centre_voxel = (index.min(0) + index.max(0)) // 2
    axes_order, flips = _orientation(fixed_affine)
    centre = [int(fixed.shape[a] - 1 - centre_voxel[a]) if flip else int(centre_voxel[a])
              for a, flip in zip(axes_order, flips)]
    spacing = figures_lib.spacing_of(fixed_affine)[axes_order]

    def views(volume):
        return _slices(to_ras(volume, fixed_affine), centre) if volume is not None else (None,) * 3

    rows = {"fixed": views(fixed), "moving": views(moving_headers), "warped": views(warped),
            "jacobian": views(jacobian), "warped_labels": views(warped_labels), "fixed_labels": views(fixed_labels)}
    window_fixed = _window(rows["fixed"])
    window_moving = _window(rows["moving"] + rows["warped"], nonzero=True)
    has_labels = warped_labels is not None
    columns = COLUMNS if has_labels else COLUMNS[:5]
    # (horizontal, vertical) spacing of each view: axial R-A, coronal R-S, sagittal A-S
    pixel = [(spacing[0], spacing[1]), (spacing[0], spacing[2]), (spacing[1], spacing[2])]
    view_names = ("axial", "coronal", "sagittal")
    positions = (f"S {centre[2]}", f"A {centre[1]}", f"R {centre[0]}")

    panel = 2.3
    fig, grid = plt.subplots(3, len(columns), figsize=(panel * len(columns), panel * 3 + 1.6), dpi=dpi,
                             squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.985, top=1 - 0.95 / (panel * 3 + 1.6), bottom=0.95 / (panel * 3 + 1.6),
                        wspace=0.04, hspace=0.12)
    jacobian_norm = colors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    jacobian_image = None
    for r in range(3):
        aspect = pixel[r][1] / pixel[r][0]

        def show(ax, image, **kwargs):
            image = np.swapaxes(np.asarray(image), 0, 1)  # rows up the vertical axis; RGBA stays last
            return ax.imshow(image, origin="lower", aspect=aspect, interpolation="nearest", **kwargs)

        f = _scaled(rows["fixed"][r], window_fixed)
        m = _scaled(rows["moving"][r], window_moving)
        w = _scaled(rows["warped"][r], window_moving)
        show(grid[r, 0], f, cmap="gray", vmin=0, vmax=1)
        show(grid[r, 1], m, cmap="gray", vmin=0, vmax=1)
        show(grid[r, 2], w, cmap="gray", vmin=0, vmax=1)
        show(grid[r, 3], _checkerboard(f, w), cmap="gray", vmin=0, vmax=1)
        det = rows["jacobian"][r]
        jacobian_image = show(grid[r, 4], det, cmap="RdBu_r", norm=jacobian_norm)
        folding = np.zeros(det.shape + (4,), np.float32)
        folding[det <= 0] = FOLDING_RGBA
        show(grid[r, 4], folding)
        if has_labels:
            show(grid[r, 5], f, cmap="gray", vmin=0, vmax=1)
            if fixed_labels is not None:
                show(grid[r, 5], _label_rgba(rows["fixed_labels"][r], (1.0, 1.0, 1.0, 0.9)))
            show(grid[r, 5], _label_rgba(rows["warped_labels"][r]))
        for c in range(len(columns)):
            ax = grid[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        grid[r, 0].set_ylabel(f"{view_names[r]} ({positions[r]})", fontsize=9)
        horizontal = "R" if r < 2 else "A"
        grid[r, 0].text(0.98, 0.03, horizontal, color="yellow", fontsize=8, ha="right", va="bottom",
                        transform=grid[r, 0].transAxes)
    box = grid[2, 4].get_position()  # a horizontal colour bar under the Jacobian column
    bar_axes = fig.add_axes([box.x0 + 0.1 * box.width, box.y0 - 0.035, 0.8 * box.width, 0.012])
    colourbar = fig.colorbar(jacobian_image, cax=bar_axes, orientation="horizontal")
    colourbar.set_ticks([0, 0.5, 1, 1.5, 2])
    colourbar.ax.tick_params(labelsize=7)

    figures = figures or {}
    verdict = ("SUSPECT: " + "; ".join(f["reason"] for f in flag_list)) if flag_list else "no failure flag"
    fig.text(0.01, 1 - 0.12 / (panel * 3 + 1.6), (name + ": " if name else "") + verdict, fontsize=9,
             color="firebrick" if flag_list else "darkgreen", va="top", wrap=True, fontweight="bold")
    fig.text(0.01, 1 - 0.5 / (panel * 3 + 1.6), summary_line(figures), fontsize=8, va="top")
    caption = ("Grey images: intensities of each image scaled on its own slices. Checkerboard: fixed and warped "
               "tiles side by side; edges should run on across tiles. Jacobian determinant: local volume "
               "change of the field, white = 1 (none), red > 1 (expansion), blue < 1 (compression), green = "
               "folding (<= 0).")
    if has_labels:
        caption += (" Labels: coloured outlines = warped moving labels"
                    + ("; white = fixed labels" if fixed_labels is not None else "") + ".")
    fig.text(0.01, 0.1 / (panel * 3 + 1.6), caption, fontsize=7, va="bottom", wrap=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
