"""Occlusion sensitivity (Zeiler & Fergus 2013, Section 4.2, Fig. 7).

A grey square is slid over the image, and for each position of it the
network is run on the occluded image. "Grey" is the mean image: zeros in the
model's input space (the mean is subtracted from every input). Recorded per
position: (b) the total activation (sum over positions) of the feature map
of a layer (layer 5 in the paper) that is strongest on the unoccluded image,
(d) the probability of the true class and (e) the most probable class. (c)
is that map's projection on the unoccluded image (its strongest unit).

Occluder positions: the square's top-left corner at 0, stride, 2 stride, ...
as long as the square fits, so a (H, W) input gives maps of
((H - size) // stride + 1, (W - size) // stride + 1); a stride below the
size makes neighbouring squares overlap, as in the paper. All occluded
copies of all images are run as batches.
"""

import csv
import dataclasses
import io
import os

import numpy as np
import tensorflow as tf

from zfkeras import data, deconv, fileio, images, runs
from zfkeras.analysis import topk
from zfkeras.errors import Error


def occluder_positions(height, width, size, stride):
    """Top-left corners (tops, lefts) of the occluder along each axis.

    Raises:
        Error: for a size or stride below 1, or a square bigger than the image.
    """
    if size < 1 or stride < 1:
        raise Error(f"occluder size and stride must be >= 1, not {size} and {stride}")
    if size > min(height, width):
        raise Error(f"occluder size {size} is bigger than the {height}x{width} input")
    return np.arange(0, height - size + 1, stride), np.arange(0, width - size + 1, stride)


@dataclasses.dataclass(frozen=True)
class OcclusionMaps:
    """Occlusion sensitivity of N images; maps are indexed (image, row, column).

    Attributes:
        tops, lefts: int (ny,), (nx,) the occluder's top-left corners.
        size, stride: the occluder's side and step in input pixels.
        layer: the layer of the feature map of (b).
        channels: int (N,) the map of each image (strongest unoccluded, or given).
        activation: float32 (N, ny, nx) total activation of that map.
        p_true: float32 (N, ny, nx) probability of the true class.
        predicted: int (N, ny, nx) most probable class.
        p_predicted: float32 (N, ny, nx) its probability.
        unoccluded_activation, unoccluded_p_true: float32 (N,) the same
            numbers without occluder.
        unoccluded_predicted: int (N,).
        labels: int (N,) the true classes.
    """

    tops: np.ndarray
    lefts: np.ndarray
    size: int
    stride: int
    layer: str
    channels: np.ndarray
    activation: np.ndarray
    p_true: np.ndarray
    predicted: np.ndarray
    p_predicted: np.ndarray
    unoccluded_activation: np.ndarray
    unoccluded_p_true: np.ndarray
    unoccluded_predicted: np.ndarray
    labels: np.ndarray


def occlusion_maps(
    model,
    inputs,
    labels,
    size,
    stride,
    layer,
    channels=None,
    occluder=None,
    batch_size=64,
    progress=None,
):
    """Occlusion sensitivity maps of a batch of model inputs (Fig. 7 (b), (d), (e)).

    Args:
        model: a model the deconvnet accepts (softmax output).
        inputs: float32 (N, H, W, C) model inputs.
        labels: int (N,) true classes.
        size: occluder side (pixels).
        stride: occluder step (pixels).
        layer: the layer whose feature map is summed (e.g. 'conv5').
        channels: optional int (N,) maps to sum; default: per image, the map
            with the largest activation on the unoccluded image.
        occluder: what fills the square: None for zeros (the mean, grey), or
            float32 (N, H, W, C) images whose pixels are used instead.
        batch_size: occluded copies per forward pass.
        progress: optional callable(done_batches, total_batches).

    Returns:
        An `OcclusionMaps`.
    """
    inputs = np.asarray(inputs, np.float32)
    labels = np.asarray(labels, np.int64).reshape(-1)
    if inputs.ndim != 4 or len(labels) != len(inputs):
        raise Error(f"need (N, H, W, C) inputs and N labels, not {inputs.shape}, {labels.shape}")
    count, height, width, _ = inputs.shape
    tops, lefts = occluder_positions(height, width, size, stride)
    occluder = np.zeros_like(inputs) if occluder is None else np.asarray(occluder, np.float32)
    if occluder.shape != inputs.shape:
        raise Error(f"occluder must have the inputs' shape {inputs.shape}, not {occluder.shape}")
    features = topk.feature_model(model, [layer], probabilities=True)
    classes = int(features.output["probabilities"].shape[-1])
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= classes:
        raise Error(f"labels must be class indices 0-{classes - 1}")

    @tf.function(reduce_retracing=True)
    def forward(batch):
        out = features(batch, training=False)
        feature = out[layer]
        totals = tf.reduce_sum(feature, axis=[1, 2]) if feature.shape.rank == 4 else feature
        peaks = tf.reduce_max(feature, axis=[1, 2]) if feature.shape.rank == 4 else feature
        return totals, peaks, out["probabilities"]

    ys = tf.range(height, dtype=tf.int64)[None, :, None]
    xs = tf.range(width, dtype=tf.int64)[None, None, :]

    @tf.function(reduce_retracing=True)
    def occluded(rows, top, left):
        inside = (ys >= top[:, None, None]) & (ys < top[:, None, None] + size)
        inside &= (xs >= left[:, None, None]) & (xs < left[:, None, None] + size)
        return tf.where(inside[..., None], tf.gather(occluder, rows), tf.gather(inputs, rows))

    base_totals, base_peaks, base_probs = (
        np.concatenate(parts)
        for parts in zip(
            *(
                [t.numpy() for t in forward(inputs[s : s + batch_size])]
                for s in range(0, count, batch_size)
            )
        )
    )
    if channels is None:
        channels = base_peaks.argmax(axis=1)
    channels = np.asarray(channels, np.int64).reshape(-1)
    if len(channels) != count:
        raise Error(f"need one channel per image ({count}), not {len(channels)}")

    rows, y, x = np.meshgrid(np.arange(count), tops, lefts, indexing="ij")
    rows, y, x = rows.reshape(-1), y.reshape(-1), x.reshape(-1)
    totals, probabilities = [], []
    total_batches = -(-len(rows) // batch_size)
    for start in range(0, len(rows), batch_size):
        part = slice(start, start + batch_size)
        batch = occluded(tf.constant(rows[part]), tf.constant(y[part]), tf.constant(x[part]))
        t, _, p = forward(batch)
        totals.append(t.numpy())
        probabilities.append(p.numpy())
        if progress is not None:
            progress(start // batch_size + 1, total_batches)
    totals = np.concatenate(totals)
    probabilities = np.concatenate(probabilities)
    grid = (count, len(tops), len(lefts))
    activation = totals[np.arange(len(rows)), channels[rows]].reshape(grid)
    p_true = probabilities[np.arange(len(rows)), labels[rows]].reshape(grid)
    predicted = probabilities.argmax(axis=1)
    p_predicted = probabilities[np.arange(len(rows)), predicted].reshape(grid)
    return OcclusionMaps(
        tops=tops,
        lefts=lefts,
        size=int(size),
        stride=int(stride),
        layer=layer,
        channels=channels,
        activation=activation.astype(np.float32),
        p_true=p_true.astype(np.float32),
        predicted=predicted.reshape(grid),
        p_predicted=p_predicted.astype(np.float32),
        unoccluded_activation=base_totals[np.arange(count), channels].astype(np.float32),
        unoccluded_p_true=base_probs[np.arange(count), labels].astype(np.float32),
        unoccluded_predicted=base_probs.argmax(axis=1),
        labels=labels,
    )


# ---------------------------------------------------------------------------
# The experiment on a trained run (tools/occlusion.py).


@dataclasses.dataclass(frozen=True)
class OcclusionConfig:
    """What `run_occlusion` does.

    Attributes:
        checkpoint: a training work dir or a .keras file.
        output_dir: where occlusion.png, .json and .csv go.
        images: image files; if empty, examples of the dataset split.
        labels: true class (name or index) of each image file; default: the
            model's prediction on the unoccluded image.
        dataset, split, data_dir, manual_dir: the data (default: the run's
            dataset and data_dir, the test split).
        indices: example indices of the split (default: the first
            `num_images`).
        num_images: examples used when `indices` is empty.
        layer: layer of the map (default: the last conv layer, "layer 5").
        size: occluder side in input pixels (0: a quarter of the input).
        stride: occluder step (0: half the size); must be below the size.
        batch_size: occluded copies per forward pass.
    """

    checkpoint: str
    output_dir: str
    images: tuple = ()
    labels: tuple = ()
    dataset: str = ""
    split: str = "test"
    data_dir: str = ""
    manual_dir: str = ""
    indices: tuple = ()
    num_images: int = 4
    layer: str = ""
    size: int = 0
    stride: int = 0
    batch_size: int = 64


def _inputs(config, run, classes):
    """(views, labels or None, names, class names) of the chosen images."""
    class_names = tuple(run.class_names)
    if len(class_names) != classes:
        class_names = tuple(str(i) for i in range(classes))
    if config.images:
        if config.labels and len(config.labels) != len(config.images):
            raise Error(
                f"give one label per image ({len(config.images)}), not {len(config.labels)}"
            )
        views = np.stack(
            [data.eval_view(images.read_image(path), run.preprocessing) for path in config.images]
        )
        labels = None
        if config.labels:
            labels = [
                data.class_index(label, class_names, path)
                for label, path in zip(config.labels, config.images)
            ]
        return views, labels, [os.path.basename(p) for p in config.images], class_names
    if config.labels:
        raise Error("labels are only for image files; dataset examples have their own")
    raw, info, _ = topk.load_dataset(
        run, config.dataset, config.split, config.data_dir, config.manual_dir
    )
    if info.num_classes != classes:
        raise Error(
            f"{config.checkpoint}: model has {classes} classes, dataset {info.name!r} has "
            f"{info.num_classes}"
        )
    indices = np.asarray(config.indices or range(config.num_images), np.int64)
    if indices.size == 0 or indices.min() < 0:
        raise Error("indices must be non-negative example numbers")
    try:
        views, labels = topk.fetch_views(raw, run.preprocessing, indices)
    except Error:
        raise Error(
            f"split {config.split!r} has fewer than {int(indices.max()) + 1} examples"
        ) from None
    names = [f"{config.split}[{int(i)}]" for i in indices]
    return views, [int(v) for v in labels], names, tuple(info.class_names)


def run_occlusion(config, progress=None):
    """Runs Fig. 7 on a trained run and writes figure, JSON and CSV.

    Writes into `output_dir`: `occlusion.png` (one row per image: input,
    total activation of the strongest layer-5 map, its projection, p(true
    class), most probable class), `occlusion.json` (settings, per image the
    maps as nested lists) and `occlusion.csv` (one row per image and
    occluder position: image, top, left, activation, p_true, predicted,
    p_predicted).

    Args:
        config: an `OcclusionConfig`.
        progress: optional callable(done_batches, total_batches).

    Returns:
        dict: figure, json, csv, and per image its name, label, map and
        p(true class) without occluder and at its lowest.

    Raises:
        Error: bad checkpoint, image, label, layer, size or stride (one line).
    """
    from zfkeras.analysis import plots_a

    run = runs.load_run(config.checkpoint)
    try:
        dn = deconv.Deconvnet(run.model)
    except Error as e:
        raise Error(f"{config.checkpoint}: {e}") from None
    layer = config.layer or (dn.conv_layer_names[-1] if dn.conv_layer_names else "")
    if layer not in dn.conv_layer_names:
        raise Error(
            f"{config.checkpoint}: unknown or non-conv layer {layer!r}; valid: "
            f"{', '.join(dn.conv_layer_names)}"
        )
    crop = run.preprocessing.crop_size
    size = config.size or max(2, crop // 4)
    stride = config.stride or max(1, size // 2)
    if stride >= size:
        raise Error(f"stride {stride} must be smaller than the occluder size {size}")
    occluder_positions(crop, crop, size, stride)
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise Error(f"{config.output_dir}: exists and is not a directory")
    classes = int(run.model.output_shape[-1])
    views, labels, names, class_names = _inputs(config, run, classes)
    inputs = run.model_input(views)
    label_given = labels is not None
    if not label_given:  # Image files without labels: the unoccluded prediction.
        probabilities = np.asarray(run.model.predict(inputs, verbose=0))
        labels = [int(i) for i in probabilities.argmax(axis=1)]
    maps = occlusion_maps(
        run.model,
        inputs,
        labels,
        size,
        stride,
        layer,
        batch_size=config.batch_size,
        progress=progress,
    )
    projection = dn.project(inputs, np.arange(len(inputs)), layer, maps.channels)

    rows, records = [], []
    csv_text = io.StringIO()
    writer = csv.writer(csv_text)
    writer.writerow(["image", "top", "left", "activation", "p_true", "predicted", "p_predicted"])
    for n, name in enumerate(names):
        rows.append(
            {
                "view": views[n],
                "activation": maps.activation[n],
                "p_true": maps.p_true[n],
                "predicted": maps.predicted[n],
                "tops": maps.tops,
                "lefts": maps.lefts,
                "projection": projection.projections[n],
                "box": projection.boxes[n],
                "layer": layer,
                "channel": int(maps.channels[n]),
                "label": int(maps.labels[n]),
                "p_unoccluded": float(maps.unoccluded_p_true[n]),
                "label_given": label_given,
            }
        )
        records.append(
            {
                "image": name,
                "label": int(maps.labels[n]),
                "class_name": class_names[int(maps.labels[n])],
                "label_given": label_given,
                "map": int(maps.channels[n]),
                "unoccluded": {
                    "activation": float(maps.unoccluded_activation[n]),
                    "p_true": float(maps.unoccluded_p_true[n]),
                    "predicted": int(maps.unoccluded_predicted[n]),
                },
                "projection": {
                    "position": [int(v) for v in projection.positions[n]],
                    "box": [int(v) for v in projection.boxes[n]],
                    "activation": float(projection.values[n]),
                },
                "activation": maps.activation[n].tolist(),
                "p_true": maps.p_true[n].tolist(),
                "predicted": maps.predicted[n].tolist(),
                "p_predicted": maps.p_predicted[n].tolist(),
            }
        )
        for i, top in enumerate(maps.tops):
            for j, left in enumerate(maps.lefts):
                writer.writerow(
                    [
                        name,
                        int(top),
                        int(left),
                        f"{maps.activation[n, i, j]:.6g}",
                        f"{maps.p_true[n, i, j]:.6g}",
                        int(maps.predicted[n, i, j]),
                        f"{maps.p_predicted[n, i, j]:.6g}",
                    ]
                )
    title = f"occluder {size}x{size}, stride {stride} ({crop}x{crop} input); {layer}"
    figure = plots_a.occlusion_figure(rows, class_names, size, title)
    fileio.ensure_dir(config.output_dir)
    png = plots_a.save(figure, os.path.join(config.output_dir, "occlusion.png"))
    json_path = os.path.join(config.output_dir, "occlusion.json")
    fileio.write_json(
        json_path,
        {
            "checkpoint": config.checkpoint,
            "size": size,
            "stride": stride,
            "layer": layer,
            "tops": maps.tops.tolist(),
            "lefts": maps.lefts.tolist(),
            "class_names": list(class_names),
            "images": records,
        },
    )
    csv_path = os.path.join(config.output_dir, "occlusion.csv")
    fileio.write_text(csv_path, csv_text.getvalue())
    summary = [
        {
            "image": r["image"],
            "class_name": r["class_name"],
            "label_given": label_given,
            "map": r["map"],
            "p_true": r["unoccluded"]["p_true"],
            "min_p_true": float(np.min(maps.p_true[n])),
        }
        for n, r in enumerate(records)
    ]
    return {"figure": png, "json": json_path, "csv": csv_path, "images": summary}
