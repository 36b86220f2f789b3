"""Figures of the top-9 (Fig. 2), evolution (Fig. 4) and occlusion (Fig. 7) analyses.

Grids of many small images are composed as one NumPy canvas and drawn with
a single `imshow` (hundreds of axes would be slow and heavy); labels are
text in canvas pixels. Projections use `zfkeras.figures.projection_to_rgb`
(zero is mid grey, each scaled by its own largest magnitude).
"""

import math

import numpy as np

from zfkeras import figures

_BACKGROUND = 1.0
_LABEL_PX = 14
_MARGIN_PX = 6
_GAP_PX = 6


def cell_size(dn, layer):
    """(height, width) in input pixels of the largest receptive field of `layer`."""
    height, width = (int(d) for d in dn.model.inputs[0].shape[1:3])
    shape = dn.map_shape(layer)
    if len(shape) != 3:
        return height, width
    ys, xs = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    y0, x0, y1, x1 = dn.receptive_field(layer, ys.reshape(-1), xs.reshape(-1))
    return int((y1 - y0).max()), int((x1 - x0).max())


def _offset(low, high, size, cell, full):
    """Where a receptive-field crop clipped by the image border sits in its cell."""
    spare = cell - size
    if spare <= 0:
        return 0
    if low == 0 and high < full:
        return spare  # clipped at the top / left: the missing part is before it
    if high == full and low > 0:
        return 0
    return spare // 2


def place(crop, box, cell, image_size, fill=0.5):
    """A receptive-field crop (float RGB) in a cell of the layer's full field size.

    Args:
        crop: float (h, w, 3) image of the crop.
        box: (y0, x0, y1, x1) of the crop in the image.
        cell: (height, width) of the layer's receptive field.
        image_size: (height, width) of the image.
        fill: value of the part of the field outside the image.
    """
    out = np.full((cell[0], cell[1], 3), fill, np.float32)
    if crop is None:
        return out
    h, w = crop.shape[:2]
    top = _offset(box[0], box[2], h, cell[0], image_size[0])
    left = _offset(box[1], box[3], w, cell[1], image_size[1])
    out[top : top + h, left : left + w] = crop[: cell[0] - top, : cell[1] - left]
    return out


def resize_nearest(image, height, width):
    """Nearest-neighbour resize of an (h, w, C) array."""
    rows = (np.arange(height) * image.shape[0] // height).clip(0, image.shape[0] - 1)
    cols = (np.arange(width) * image.shape[1] // width).clip(0, image.shape[1] - 1)
    return image[rows][:, cols]


def _scale_for(cell, min_px=28, max_px=96):
    scale = max(1, math.ceil(min_px / max(cell)))
    while scale > 1 and max(cell) * scale > max_px:
        scale -= 1
    return scale


def _draw_canvas(canvas, texts, title, dpi=100):
    """A figure showing `canvas` pixel for pixel, with (x, y, text, kwargs) labels."""
    height, width = canvas.shape[:2]
    title_px = (14 + 12 * title.count("\n")) + 10 if title else 0
    figure = figures.new_figure(width / dpi, (height + title_px) / dpi)
    axes = figure.add_axes((0, 0, 1, height / (height + title_px)))
    axes.imshow(np.clip(canvas, 0, 1), interpolation="nearest")
    axes.set_axis_off()
    for x, y, text, kwargs in texts:
        axes.text(x, y, text, **{"fontsize": 7, "va": "bottom", "ha": "left", **kwargs})
    if title:
        figure.text(0.01, 1 - 0.5 * title_px / (height + title_px), title, fontsize=8, va="center")
    return figure


def top_k_figure(winners, cell, title=""):
    """Fig. 2 for one layer: per map, its k projections beside their patches.

    Args:
        winners: a `zfkeras.analysis.topk.Winners`.
        cell: (height, width) of the layer's receptive field (`cell_size`).
        title: text above the grid.

    Returns:
        A matplotlib Figure.
    """
    count, k = winners.image_index.shape
    image_size = _image_size(winners)
    scale = _scale_for(cell)
    ch, cw = cell[0] * scale, cell[1] * scale
    side = math.ceil(math.sqrt(k))
    tile_h, tile_w = side * (ch + 1) + 1, side * (cw + 1) + 1
    block_w = 2 * tile_w + _GAP_PX
    block_h = _LABEL_PX + tile_h
    columns = max(1, min(count, math.ceil(math.sqrt(count * block_h / block_w))))
    rows = math.ceil(count / columns)
    canvas = np.full(
        (
            _MARGIN_PX + rows * (block_h + _MARGIN_PX),
            _MARGIN_PX + columns * (block_w + _MARGIN_PX),
            3,
        ),
        _BACKGROUND,
        np.float32,
    )
    texts = []
    for i in range(count):
        r, c = divmod(i, columns)
        top = _MARGIN_PX + r * (block_h + _MARGIN_PX)
        left = _MARGIN_PX + c * (block_w + _MARGIN_PX)
        texts.append((left, top + _LABEL_PX - 2, f"map {int(winners.channels[i])}", {}))
        for half in (0, 1):
            x0 = left + half * (tile_w + _GAP_PX)
            canvas[top + _LABEL_PX : top + _LABEL_PX + tile_h, x0 : x0 + tile_w] = 0.2
            for j in range(k):
                box = winners.boxes[i, j]
                if half == 0:
                    crop = winners.projections[i][j]
                    crop = None if crop is None else figures.projection_to_rgb(crop)
                else:
                    crop = winners.patches[i][j]
                    crop = None if crop is None else figures.uint8_to_rgb(crop)
                image = place(crop, box, cell, image_size)
                image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
                y, x = divmod(j, side)
                ty = top + _LABEL_PX + 1 + y * (ch + 1)
                tx = x0 + 1 + x * (cw + 1)
                canvas[ty : ty + ch, tx : tx + cw] = image
    return _draw_canvas(canvas, texts, title)


def _image_size(winners):
    boxes = winners.boxes[winners.image_index >= 0]
    if boxes.size == 0:
        return (1, 1)
    return int(boxes[:, 2].max()), int(boxes[:, 3].max())


def projection_grid(rows, column_labels, cell_px=56, title=""):
    """A grid of projections: one row per feature map, one column per label (Fig. 4).

    Args:
        rows: list of (row label, list of images float (h, w, 3) in [0, 1] or
            None), one image per column.
        column_labels: text above each column.
        cell_px: displayed size of each cell.
        title: text above the grid.

    Returns:
        A matplotlib Figure.
    """
    label_w = 72
    columns = len(column_labels)
    height = _LABEL_PX + _MARGIN_PX + len(rows) * (cell_px + 2) + _MARGIN_PX
    width = max(label_w + columns * (cell_px + 2) + _MARGIN_PX, 380)
    canvas = np.full((height, width, 3), _BACKGROUND, np.float32)
    texts = [
        (label_w + c * (cell_px + 2), _LABEL_PX, str(text), {})
        for c, text in enumerate(column_labels)
    ]
    for r, (label, images) in enumerate(rows):
        top = _LABEL_PX + _MARGIN_PX + r * (cell_px + 2)
        texts.append((_MARGIN_PX, top + cell_px // 2, label, {"va": "center"}))
        for c, image in enumerate(images):
            if image is None:
                continue
            left = label_w + c * (cell_px + 2)
            canvas[top : top + cell_px, left : left + cell_px] = grid_cell(image, cell_px)
    return _draw_canvas(canvas, texts, title)


def grid_cell(image, cell_px):
    """An image scaled (nearest) to fit a cell_px square, centred on white."""
    h, w = image.shape[:2]
    scale = cell_px / max(h, w)
    new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    out = np.full((cell_px, cell_px, 3), _BACKGROUND, np.float32)
    top, left = (cell_px - new_h) // 2, (cell_px - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resize_nearest(image, new_h, new_w)
    return out


def occlusion_figure(rows, class_names, size, title=""):
    """Fig. 7: per image (a) input, (b) layer-5 map activation, (c) its projection,
    (d) P(true class), (e) most probable class, as functions of the occluder's position.

    Args:
        rows: list of dicts with `view` (uint8 (H, W, C)), `activation`,
            `p_true` and `predicted` (ny, nx) maps, `tops` and `lefts` (the
            occluder's top-left corners), `projection` (float (H, W, C)),
            `box` (y0, x0, y1, x1) of the projected unit, `layer`, `channel`,
            `label` (true class), `p_unoccluded`, optional `label_given`
            (False: `label` is the unoccluded prediction).
        class_names: names of the classes.
        size: occluder side in pixels.
        title: figure title.

    Returns:
        A matplotlib Figure.
    """
    import matplotlib.patches as mpatches

    headings = (
        "(a) input",
        "(b) total activation",
        "(c) projection",
        "(d) p(true class)",
        "(e) most probable class",
    )
    figure = figures.new_figure(12.0, 2.2 * len(rows) + 0.6)
    top = 1 - 0.5 / figure.get_figheight()
    grid = figure.add_gridspec(
        len(rows), 5, wspace=0.45, hspace=0.4, left=0.02, right=0.92, top=top, bottom=0.04
    )
    palette = _palette(len(class_names))
    for r, row in enumerate(rows):
        view = figures.uint8_to_rgb(row["view"])
        height, width = view.shape[:2]
        half = size / 2
        extent = (
            row["lefts"][0] + half - _step(row["lefts"]) / 2,
            row["lefts"][-1] + half + _step(row["lefts"]) / 2,
            row["tops"][-1] + half + _step(row["tops"]) / 2,
            row["tops"][0] + half - _step(row["tops"]) / 2,
        )
        axes = [figure.add_subplot(grid[r, c]) for c in range(5)]
        for a in axes:
            a.set_xticks([])
            a.set_yticks([])
        axes[0].imshow(view, interpolation="nearest")
        axes[0].add_patch(
            mpatches.Rectangle((-0.5, -0.5), size, size, fill=True, color="0.5", alpha=0.8)
        )
        name = _name(class_names, row["label"])
        kind = "true" if row.get("label_given", True) else "predicted"
        axes[0].set_xlabel(f"{kind}: {name}\np = {row['p_unoccluded']:.2f}", fontsize=7)
        shown = axes[1].imshow(row["activation"], extent=extent, cmap="viridis")
        axes[1].set_xlim(-0.5, width - 0.5)
        axes[1].set_ylim(height - 0.5, -0.5)
        figure.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        axes[1].set_xlabel(f"{row['layer']} map {row['channel']}", fontsize=7)
        axes[2].imshow(figures.projection_to_rgb(row["projection"]), interpolation="nearest")
        y0, x0, y1, x1 = row["box"]
        axes[2].add_patch(
            mpatches.Rectangle(
                (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="black", lw=1
            )
        )
        shown = axes[3].imshow(row["p_true"], extent=extent, cmap="jet", vmin=0, vmax=1)
        axes[3].set_xlim(-0.5, width - 0.5)
        axes[3].set_ylim(height - 0.5, -0.5)
        figure.colorbar(shown, ax=axes[3], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
        predicted = row["predicted"]
        axes[4].imshow(palette[predicted], extent=extent, interpolation="nearest")
        axes[4].set_xlim(-0.5, width - 0.5)
        axes[4].set_ylim(height - 0.5, -0.5)
        present, counts = np.unique(predicted, return_counts=True)
        order = np.argsort(-counts)[:4]
        handles = [
            mpatches.Patch(color=palette[present[i]], label=_name(class_names, present[i]))
            for i in order
        ]
        axes[4].legend(
            handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False
        )
        if r == 0:
            for a, heading in zip(axes, headings):
                a.set_title(heading, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9, y=1 - 0.15 / figure.get_figheight(), va="top")
    return figure


def _step(values):
    return float(values[1] - values[0]) if len(values) > 1 else 1.0


def _name(class_names, index):
    index = int(index)
    return class_names[index] if 0 <= index < len(class_names) else str(index)


def _palette(count):
    from matplotlib import colormaps

    colours = colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
    return np.array([colours[i % 20] for i in range(max(count, 1))], np.float32)


def save(figure, path):
    """Writes a figure as PNG atomically (see `zfkeras.figures.save_figure`)."""
    return figures.save_figure(figure, path)
