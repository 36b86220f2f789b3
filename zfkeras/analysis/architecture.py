"""Architecture comparison (Zeiler & Fergus Section 4.1, Fig. 6).

The paper chose ZFNet's 7x7 stride-2 first layer after looking at AlexNet's
11x11 stride-4 one: its layer-1 filters are "a mix of extremely high and low
frequency information, with little coverage of the mid frequencies", some are
dead, and its layer-2 features show aliasing from the large stride. Without
the filter renormalisation one layer-1 filter dominates (Fig. 6(a)).

This module puts numbers on those observations for any trained models:

Dead and near-dead first-layer filters are defined by what the filters do
on a sample of images, not by their weights: a ReLU unit that never fires
gets no gradient and is dead whatever its weights, while the weights alone
cannot tell a small useful filter from a useless one (a filter with large
weights and a very negative bias is dead; a renormalised one is alive).
- dead: the rectified conv1 output is zero at every position of every sample
  image;
- near-dead: not dead, but its mean rectified activation over the sample is
  below `near_dead_ratio` (default 0.1) times the median over the layer's
  filters: it contributes an order of magnitude less than a typical filter.
The data-free weight RMS of each filter is reported beside it (and the ratio
largest / median RMS, which shows one filter dominating, Fig. 6(a)).

Spatial frequencies: each filter (summed over its input channels) is
zero-padded to 64x64 (or more) and its 2-D DFT taken, which samples the
filter's continuous spectrum on the same frequency grid whatever the kernel
size, so 7x7 and 11x11 filters are comparable. The energy |F|^2 is split by
radial frequency r = sqrt(fx^2 + fy^2) in cycles per input pixel (0 to
sqrt(2)/2) into bands with edges 1/8 and 1/4:
- low: r < 1/8, below the Nyquist frequency of a stride-4 layer's output
  (AlexNet's conv1 samples its responses every 4 pixels, so anything above
  1/8 cycles/pixel aliases there);
- mid: 1/8 <= r < 1/4, up to the Nyquist frequency of a stride-2 output
  (ZFNet's conv1);
- high: r >= 1/4, above both.
The DC component (a filter's response to flat regions) counts as low. Each
filter's fractions sum to 1; the model's numbers are the mean over filters.
The control is the same numbers for filters of white noise of the model's
kernel shape (seeded): what a filter with no structure, such as an untrained
one, gives (mostly high, as most of the frequency plane is above 1/4).
"""

import dataclasses
import os

import numpy as np

from zfkeras import fileio, runs
from zfkeras.analysis import invariance
from zfkeras.errors import Error

BAND_NAMES = ("low", "mid", "high")
BAND_EDGES = (0.125, 0.25)
_MIN_DFT = 64


# ---------------------------------------------------------------------------
# Filter statistics (no data needed).


def _filters(kernel):
    kernel = np.asarray(kernel, np.float64)
    if kernel.ndim != 4:
        raise Error(f"a conv kernel must be (height, width, in, filters), not {kernel.shape}")
    return kernel


def filter_rms(kernel):
    """RMS of each filter (over its spatial and input-channel weights): float (N,)."""
    kernel = _filters(kernel)
    return np.sqrt(np.mean(np.square(kernel), axis=(0, 1, 2)))


def power_spectra(kernel, size=None):
    """The filters' power spectra on a common frequency grid.

    Args:
        kernel: (kh, kw, in, N) conv kernel.
        size: DFT size (default max(64, 4 * kernel size)).

    Returns:
        (power (N, size, size) summed over input channels, radius (size,
        size) in cycles per pixel).
    """
    kernel = _filters(kernel)
    size = size or max(_MIN_DFT, 4 * max(kernel.shape[:2]))
    if size < max(kernel.shape[:2]):
        raise Error(
            f"DFT size {size} is smaller than the {kernel.shape[0]}x{kernel.shape[1]} kernel"
        )
    spectrum = np.fft.fft2(kernel, s=(size, size), axes=(0, 1))
    power = np.sum(np.abs(spectrum) ** 2, axis=2)  # (size, size, N)
    fy = np.fft.fftfreq(size)
    radius = np.hypot(fy[:, None], fy[None, :])
    return np.moveaxis(power, -1, 0), radius


def band_energy(kernel, edges=BAND_EDGES, size=None):
    """Fraction of each filter's energy in the low, mid and high bands.

    Args:
        kernel: (kh, kw, in, N) conv kernel.
        edges: the two band edges in cycles per pixel (module docstring).
        size: DFT size (see `power_spectra`).

    Returns:
        float (N, 3), rows sum to 1 (NaN for an all-zero filter).
    """
    low, high = float(edges[0]), float(edges[1])
    if not 0 < low < high:
        raise Error(f"band edges must satisfy 0 < low < high, not {tuple(edges)}")
    power, radius = power_spectra(kernel, size)
    masks = [radius < low, (radius >= low) & (radius < high), radius >= high]
    energy = np.stack([power[:, m].sum(axis=1) for m in masks], axis=1)
    total = energy.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, energy / total, np.nan)


def white_noise_bands(shape, edges=BAND_EDGES, count=256, seed=0):
    """Mean band fractions of `count` white-noise filters of kernel `shape` (kh, kw, in).

    Returns:
        float (3,): the control for `band_energy`'s mean over a model's filters.
    """
    noise = np.random.default_rng(seed).standard_normal(tuple(shape[:3]) + (count,))
    return band_energy(noise, edges).mean(axis=0)


def radial_spectrum(kernel, bins=24, size=None):
    """Mean over filters of each filter's normalised power against radial frequency.

    Returns:
        (centres (bins,) in cycles per pixel, power (bins,) summing to 1).
    """
    power, radius = power_spectra(kernel, size)
    total = power.sum(axis=(1, 2), keepdims=True)
    power = np.divide(power, total, out=np.zeros_like(power), where=total > 0)
    edges = np.linspace(0.0, np.sqrt(0.5) + 1e-9, bins + 1)
    which = np.clip(np.digitize(radius, edges) - 1, 0, bins - 1)
    per_bin = np.stack([power[:, which == b].sum(axis=1) for b in range(bins)], axis=1)
    return (edges[:-1] + edges[1:]) / 2, per_bin.mean(axis=0)


# ---------------------------------------------------------------------------
# Dead filters (from activations).


def activity(activations):
    """Per feature map: fraction of positions where it fires, and its mean value.

    Args:
        activations: rectified maps (N, h, w, K) of a sample.

    Returns:
        (fires (K,), mean (K,)).
    """
    activations = np.asarray(activations, np.float64)
    if activations.ndim != 4:
        raise Error(f"activations must be (N, h, w, K), not {activations.shape}")
    flat = activations.reshape(-1, activations.shape[-1])
    return (flat > 0).mean(axis=0), np.maximum(flat, 0).mean(axis=0)


def dead_filters(activations, near_dead_ratio=0.1):
    """Dead and near-dead feature maps of one layer (module docstring).

    Args:
        activations: rectified maps (N, h, w, K) of a sample of images.
        near_dead_ratio: near-dead below this fraction of the median mean
            activation.

    Returns:
        dict of arrays (K,): fires, mean_activation, dead (bool), near_dead
        (bool, excludes dead).
    """
    fires, mean = activity(activations)
    dead = fires == 0
    median = float(np.median(mean))
    near = ~dead & (mean < near_dead_ratio * median)
    return {"fires": fires, "mean_activation": mean, "dead": dead, "near_dead": near}


# ---------------------------------------------------------------------------
# Comparing models.


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """One model's first layer, in numbers, and its layer-2 projections of `views`."""

    label: str
    checkpoint: str
    record: dict
    per_filter: dict
    kernel: np.ndarray
    spectrum: tuple
    layer2: list
    views: np.ndarray


def summarize_first_layer(run, sample_views, near_dead_ratio=0.1, edges=BAND_EDGES):
    """The numbers of Fig. 6 for one model's conv1.

    Args:
        run: a `runs.Run`.
        sample_views: uint8 (N, crop, crop, C) model views of sample images.
        near_dead_ratio: see `dead_filters`.
        edges: frequency band edges (cycles per pixel).

    Returns:
        (record dict, per-filter dict of arrays, kernel, radial spectrum).
    """
    from zfkeras import deconv

    model = run.model
    try:
        conv1 = model.get_layer("conv1")
    except ValueError:
        raise Error(f"{run.path}: the model has no conv1 layer") from None
    kernel = np.asarray(conv1.kernel.numpy())
    dn = deconv.Deconvnet(model)
    activations = dn.activations(run.model_input(sample_views), ["conv1"])["conv1"]
    dead = dead_filters(activations, near_dead_ratio)
    bands = band_energy(kernel, edges)
    rms = filter_rms(kernel)
    constraint = getattr(conv1, "kernel_constraint", None)
    stride = int(conv1.strides[0])
    count = kernel.shape[-1]
    dominant = np.bincount(np.nanargmax(np.nan_to_num(bands, nan=-1), axis=1), minlength=3)
    median_rms = float(np.median(rms))
    record = {
        "architecture": run.meta.get("architecture", model.name),
        "conv1": {
            "kernel_size": [int(v) for v in kernel.shape[:2]],
            "strides": [int(v) for v in conv1.strides],
            "filters": int(count),
            "input_channels": int(kernel.shape[2]),
            "filter_rms_radius": getattr(constraint, "max_rms", None),
            "output_nyquist_cycles_per_pixel": 0.5 / stride,
        },
        "sample_images": int(len(sample_views)),
        "dead": {"count": int(dead["dead"].sum()), "fraction": float(dead["dead"].mean())},
        "near_dead": {
            "count": int(dead["near_dead"].sum()),
            "fraction": float(dead["near_dead"].mean()),
            "ratio": near_dead_ratio,
        },
        "dead_or_near_dead_fraction": float((dead["dead"] | dead["near_dead"]).mean()),
        "bands": {
            "edges_cycles_per_pixel": [float(e) for e in edges],
            "mean_fraction": dict(zip(BAND_NAMES, (float(v) for v in np.nanmean(bands, 0)))),
            "dominant_count": dict(zip(BAND_NAMES, (int(v) for v in dominant))),
            "white_noise_mean_fraction": dict(
                zip(BAND_NAMES, (float(v) for v in white_noise_bands(kernel.shape, edges)))
            ),
        },
        "weight_rms": {
            "median": median_rms,
            "max": float(rms.max()),
            "max_over_median": float(rms.max() / median_rms) if median_rms > 0 else None,
        },
    }
    per_filter = {
        "rms": rms,
        "fires": dead["fires"],
        "mean_activation": dead["mean_activation"],
        "dead": dead["dead"],
        "near_dead": dead["near_dead"],
        **{name: bands[:, i] for i, name in enumerate(BAND_NAMES)},
    }
    return record, per_filter, kernel, radial_spectrum(kernel)


def layer2_projections(run, views, top=4, layer="conv2", batch_size=32):
    """The strongest `layer` maps of each image, projected to pixels (Fig. 6(d)/(e)).

    Returns:
        A list per image of dicts: channel, activation, projection (float
        crop to the receptive field), patch (uint8 crop).
    """
    from zfkeras import deconv

    dn = deconv.Deconvnet(run.model)
    if layer not in dn.layer_names:
        raise Error(f"{run.path}: unknown layer {layer!r}; valid: {', '.join(dn.layer_names)}")
    inputs = run.model_input(views)
    chosen = deconv.strongest_channels(dn.activations(inputs, [layer], batch_size)[layer], top)
    rows = np.repeat(np.arange(len(views)), chosen.shape[1])
    result = dn.project(inputs, rows, layer, chosen.reshape(-1), batch_size=batch_size)
    out = [[] for _ in range(len(views))]
    for r in range(len(rows)):
        y0, x0, y1, x1 = (int(v) for v in result.boxes[r])
        image = int(result.image_index[r])
        out[image].append(
            {
                "channel": int(result.channels[r]),
                "activation": float(result.values[r]),
                "projection": result.projections[r, y0:y1, x0:x1],
                "patch": views[image, y0:y1, x0:x1],
            }
        )
    return out


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """What `compare_models` does (tools/compare_filters.py).

    Attributes:
        checkpoints: two or more training work dirs or .keras files
            ('RUN_DIR@N': the run's snapshot of epoch N).
        output_dir: where the PNG, JSON and CSV files go.
        labels: a name per checkpoint (default: architecture and folder).
        images: image files for the layer-2 projections (else `dataset`).
        dataset, split, data_dir, manual_dir: the dataset of the sample
            images (default: the first run's).
        count: images shown with layer-2 projections.
        top: strongest conv2 maps projected per image.
        sample_size: dataset images on which dead filters are counted.
        near_dead_ratio: see `dead_filters`.
        batch_size: images per forward pass.
    """

    checkpoints: tuple
    output_dir: str
    labels: tuple = ()
    images: tuple = ()
    dataset: str = ""
    split: str = "test"
    data_dir: str = ""
    manual_dir: str = ""
    count: int = 4
    top: int = 4
    sample_size: int = 256
    near_dead_ratio: float = 0.1
    batch_size: int = 32


def load_checkpoint(path):
    """`runs.load_run` of a run dir or .keras file; 'RUN_DIR@N' loads snapshot epoch N."""
    base, _, epoch = path.rpartition("@")
    if base and epoch.isdigit() and os.path.isdir(base):
        return runs.load_run(base, snapshot=int(epoch))
    return runs.load_run(path)


def _labels(config, loaded):
    if config.labels:
        if len(config.labels) != len(config.checkpoints):
            raise Error(
                f"{len(config.labels)} labels given for {len(config.checkpoints)} checkpoints"
            )
        return tuple(config.labels)
    labels = []
    for path, run in zip(config.checkpoints, loaded):
        name = os.path.basename(os.path.normpath(path))
        labels.append(f"{run.meta.get('architecture', run.model.name)} ({name})")
    return tuple(labels)


def compare_models(config, progress=None):
    """Compares the first layers of several models and writes Fig. 6 with its numbers.

    Writes `filters.png` (conv1 filters side by side, their radial spectra,
    band fractions and dead-filter counts), `layer2.png` (strongest conv2
    projections of a few images per model), `compare_filters.json` and
    `compare_filters.csv` (one row per filter) into `config.output_dir`.

    Returns:
        dict with the file paths and the JSON record.
    """
    from zfkeras.analysis import plots_b

    if len(config.checkpoints) < 2:
        raise Error("give at least two checkpoints to compare")
    for name, value in (("count", config.count), ("top", config.top)):
        if value < 1:
            raise Error(f"{name} must be >= 1, not {value}")
    if config.sample_size < 1:
        raise Error(f"sample_size must be >= 1, not {config.sample_size}")
    if not config.near_dead_ratio >= 0:
        raise Error(f"near_dead_ratio must be >= 0, not {config.near_dead_ratio}")
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise Error(f"{config.output_dir}: exists and is not a directory")
    loaded = [load_checkpoint(path) for path in config.checkpoints]
    labels = _labels(config, loaded)
    dataset = config.dataset or loaded[0].meta.get("dataset", "")
    if not config.images and not dataset:
        raise Error("bare .keras files need --dataset or --images")

    summaries = []
    for label, path, run in zip(labels, config.checkpoints, loaded):
        shown = invariance.load_examples(
            run,
            config.images,
            (),
            dataset,
            config.split,
            config.count,
            config.data_dir or None,
            config.manual_dir or None,
            check_classes=False,
        )
        if config.images:
            sample = shown
        else:
            sample = invariance.load_examples(
                run,
                (),
                (),
                dataset,
                config.split,
                config.sample_size,
                config.data_dir or None,
                config.manual_dir or None,
                distinct_classes=False,
                check_classes=False,
            )
        pre = run.preprocessing
        record, per_filter, kernel, spectrum = summarize_first_layer(
            run, sample.crops(pre), config.near_dead_ratio
        )
        record.update(label=label, checkpoint=path, images=list(shown.names))
        projections = layer2_projections(run, shown.crops(pre), config.top)
        summaries.append(
            ModelSummary(
                label, path, record, per_filter, kernel, spectrum, projections, shown.crops(pre)
            )
        )
        if progress:
            progress(
                f"{label}: {record['dead']['count']} dead, {record['near_dead']['count']} "
                f"near-dead of {record['conv1']['filters']} conv1 filters"
            )

    fileio.ensure_dir(config.output_dir)
    paths = {
        "filters": os.path.join(config.output_dir, "filters.png"),
        "layer2": os.path.join(config.output_dir, "layer2.png"),
        "json": os.path.join(config.output_dir, "compare_filters.json"),
        "csv": os.path.join(config.output_dir, "compare_filters.csv"),
    }
    record = {
        "models": [s.record for s in summaries],
        "definitions": {
            "dead": "rectified conv1 output is zero at every position of every sample image",
            "near_dead": "not dead; mean rectified activation < near_dead_ratio x the median "
            "over the layer's filters",
            "bands": "energy of the 2-D DFT (zero-padded) by radial frequency in cycles/pixel: "
            "low < 1/8 <= mid < 1/4 <= high",
        },
    }
    fileio.write_json(paths["json"], record)
    fileio.write_text(paths["csv"], _csv(summaries))
    plots_b.save(plots_b.filters_figure(summaries), paths["filters"])
    plots_b.save(plots_b.layer2_figure(summaries), paths["layer2"])
    return {"paths": paths, "record": record}


def _csv(summaries):
    columns = ("rms", "fires", "mean_activation", "dead", "near_dead") + BAND_NAMES
    lines = ["model,filter," + ",".join(columns)]
    for summary in summaries:
        label = summary.label.replace('"', "'")
        for k in range(len(summary.per_filter["rms"])):
            values = []
            for column in columns:
                value = summary.per_filter[column][k]
                values.append(
                    str(int(value)) if column in ("dead", "near_dead") else f"{value:.6g}"
                )
            lines.append(f'"{label}",{k},' + ",".join(values))
    return "\n".join(lines) + "\n"
