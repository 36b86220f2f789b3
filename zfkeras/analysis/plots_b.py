"""Figures of the invariance, architecture, correspondence and probe analyses.

Matplotlib figures on the Agg canvas (`zfkeras.figures`), no pyplot; `save`
writes a PNG atomically.
"""

import numpy as np
from matplotlib.patches import Rectangle

from zfkeras import figures
from zfkeras.train import filter_grid

_COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)


def save(figure, path):
    """Writes `figure` to `path` as PNG (atomically)."""
    return figures.save_figure(figure, path)


def _image_axes(axes, image, title=None):
    axes.imshow(image, interpolation="nearest", cmap="gray" if image.ndim == 2 else None)
    axes.set_xticks([])
    axes.set_yticks([])
    if title:
        axes.set_title(title, fontsize=8)


def _mosaic(crops, columns, pad=2):
    """(rows, columns, h, w, C) uint8-range crops -> one RGB image with gaps."""
    rows = crops.shape[0]
    h, w = crops.shape[2:4]
    out = np.ones((rows * (h + pad) - pad, columns * (w + pad) - pad, 3), np.float32)
    for r in range(rows):
        for c in range(columns):
            image = figures.uint8_to_rgb(np.clip(crops[r, c], 0, 255))
            out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = image
    return out


# ---------------------------------------------------------------------------
# Fig. 5.


def invariance_figure(result, samples=4):
    """The 3x4 panel of Fig. 5 from an `invariance.InvarianceResult`.

    Rows: vertical translation, scale, rotation. Columns: example transformed
    images (the model's crops; rows of the mosaic are images, columns sample
    parameter values), Euclidean distance at layer 1 and at layer 7 from the
    untransformed image's features, and P(true class); one line per image.
    """
    from zfkeras.analysis.invariance import TRANSFORMS, UNITS

    figure = figures.new_figure(14.0, 9.0)
    grid = figure.add_gridspec(3, 4, width_ratios=[1.1, 1, 1, 1], wspace=0.3, hspace=0.45)
    titles = {
        "translation": "vertical translation",
        "scale": "scale",
        "rotation": "rotation",
    }
    legend = []
    for row, kind in enumerate(TRANSFORMS):
        values = np.asarray(result.parameters[kind])
        picks = np.unique(np.linspace(0, len(values) - 1, min(samples, len(values))).round())
        picks = picks.astype(int)
        crops = result.examples[kind][:, picks]
        axes = figure.add_subplot(grid[row, 0])
        _image_axes(axes, _mosaic(crops, len(picks)))
        axes.set_title(
            f"{titles[kind]}: " + ", ".join(f"{values[p]:.3g}" for p in picks), fontsize=8
        )
        axes.set_ylabel(titles[kind], fontsize=9)
        panels = (
            (result.distances[kind]["layer1"], f"layer 1 ({result.layers['layer1']}) distance"),
            (result.distances[kind]["layer7"], f"layer 7 ({result.layers['layer7']}) distance"),
            (result.probabilities[kind], "P(true class)"),
        )
        for column, (curves, label) in enumerate(panels, start=1):
            axes = figure.add_subplot(grid[row, column])
            for i, curve in enumerate(curves):
                line = axes.plot(
                    values,
                    curve,
                    marker=".",
                    markersize=3,
                    linewidth=1,
                    color=_COLOURS[i % len(_COLOURS)],
                )
                if row == 0 and column == 1:
                    legend.append((line[0], _short(result, i)))
            axes.set_xlabel(f"{titles[kind]} ({UNITS[kind]})", fontsize=8)
            axes.tick_params(labelsize=7)
            axes.grid(alpha=0.3)
            if row == 0:
                axes.set_title(label, fontsize=9)
            if column == 3:
                axes.set_ylim(-0.02, 1.02)
    figure.legend(
        [h for h, _ in legend],
        [t for _, t in legend],
        loc="lower center",
        ncol=min(len(legend), 5),
        fontsize=8,
        frameon=False,
    )
    note = f"borders filled: {result.fill}" + (f"; {result.note}" if result.note else "")
    figure.suptitle(f"Invariance (Zeiler & Fergus Fig. 5); {note}", fontsize=10)
    figure.subplots_adjust(left=0.04, right=0.99, top=0.91, bottom=0.1)
    return figure


def _short(result, i):
    name = result.names[i]
    label = int(result.labels[i])
    cls = result.class_names[label] if 0 <= label < len(result.class_names) else str(label)
    tag = "" if result.label_source[i] == "given" else " (predicted)"
    return f"{name}: {cls}{tag}"


# ---------------------------------------------------------------------------
# Fig. 6.


def filters_figure(summaries):
    """conv1 filters of each model side by side, their spectra and numbers (Fig. 6)."""
    from zfkeras.analysis.architecture import BAND_NAMES

    count = len(summaries)
    figure = figures.new_figure(max(8.0, 3.6 * count), 8.0)
    grid = figure.add_gridspec(2, count * 2, height_ratios=[1.35, 1], hspace=0.35, wspace=0.6)
    for index, summary in enumerate(summaries):
        axes = figure.add_subplot(grid[0, 2 * index : 2 * index + 2])
        conv1 = summary.record["conv1"]
        _image_axes(axes, filter_grid(summary.kernel))
        rms = summary.record["weight_rms"]["max_over_median"]
        title = (
            f"{summary.label}\nconv1 {conv1['kernel_size'][0]}x{conv1['kernel_size'][1]}"
            f"/{conv1['strides'][0]}, {conv1['filters']} filters; "
            f"dead {summary.record['dead']['count']}, "
            f"near-dead {summary.record['near_dead']['count']}"
        )
        if rms is not None:
            title += f"\nmax/median filter RMS {rms:.2g}"
        axes.set_title(title, fontsize=8)
    half = count
    spectrum = figure.add_subplot(grid[1, :half])
    for index, summary in enumerate(summaries):
        centres, power = summary.spectrum
        spectrum.plot(
            centres, power, marker=".", color=_COLOURS[index % len(_COLOURS)], label=summary.label
        )
    edges = summaries[0].record["bands"]["edges_cycles_per_pixel"]
    for edge in edges:
        spectrum.axvline(edge, color="gray", linestyle="--", linewidth=0.8)
    spectrum.set_xlabel("radial frequency (cycles / pixel)", fontsize=8)
    spectrum.set_ylabel("mean share of filter energy", fontsize=8)
    spectrum.set_title("conv1 radial power spectrum (bands: low | mid | high)", fontsize=9)
    spectrum.tick_params(labelsize=7)
    spectrum.legend(fontsize=7)
    spectrum.grid(alpha=0.3)

    bars = figure.add_subplot(grid[1, half:])
    width = 0.8 / count
    x = np.arange(len(BAND_NAMES))
    for index, summary in enumerate(summaries):
        fractions = [summary.record["bands"]["mean_fraction"][b] for b in BAND_NAMES]
        bars.bar(
            x + (index - (count - 1) / 2) * width,
            fractions,
            width,
            color=_COLOURS[index % len(_COLOURS)],
            label=summary.label,
        )
    bars.set_xticks(x)
    bars.set_xticklabels([f"{b}\n{r}" for b, r in zip(BAND_NAMES, _band_ranges(edges))], fontsize=8)
    bars.set_ylabel("mean fraction of filter energy", fontsize=8)
    bars.set_title("conv1 energy by frequency band", fontsize=9)
    bars.tick_params(labelsize=7)
    bars.grid(alpha=0.3, axis="y")
    figure.suptitle("First-layer filters (Zeiler & Fergus Fig. 6)", fontsize=10)
    figure.subplots_adjust(left=0.06, right=0.98, top=0.86, bottom=0.09)
    return figure


def _band_ranges(edges):
    low, high = edges
    return (f"< {low:.3g}", f"{low:.3g}-{high:.3g}", f">= {high:.3g}")


def layer2_figure(summaries):
    """The strongest conv2 projections of a few images, one row per model (Fig. 6(d), (e)).

    The first row shows each image as the first model sees it; each further
    row a model's projections, cropped to their receptive fields.
    """
    per_image = max(len(p) for s in summaries for p in s.layer2)
    images = max(len(s.layer2) for s in summaries)
    columns = images * per_image
    rows = len(summaries) + 1
    figure = figures.new_figure(1.0 + 0.9 * columns, 0.5 + 1.15 * rows)
    grid = figure.add_gridspec(
        rows, columns + 1, width_ratios=[1.6] + [1] * columns, wspace=0.08, hspace=0.3
    )
    names = summaries[0].record.get("images", [])
    for image, crop in enumerate(summaries[0].views):
        axes = figure.add_subplot(grid[0, 1 + image * per_image : 1 + (image + 1) * per_image])
        axes.imshow(figures.uint8_to_rgb(crop), interpolation="nearest")
        axes.axis("off")
        if image < len(names):
            axes.set_title(names[image], fontsize=7, pad=2)
    for row, summary in enumerate(summaries, start=1):
        name = figure.add_subplot(grid[row, 0])
        name.axis("off")
        name.text(0.95, 0.5, summary.label, fontsize=7, ha="right", va="center", wrap=True)
        for image, entries in enumerate(summary.layer2):
            for k, entry in enumerate(entries):
                axes = figure.add_subplot(grid[row, 1 + image * per_image + k])
                _image_axes(axes, figures.projection_to_rgb(entry["projection"]))
                axes.set_title(f"{entry['channel']}", fontsize=6, pad=1)
    figure.suptitle(
        "Layer 2: strongest conv2 maps per image, projected (receptive-field crops)", fontsize=9
    )
    figure.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.02)
    return figure


# ---------------------------------------------------------------------------
# Table 1.


def correspondence_figure(result, crops):
    """The images with their part boxes, and Delta per part against random occluders."""
    parts = result["parts"]
    count = len(crops)
    figure = figures.new_figure(max(7.0, 1.3 * count), 5.0)
    grid = figure.add_gridspec(2, count, height_ratios=[1, 1.8], hspace=0.15)
    for index in range(count):
        axes = figure.add_subplot(grid[0, index])
        _image_axes(axes, figures.uint8_to_rgb(crops[index]))
        for p, entry in enumerate(parts):
            y0, x0, y1, x1 = entry["boxes"][index]
            axes.add_patch(
                Rectangle(
                    (x0 - 0.5, y0 - 0.5),
                    x1 - x0,
                    y1 - y0,
                    fill=False,
                    edgecolor=_COLOURS[p % len(_COLOURS)],
                    linewidth=1.2,
                )
            )
    bars = figure.add_subplot(grid[1, :])
    x = np.arange(len(parts))
    series = (
        ("layer5", "part", "layer 5 ({})"),
        ("layer5", "random", "layer 5 random"),
        ("layer7", "part", "layer 7 ({})"),
        ("layer7", "random", "layer 7 random"),
    )
    width = 0.8 / len(series)
    colours = ("tab:blue", "lightsteelblue", "tab:orange", "navajowhite")
    for s, (layer, kind, label) in enumerate(series):
        means = [e[layer]["mean"] if kind == "part" else e["random"][layer]["mean"] for e in parts]
        stds = [e[layer]["std"] if kind == "part" else e["random"][layer]["std"] for e in parts]
        bars.bar(
            x + (s - 1.5) * width,
            means,
            width,
            yerr=stds,
            capsize=2,
            color=colours[s],
            label=label.format(result["layers"][layer]),
        )
    bars.set_xticks(x)
    bars.set_xticklabels([e["part"] for e in parts], fontsize=8)
    for tick, p in zip(bars.get_xticklabels(), range(len(parts))):
        tick.set_color(_COLOURS[p % len(_COLOURS)])
    bars.set_ylabel("Delta: mean sign-change fraction", fontsize=8)
    bars.tick_params(labelsize=7)
    bars.legend(fontsize=7, ncol=2)
    bars.grid(alpha=0.3, axis="y")
    figure.suptitle(
        "Correspondence (Zeiler & Fergus Table 1): lower than random = consistent parts",
        fontsize=10,
    )
    figure.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.08)
    return figure


# ---------------------------------------------------------------------------
# Tables 4-7.


def probe_figure(record):
    """Accuracy per layer (Table 7) and transfer accuracy against images per class."""
    panels = [k for k in ("layers", "transfer") if k in record]
    figure = figures.new_figure(5.0 * len(panels), 3.8)
    for index, key in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        if key == "layers":
            rows = record["layers"]
            axes.plot([r["layer"] for r in rows], [r["accuracy"] for r in rows], marker="o")
            axes.set_xticks([r["layer"] for r in rows])
            axes.set_xticklabels([f"{r['layer']}\n{r['name']}" for r in rows], fontsize=7)
            axes.set_xlabel("layer", fontsize=8)
            axes.set_title(
                f"linear {record['linear']['classifier']} on each layer "
                f"({record['pooling']}-pooled convs)",
                fontsize=9,
            )
        else:
            rows = record["transfer"]["results"]
            axes.errorbar(
                [r["per_class"] for r in rows],
                [r["mean"] for r in rows],
                yerr=[r["std"] for r in rows],
                marker="o",
                capsize=3,
            )
            axes.set_xlabel("training images per class", fontsize=8)
            axes.set_title(
                f"transfer: new softmax on frozen {record['transfer']['layer']} "
                f"({record['transfer']['repeats']} repeats)",
                fontsize=9,
            )
        axes.axhline(record["chance"], color="gray", linestyle="--", linewidth=0.8, label="chance")
        axes.set_ylim(0, 1.02)
        axes.set_ylabel(f"test accuracy ({record['dataset']} {record['test_split']})", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower right")
    figure.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.18, wspace=0.3)
    return figure
