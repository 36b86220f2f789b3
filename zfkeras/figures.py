"""Figure helpers: the paper's figures as PNG files (matplotlib, Agg, no pyplot).

Figures are `matplotlib.figure.Figure` objects drawn with the Agg canvas
(no pyplot, no global backend state) and written atomically: to a temporary
file in the destination folder, then renamed into place.
"""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from zfkeras import fileio

_DPI = 100


def new_figure(width, height):
    """A Figure of `width` x `height` inches with an Agg canvas."""
    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path):
    """Writes `figure` as a PNG to `path` atomically (temp file + rename)."""
    with fileio.atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
    return path


def projection_to_rgb(projection):
    """A deconvnet projection as an image in [0, 1], zero shown as mid grey.

    The projection is scaled by its largest magnitude (signs kept, so a
    pixel pushing the activation up is light and one pushing it down is
    dark), the contrast normalisation used for the paper's figures up to
    the choice of a symmetric range.

    Args:
        projection: float (H, W, C), C = 1 or 3.

    Returns:
        float32 (H, W, 3) in [0, 1].
    """
    projection = np.asarray(projection, np.float32)
    scale = float(np.abs(projection).max())
    image = 0.5 + 0.5 * projection / scale if scale > 0 else np.full_like(projection, 0.5)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.clip(image, 0.0, 1.0)


def uint8_to_rgb(image):
    """uint8 (H, W, 1 or 3) -> float32 (H, W, 3) in [0, 1] for display."""
    image = np.asarray(image, np.float32) / 255.0
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def fit_square(image, size, fill=1.0):
    """Nearest-neighbour resize of (H, W, 3) into a size x size square, letterboxed.

    Nearest neighbour keeps single pixels visible (a conv1 patch is 7x7).
    """
    height, width = image.shape[:2]
    scale = size / max(height, width, 1)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    rows = np.minimum((np.arange(new_h) / scale).astype(int), height - 1)
    cols = np.minimum((np.arange(new_w) / scale).astype(int), width - 1)
    square = np.full((size, size, image.shape[2]), fill, np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    square[top : top + new_h, left : left + new_w] = image[rows][:, cols]
    return square


def _axes_at(figure, box, size):
    """Axes at pixel box (left, top, width, height) of a figure of pixel `size`."""
    left, top, width, height = box
    fig_w, fig_h = size
    axes = figure.add_axes(
        [left / fig_w, 1 - (top + height) / fig_h, width / fig_w, height / fig_h]
    )
    axes.axis("off")
    return axes


def deconv_figure(view, rows, title=""):
    """The figure of one image's projections, in the spirit of Fig. 2 / Fig. 7(c).

    The first row shows the input (the view the model sees); each further
    row one layer: for each of its feature maps the projection of its
    strongest activation, cropped to the unit's receptive field, beside the
    image patch it sees. Crops are scaled (nearest neighbour) to one cell
    size per figure, so small receptive fields are enlarged.

    Args:
        view: uint8 (H, W, C) model view of the image.
        rows: a list of (layer name, entries); each entry a dict with
            `projection` (float (h, w, C) crop), `patch` (uint8 (h, w, C)
            crop) and `label` (short text above the pair).
        title: text beside the input image.

    Returns:
        A matplotlib Figure (save it with `save_figure`).
    """
    sizes = [max(e["patch"].shape[:2]) for _, entries in rows for e in entries]
    cell = int(np.clip(max(sizes, default=64), 48, 112))
    margin, name_w, label_h, gap, pair_gap = 8, 22, 13, 6, 12
    pairs = max([1] + [len(entries) for _, entries in rows])
    pair_w = 2 * cell + 2
    width = margin * 2 + name_w + pairs * pair_w + (pairs - 1) * pair_gap
    width = max(width, margin * 2 + name_w + 2 * cell + 260)
    view_size = 2 * cell
    height = margin * 2 + view_size + len(rows) * (label_h + cell + gap)
    figure = new_figure(width / _DPI, height / _DPI)
    size = (width, height)
    axes = _axes_at(figure, (margin + name_w, margin, view_size, view_size), size)
    axes.imshow(fit_square(uint8_to_rgb(view), view_size), interpolation="nearest")
    if title:
        figure.text(
            (margin + name_w + view_size + 12) / width,
            1 - (margin + view_size / 2) / height,
            title,
            fontsize=9,
            va="center",
        )
    top = margin + view_size + gap
    for layer, entries in rows:
        figure.text(
            margin / width,
            1 - (top + label_h + cell / 2) / height,
            layer,
            fontsize=8,
            rotation=90,
            va="center",
        )
        for index, entry in enumerate(entries):
            left = margin + name_w + index * (pair_w + pair_gap)
            mosaic = np.full((cell, pair_w, 3), 1.0, np.float32)
            mosaic[:, :cell] = fit_square(projection_to_rgb(entry["projection"]), cell)
            mosaic[:, cell + 2 :] = fit_square(uint8_to_rgb(entry["patch"]), cell)
            axes = _axes_at(figure, (left, top + label_h, pair_w, cell), size)
            axes.imshow(mosaic, interpolation="nearest")
            if entry.get("label"):
                figure.text(
                    (left + 1) / width,
                    1 - (top + label_h - 2) / height,
                    entry["label"],
                    fontsize=7,
                    va="bottom",
                )
        top += label_h + cell + gap
    return figure
