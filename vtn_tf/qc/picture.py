"""The quality-control picture of one registration (``qc.png``).

Three orthogonal slices through the centre of the fixed image's foreground (rows: axial,
coronal, sagittal, shown in RAS orientation: the patient's right on the right, anterior and
superior up, as the letters at the panels' edges say), and in columns: the fixed image; the
moving image placed by its headers alone; the warped moving image; a checkerboard of fixed and
warped tiles; the Jacobian determinant of the field (diverging colours about 1, folding voxels
marked); and, with labels, the warped label outlines over the fixed image. A title gives the
verdict and the figures; a caption says what every colour means.

Numpy composes the image; Pillow (with matplotlib, the ``plot`` extra: its colour maps and its
DejaVu Sans font) writes the text and the PNG, imported only when called."""

import functools
import math
import os
import textwrap

import numpy as np

from vtn_tf.qc import figures as figures_lib

COLUMNS = ("fixed", "moving, headers alone", "warped moving", "checkerboard fixed | warped",
           "Jacobian determinant", "warped labels on fixed")
FOLDING_RGB = (0.0, 1.0, 0.0)  # folding voxels: bright green over the diverging map
PANEL_PIXELS = 200  # the longest side of a panel, in pixels of the picture
MIN_PANEL_PIXELS = 128  # smaller volumes are enlarged by a whole factor (the column titles fit above)
PAD = 6  # pixels between panels
CHECKER_TILES = 8
PNG_COMPRESSION = 3  # zlib level: half the time of the default 6, the file no larger (RGB, no alpha)


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


@functools.cache
def _diverging_table():
    """Matplotlib's RdBu_r as its 256 RGB entries (float32)."""
    from matplotlib import colormaps

    colour_map = colormaps["RdBu_r"].resampled(256)
    return colour_map(np.arange(256))[:, :3].astype(np.float32)


def _jacobian_colours(det):
    """RGB of Jacobian determinants: RdBu_r about 1 (0 blue, 1 white, 2 red: matplotlib's
    ``RdBu_r(TwoSlopeNorm(0, 1, 2)(det))``, entry ``floor(128 det)`` of its 256), folding green."""
    det = np.asarray(det, np.float32)
    entry = np.clip(np.floor(det * np.float32(128.0)), 0, 255).astype(np.intp)
    rgb = _diverging_table()[entry]
    rgb[det <= 0] = FOLDING_RGB
    return rgb


def _display(view, pixel_mm, display_mm, order):
    """A 2-D slice ``[horizontal, vertical]`` resampled to square display pixels of ``display_mm``."""
    from scipy import ndimage

    zoom = (pixel_mm[0] / display_mm, pixel_mm[1] / display_mm)
    if abs(zoom[0] - 1) < 1e-3 and abs(zoom[1] - 1) < 1e-3:
        return np.asarray(view)
    whole = [round(z) for z in zoom]
    if all(n >= 1 and abs(z - n) < 1e-3 for z, n in zip(zoom, whole)):  # enlarged: each voxel a block
        return np.asarray(view).repeat(whole[0], 0).repeat(whole[1], 1)
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


def jacobian_slices(flow, fixed_affine, centre_voxel):
    """The forward-difference Jacobian determinant on the three slices of the picture: axial,
    coronal and sagittal (as :func:`_slices` of the RAS-oriented volume) through the fixed
    voxel ``centre_voxel``, each from the two planes of ``flow`` it needs (the last plane of an
    axis repeats the one before it, which has no forward neighbour)."""
    flow = np.asarray(flow, np.float32)
    axes_order, _ = _orientation(fixed_affine)
    out = []
    for ras_axis in (2, 1, 0):  # axial fixes S, coronal A, sagittal R
        axis = axes_order[ras_axis]
        n = flow.shape[axis]
        first = max(min(int(centre_voxel[axis]), n - 2), 0)
        planes = np.take(flow, range(first, min(first + 2, n)), axis=axis)
        if planes.shape[axis] < 2:  # one voxel thick: no forward difference along it
            planes = np.concatenate([planes, planes], axis=axis)
        det = figures_lib.jacobian_determinant(planes)
        det = np.pad(det, [(0, 0) if a == axis else (0, 1) for a in range(3)], mode="edge")
        out.append(np.take(to_ras(det, fixed_affine), 0, axis=ras_axis))
    return tuple(out)


def _centre_voxel(mask, shape):
    """The centre of ``mask``'s bounding box (read on every second voxel), or of the grid."""
    sample = mask[::2, ::2, ::2]
    if not sample.any():
        return np.asarray(shape) // 2
    low = [2 * int(np.flatnonzero(sample.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    high = [2 * int(np.flatnonzero(sample.any(axis=tuple(b for b in range(3) if b != a)))[-1]) for a in range(3)]
    return (np.asarray(low) + np.asarray(high)) // 2


@functools.cache
def _font(size, bold=False):
    """Matplotlib's own DejaVu Sans at ``size`` pixels (Pillow's default font without it)."""
    import matplotlib
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)
    except OSError:
        return ImageFont.load_default(size)


@functools.lru_cache(maxsize=512)
def _lettering(words, size, bold=False, anchor="la"):
    """``words`` rendered once as a coverage mask (Pillow ``L`` image) and its offset from the
    anchor point: the same words on the next picture are pasted, not drawn again."""
    from PIL import Image, ImageDraw

    font = _font(size, bold)
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    multiline = "\n" in words
    box = (draw.multiline_textbbox if multiline else draw.textbbox)((0, 0), words, font=font, anchor=anchor)
    left, top = int(np.floor(box[0])), int(np.floor(box[1]))
    mask = Image.new("L", (max(int(np.ceil(box[2])) - left, 1), max(int(np.ceil(box[3])) - top, 1)), 0)
    (ImageDraw.Draw(mask).multiline_text if multiline else ImageDraw.Draw(mask).text)(
        (-left, -top), words, fill=255, font=font, anchor=anchor)
    return mask, left, top


def _rotated(words, size):
    """``words`` in black on white, turned a quarter to read upwards (a row's name)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = _font(size).getbbox(words)
    label = Image.new("RGB", (right - left + 2, bottom - top + 2), "white")
    ImageDraw.Draw(label).text((1 - left, 1 - top), words, fill="black", font=_font(size))
    return label.transpose(Image.Transpose.ROTATE_90)


def _colour_scale(width, height):
    """The Jacobian's colour scale, determinants 0 to 2 left to right: ``[height, width, 3]``."""
    return np.repeat(_jacobian_colours(np.linspace(0.0, 2.0, width))[None], height, 0)


def draw(path, fixed, moving_headers, warped, flow, fixed_affine, figures=None, flag_list=(),
         warped_labels=None, fixed_labels=None, name="", mask=None, dpi=72):
    """Draw the picture into ``path`` (a PNG file name or binary stream) and return ``path``:
    :func:`finish` of :func:`compose`.

    Args:
      fixed, moving_headers, warped: ``[X, Y, Z]`` images on the fixed grid (see
        `vtn_tf.qc.figures`).
      flow: ``[X, Y, Z, 3]`` displacement (voxels, pulling): the Jacobian determinant column,
        computed on the slices shown (:func:`jacobian_slices`).
      fixed_affine: 4x4 voxel -> RAS mm of the fixed grid (orientation and pixel aspect).
      figures, flag_list: :func:`vtn_tf.qc.figures.compute`'s dict and
        :func:`vtn_tf.qc.flags.flags`'s list, for the title.
      warped_labels, fixed_labels: optional ``[X, Y, Z]`` label maps on the fixed grid.
      name: the pair's name, first in the title.
      mask: the fixed image's foreground (`vtn_tf.qc.figures.foreground`) when already computed.

    The panels (:func:`mosaic`), the margins and the colour scale are composed into one RGB
    image; Pillow writes the text on it (matplotlib's DejaVu Sans) and the PNG: a tenth of the
    time of a matplotlib figure.
    """
    return finish(compose(fixed, moving_headers, warped, flow, fixed_affine, warped_labels, fixed_labels, mask),
                  path, figures, flag_list, name)


def compose(fixed, moving_headers, warped, flow, fixed_affine, warped_labels=None, fixed_labels=None, mask=None):
    """Everything of :func:`draw`'s picture but its two title lines, which need the figures
    (the two can be made side by side): ``(Pillow image, wrap)``, ``wrap(words, size)`` the
    line breaking of its width."""
    fixed = np.asarray(fixed, np.float32)
    mask = figures_lib.foreground(fixed) if mask is None else mask
    centre_voxel = _centre_voxel(mask, fixed.shape)
    axes_order, flips = _orientation(fixed_affine)
    centre = [int(fixed.shape[a] - 1 - centre_voxel[a]) if flip else int(centre_voxel[a])
              for a, flip in zip(axes_order, flips)]
    spacing = figures_lib.spacing_of(fixed_affine)[axes_order]
    extent = np.asarray(fixed.shape)[axes_order] * spacing
    display_mm = max(float(extent.max()) / PANEL_PIXELS, float(spacing.min()))  # no finer than the voxels,
    display_mm /= math.ceil(MIN_PANEL_PIXELS * display_mm / float(extent.max()))  # unless too small to read

    def slices(volume):
        return _slices(to_ras(volume, fixed_affine), centre) if volume is not None else (None,) * 3

    views = {"fixed": slices(fixed), "moving": slices(moving_headers), "warped": slices(warped),
             "jacobian": jacobian_slices(flow, fixed_affine, centre_voxel),
             "warped_labels": slices(warped_labels), "fixed_labels": slices(fixed_labels)}
    windows = (_window(views["fixed"]), _window(views["moving"] + views["warped"], nonzero=True))
    # (horizontal, vertical) spacing of each view: axial R-A, coronal R-S, sagittal A-S
    pixel = [(spacing[0], spacing[1]), (spacing[0], spacing[2]), (spacing[1], spacing[2])]
    canvas, cells, width, heights = mosaic(views, pixel, display_mm, windows)
    columns = COLUMNS[:canvas.shape[1] // width]

    top_px, bottom_px, left_px = 64, 62, 20  # title lines; colour scale and caption; view names
    height_px, width_px = canvas.shape[0] + top_px + bottom_px, canvas.shape[1] + left_px + 4
    image = np.ones((height_px, width_px, 3), np.float32)
    image[top_px:top_px + canvas.shape[0], left_px:left_px + canvas.shape[1]] = canvas
    bar_left, bar_top, bar_width = int(left_px + 4.1 * width), height_px - bottom_px + 16, int(0.8 * width)
    image[bar_top:bar_top + 8, bar_left:bar_left + bar_width] = _colour_scale(bar_width, 8)
    for k in range(5):  # ticks at 0, 0.5, 1, 1.5, 2
        image[bar_top + 8:bar_top + 10, bar_left + round(k * (bar_width - 1) / 4)] = 0.0

    from PIL import Image

    picture = Image.fromarray((image * 255 + 0.5).astype(np.uint8))

    def text(x, y, words, size, anchor="la", fill=(0, 0, 0), bold=False):  # x, y in pixels from the top left
        mask, left, top = _lettering(words, size, bold, anchor)
        picture.paste(fill, (int(round(x)) + left, int(round(y)) + top), mask)

    for c, title in enumerate(columns):
        text(left_px + c * width + width / 2, top_px - 4, title, 9, "md")
    names = ("axial", "coronal", "sagittal")
    positions = (f"S {centre[2]}", f"A {centre[1]}", f"R {centre[0]}")
    for r, letters in enumerate((("L", "R"), ("L", "R"), ("P", "A"))):
        label = _rotated(f"{names[r]} ({positions[r]})", 9)
        middle = top_px + sum(heights[:r]) + heights[r] // 2
        picture.paste(label, (left_px - 4 - label.width, middle - label.height // 2))
        _, _, left, top, cell_width, cell_height = cells[r * len(columns)]
        for x, letter, anchor in ((left + 2, letters[0], "ld"), (left + cell_width - 2, letters[1], "rd")):
            text(left_px + x, top_px + top + cell_height - 2, letter, 8, anchor, (255, 255, 0))
    for k in range(5):
        text(bar_left + k * (bar_width - 1) / 4, bar_top + 11, f"{0.5 * k:.1f}", 7, "ma")

    def wrapped(words, size):  # about as many characters as fit the width
        return textwrap.fill(words, max(40, int(width_px / (0.58 * size))))

    caption = ("Neurological view: the patient's right on the right (letters at the edges). Grey: "
               "each image scaled on its own slices. Checkerboard: fixed and warped tiles; edges should run on "
               "across tiles. Jacobian determinant: local volume change, white = 1 (none), red > 1 (expansion), "
               "blue < 1 (compression), green = folding (<= 0).")
    if views["warped_labels"][0] is not None:
        caption += (" Labels: coloured outlines = warped moving labels"
                    + ("; white = fixed labels" if fixed_labels is not None else "") + ".")
    text(4, height_px - 3, wrapped(caption, 7), 7, "ld")
    return picture, wrapped


def finish(composed, path, figures=None, flag_list=(), name=""):
    """Write the title lines (the verdict and :func:`summary_line` of ``figures``) on a
    :func:`compose`d picture and save it as PNG into ``path``; returns ``path``."""
    from PIL import ImageDraw

    picture, wrapped = composed
    pen = ImageDraw.Draw(picture)
    verdict = ("SUSPECT: " + "; ".join(f["reason"] for f in flag_list)) if flag_list else "no failure flag"
    pen.multiline_text((4, 4), wrapped((name + ": " if name else "") + verdict, 9), font=_font(9, True),
                       fill=(178, 34, 34) if flag_list else (0, 100, 0))
    pen.multiline_text((4, 38), wrapped(summary_line(figures or {}), 8), font=_font(8), fill="black")
    picture.save(path, format="PNG", compress_level=PNG_COMPRESSION)
    return path
