"""The quality-control picture of one registration (``qc.png``).

Three orthogonal slices through the centre of the fixed image's foreground (rows: axial,
coronal, sagittal, shown in RAS orientation: the patient's right on the right, anterior and
superior up, as the letters at the panels' edges say), and in columns: the fixed image; the
moving image placed by its headers alone; the warped moving image; a checkerboard of fixed and
warped tiles; the Jacobian determinant of the field (diverging colours about 1, folding voxels
marked); and, with labels, the warped label outlines over the fixed image. A title gives the
verdict and the figures; a caption says what every colour means.

Matplotlib (the ``plot`` extra) draws it with the Agg backend, imported only when called."""

import textwrap

import numpy as np

from vtn_tf.qc import figures as figures_lib

COLUMNS = ("fixed", "moving, headers alone", "warped moving", "checkerboard fixed | warped",
           "Jacobian determinant", "warped labels on fixed")
FOLDING_RGB = (0.0, 1.0, 0.0)  # folding voxels: bright green over the diverging map
PANEL_PIXELS = 200  # the longest side of a panel, in pixels of the picture
PAD = 6  # pixels between panels
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
    """Tiles of ``a`` and ``b`` (``[H, V, 3]``) alternating, :data:`CHECKER_TILES` across."""
    tile = max(1, int(round(max(a.shape[:2]) / CHECKER_TILES)))
    i, j = np.meshgrid(np.arange(a.shape[0]) // tile, np.arange(a.shape[1]) // tile, indexing="ij")
    return np.where(((i + j) % 2 == 0)[..., None], a, b)


def _outlines(labels):
    """Pixels of a 2-D label map whose right or upper neighbour has another label (non-zero ones)."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[1:] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:, 1:] |= labels[:, :-1] != labels[:, 1:]
    return edge & (labels != 0)


def _gray(image):
    return np.repeat(np.asarray(image, np.float32)[..., None], 3, -1)


def _with_outlines(rgb, labels, colour=None):
    """``rgb`` with the outlines of a 2-D label map drawn in: one colour per id (tab20 by id) or
    the one ``colour``."""
    from matplotlib import colormaps

    edge = _outlines(labels)
    out = rgb.copy()
    if colour is not None:
        out[edge] = colour
    else:
        table = colormaps["tab20"](np.arange(20))[:, :3]
        out[edge] = table[np.asarray(labels)[edge].astype(np.int64) % 20]
    return out


def _jacobian_colours(det):
    """RGB of Jacobian determinants: RdBu_r about 1 (0 blue, 1 white, 2 red), folding green."""
    from matplotlib import colormaps, colors

    rgb = colormaps["RdBu_r"](colors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)(det))[..., :3]
    rgb[np.asarray(det) <= 0] = FOLDING_RGB
    return rgb.astype(np.float32)


def _display(view, pixel_mm, display_mm, order):
    """A 2-D slice ``[horizontal, vertical]`` resampled to square display pixels of ``display_mm``."""
    from scipy import ndimage

    zoom = (pixel_mm[0] / display_mm, pixel_mm[1] / display_mm)
    if abs(zoom[0] - 1) < 1e-3 and abs(zoom[1] - 1) < 1e-3:
        return np.asarray(view)
    return ndimage.zoom(np.asarray(view), zoom, order=order, mode="nearest", grid_mode=True)


def _panels(views, r, pixel, display_mm, windows):
    """The RGB panels ``[horizontal, vertical, 3]`` of view ``r``, in column order."""
    def shown(key, order=1):
        return _display(views[key][r], pixel, display_mm, order)

    f = _gray(_scaled(shown("fixed"), windows[0]))
    w = _gray(_scaled(shown("warped"), windows[1]))
    panels = [f, _gray(_scaled(shown("moving"), windows[1])), w, _checkerboard(f, w),
              _jacobian_colours(shown("jacobian", 0))]
    if views["warped_labels"][r] is not None:
        overlay = f
        if views["fixed_labels"][r] is not None:
            overlay = _with_outlines(overlay, shown("fixed_labels", 0), (1.0, 1.0, 1.0))
        panels.append(_with_outlines(overlay, shown("warped_labels", 0)))
    return panels


def mosaic(views, pixel, display_mm, windows):
    """The panels of the three views in one RGB image ``[rows, columns, 3]``: a row of cells per
    view, a column per panel, each panel centred in its cell, superior (or anterior) up.

    Returns ``(image, cells, cell width, row heights)``; ``cells``: ``(view, column, left, top,
    width, height)`` of each panel in pixels of the image.
    """
    panels = [_panels(views, r, pixel[r], display_mm, windows) for r in range(3)]
    width = max(p[0].shape[0] for p in panels) + PAD
    heights = [p[0].shape[1] + PAD for p in panels]
    canvas = np.ones((sum(heights), width * len(panels[0]), 3), np.float32)
    cells, top = [], 0
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            image = np.swapaxes(panel, 0, 1)[::-1]  # [vertical from the top, horizontal, 3]
            left = c * width + (width - image.shape[1]) // 2
            canvas[top:top + image.shape[0], left:left + image.shape[1]] = image
            cells.append((r, c, left, top, image.shape[1], image.shape[0]))
        top += heights[r]
    return canvas, cells, width, heights


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
        before = figures["dice"].get("before")
        parts.append("Dice " + (f"{before:.3f} -> " if before is not None else "") + f"{figures['dice']['mean']:.3f}")
    if figures.get("inverse_consistency"):
        ic = figures["inverse_consistency"]
        parts.append(f"inverse consistency {ic['rms_mm']:.2f} mm RMS")
    return "; ".join(parts)


def draw(path, fixed, moving_headers, warped, jacobian, fixed_affine, figures=None, flag_list=(),
         warped_labels=None, fixed_labels=None, name="", dpi=72):
    """Draw the picture into ``path`` (a PNG file name or binary stream) and return ``path``.

    Args:
      fixed, moving_headers, warped: ``[X, Y, Z]`` images on the fixed grid (see
        `vtn_tf.qc.figures`).
      jacobian: ``[X-1, Y-1, Z-1]`` forward-difference determinant of the field (edge-padded here).
      fixed_affine: 4x4 voxel -> RAS mm of the fixed grid (orientation and pixel aspect).
      figures, flag_list: :func:`vtn_tf.qc.figures.compute`'s dict and
        :func:`vtn_tf.qc.flags.flags`'s list, for the title.
      warped_labels, fixed_labels: optional ``[X, Y, Z]`` label maps on the fixed grid.
      name: the pair's name, first in the title.

    The panels are composed into one image (:func:`mosaic`) drawn on one set of axes: a
    tenth of the time of a grid of matplotlib axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fixed = np.asarray(fixed, np.float32)
    jacobian = np.pad(np.asarray(jacobian, np.float32), [(0, 1)] * 3, mode="edge")
    mask = figures_lib.foreground(fixed)[::2, ::2, ::2]
    index = np.argwhere(mask) * 2 if mask.any() else np.zeros((1, 3), int) + np.asarray(fixed.shape) // 2
    centre_voxel = (index.min(0) + index.max(0)) // 2
    axes_order, flips = _orientation(fixed_affine)
    centre = [int(fixed.shape[a] - 1 - centre_voxel[a]) if flip else int(centre_voxel[a])
              for a, flip in zip(axes_order, flips)]
    spacing = figures_lib.spacing_of(fixed_affine)[axes_order]
    extent = np.asarray(fixed.shape)[axes_order] * spacing
    display_mm = max(float(extent.max()) / PANEL_PIXELS, float(spacing.min()))

    def slices(volume):
        return _slices(to_ras(volume, fixed_affine), centre) if volume is not None else (None,) * 3

    views = {"fixed": slices(fixed), "moving": slices(moving_headers), "warped": slices(warped),
             "jacobian": slices(jacobian), "warped_labels": slices(warped_labels),
             "fixed_labels": slices(fixed_labels)}
    windows = (_window(views["fixed"]), _window(views["moving"] + views["warped"], nonzero=True))
    # (horizontal, vertical) spacing of each view: axial R-A, coronal R-S, sagittal A-S
    pixel = [(spacing[0], spacing[1]), (spacing[0], spacing[2]), (spacing[1], spacing[2])]
    canvas, cells, width, heights = mosaic(views, pixel, display_mm, windows)
    columns = COLUMNS[:canvas.shape[1] // width]

    top_px, bottom_px, left_px = 64, 62, 20  # title lines; colour scale and caption; view names
    height_px, width_px = canvas.shape[0] + top_px + bottom_px, canvas.shape[1] + left_px + 4
    fig = plt.figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    ax = fig.add_axes([left_px / width_px, bottom_px / height_px, canvas.shape[1] / width_px,
                       canvas.shape[0] / height_px])
    ax.imshow(canvas, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for c, title in enumerate(columns):
        ax.text(c * width + width / 2, -4, title, ha="center", va="bottom", fontsize=9)
    names = ("axial", "coronal", "sagittal")
    positions = (f"S {centre[2]}", f"A {centre[1]}", f"R {centre[0]}")
    for r, letters in enumerate((("L", "R"), ("L", "R"), ("P", "A"))):
        ax.text(-4, sum(heights[:r]) + heights[r] / 2, f"{names[r]} ({positions[r]})", rotation=90,
                ha="right", va="center", fontsize=9)
        _, _, left, top, cell_width, cell_height = cells[r * len(columns)]
        for x, letter, align in ((left + 2, letters[0], "left"), (left + cell_width - 2, letters[1], "right")):
            ax.text(x, top + cell_height - 2, letter, color="yellow", fontsize=8, ha=align, va="bottom")
    bar = fig.add_axes([(left_px + 4.1 * width) / width_px, (bottom_px - 24) / height_px,
                        0.8 * width / width_px, 8 / height_px])  # the Jacobian's colour scale under its column
    bar.imshow(_jacobian_colours(np.linspace(0.0, 2.0, 256))[None], aspect="auto", extent=(0, 2, 0, 1))
    bar.set_yticks([])
    bar.set_xticks([0, 0.5, 1, 1.5, 2])
    bar.tick_params(labelsize=7, length=2, pad=1)

    def wrapped(text, size):  # matplotlib's own wrapping measures every word: slow
        return textwrap.fill(text, max(40, int(width_px / (0.58 * size))))

    verdict = ("SUSPECT: " + "; ".join(f["reason"] for f in flag_list)) if flag_list else "no failure flag"
    fig.text(4 / width_px, 1 - 4 / height_px, wrapped((name + ": " if name else "") + verdict, 9), fontsize=9,
             va="top", color="firebrick" if flag_list else "darkgreen", fontweight="bold")
    fig.text(4 / width_px, 1 - 38 / height_px, wrapped(summary_line(figures or {}), 8), fontsize=8, va="top")
    caption = ("Neurological view: the patient's right on the right (letters at the edges). Grey: "
               "each image scaled on its own slices. Checkerboard: fixed and warped tiles; edges should run on "
               "across tiles. Jacobian determinant: local volume change, white = 1 (none), red > 1 (expansion), "
               "blue < 1 (compression), green = folding (<= 0).")
    if views["warped_labels"][0] is not None:
        caption += (" Labels: coloured outlines = warped moving labels"
                    + ("; white = fixed labels" if fixed_labels is not None else "") + ".")
    fig.text(4 / width_px, 3 / height_px, wrapped(caption, 7), fontsize=7, va="bottom")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
