"""Invariance of the features to translation, scale and rotation (Zeiler & Fergus Fig. 5).

A few images are vertically translated, scaled and rotated; for every
transform the model's feature vectors at layer 1 and layer 7 are compared with
those of the untransformed image (Euclidean distance), and P(true class) is
recorded. The paper finds that small transforms change layer 1 a lot, layer 7
less and quasi-linearly for translation and scale, and that the output is not
rotation invariant except for rotationally symmetric objects.

Where the transform is applied: to the model's *view* of the image (short side
resized to `resize_size`, centre square), before the centre `crop_size` crop,
so that content from outside the crop moves in as it would in a larger photo.
Then the usual evaluation steps follow (centre crop, minus the mean, times
`input_scale`). Resampling is bilinear and pixels are kept as floats (no
rounding), so the identity transform gives exactly the untransformed input.

Borders: pixels that come from outside the view are filled by `fill`:
'mean' (default) with the training mean view, i.e. zero in the model's input
space (the least informative value, as the occlusion experiments use), blended
with the image where bilinear sampling straddles the edge; 'black' with 0;
'nearest' with the nearest edge pixel; 'reflect' with the mirrored image.

Features: layer 1 is the rectified conv1 output ('relu1'), layer 7 the
rectified fc7 output ('relu7'), both flattened; a model without fc7 uses its
last fully connected layer instead, and the result says so.
"""

import dataclasses
import math
import os

import keras
import numpy as np

from zfkeras import data, fileio, images, runs
from zfkeras.analysis import probes
from zfkeras.errors import Error

TRANSFORMS = ("translation", "scale", "rotation")
FILLS = ("mean", "black", "nearest", "reflect")
UNITS = {"translation": "pixels", "scale": "ratio", "rotation": "degrees"}


# ---------------------------------------------------------------------------
# Example images.


@dataclasses.dataclass(frozen=True)
class Examples:
    """A few images as the model views them, with their labels.

    Attributes:
        views: uint8 (N, resize, resize, C), each image's full view (short side
            resized, centre square) before the model's centre crop.
        labels: int64 (N,), class ids of the model, -1 where unknown.
        names: N short names (file names, or 'split[index]').
    """

    views: np.ndarray
    labels: np.ndarray
    names: tuple

    def crops(self, preprocessing):
        """uint8 (N, crop, crop, C): the centre crops the model sees."""
        return data.center_crop(self.views, preprocessing.crop_size)


def load_examples(
    run,
    image_paths=(),
    labels=(),
    dataset="",
    split="test",
    count=5,
    data_dir=None,
    manual_dir=None,
    distinct_classes=True,
    check_classes=True,
):
    """Reads image files, or takes examples of a dataset split, as model views.

    Args:
        run: a `runs.Run` (its preprocessing gives the views).
        image_paths: image files; if given, `dataset` is not read.
        labels: optional class names or ids of the image files (one each;
            '' or '?' for unknown: the prediction on the original is used).
        dataset: a dataset name for `data.load` (default: the run's own).
        split: the split to take examples from.
        count: how many dataset examples.
        data_dir, manual_dir: as for `data.load`.
        distinct_classes: take the first example of each class in turn (one
            image per class, as the paper's figures), then any others.
        check_classes: the dataset must have the model's number of classes
            (its labels are the model's classes).

    Returns:
        An `Examples`.

    Raises:
        Error: bad files, labels, dataset or split, or no examples.
    """
    pre = run.preprocessing
    if image_paths:
        if labels and len(labels) != len(image_paths):
            raise Error(f"{len(labels)} labels given for {len(image_paths)} images")
        views, ids = [], []
        for index, path in enumerate(image_paths):
            views.append(data.view(images.read_image(path), pre).numpy())
            label = labels[index] if labels else ""
            ids.append(data.class_index(label, run.class_names, path, allow_unknown=True))
        names = tuple(os.path.basename(p) for p in image_paths)
        return Examples(np.stack(views), np.asarray(ids, np.int64), names)
    dataset = dataset or run.meta.get("dataset", "")
    if not dataset:
        raise Error(f"{run.path}: a bare .keras file needs --dataset or --images")
    if count < 1:
        raise Error(f"count must be >= 1, not {count}")
    ds, info = data.load(dataset, split, data_dir, manual_dir, channels=pre.channels)
    classes = int(run.model.output_shape[-1])
    if check_classes and info.num_classes != classes:
        raise Error(
            f"{run.path}: model has {classes} classes, dataset {dataset!r} has {info.num_classes}"
        )
    chosen, spare = [], []
    seen = set()
    # Scanning stops early: at most 50 examples per wanted image are read.
    for index, (image, label) in enumerate(ds.take(50 * count).as_numpy_iterator()):
        item = (index, image, int(label))
        if not distinct_classes or label not in seen:
            seen.add(int(label))
            chosen.append(item)
        elif len(spare) < count:
            spare.append(item)
        if len(chosen) == count:
            break
    chosen = (chosen + spare)[:count]
    if not chosen:
        raise Error(f"dataset {dataset!r} split {split!r} is empty")
    chosen.sort(key=lambda item: item[0])
    views = np.stack([data.view(image, pre).numpy() for _, image, _ in chosen])
    ids = np.asarray([label for _, _, label in chosen], np.int64)
    names = tuple(f"{split}[{index}]" for index, _, _ in chosen)
    return Examples(views, ids, names)


# ---------------------------------------------------------------------------
# Transforms.


def transform_matrix(kind, value, size):
    """The inverse affine map of one transform, as `keras.ops.image.affine_transform` wants.

    Args:
        kind: 'translation' (content moves down by `value` pixels; negative
            moves it up), 'scale' (zoom by `value` about the centre; > 1
            enlarges) or 'rotation' (`value` degrees counterclockwise about the
            centre, as displayed).
        value: the transform's parameter.
        size: (height, width) of the image.

    Returns:
        float32 (8,): [a0, a1, a2, b0, b1, b2, 0, 0] mapping an output pixel
        (x, y) to the input point (a0 x + a1 y + a2, b0 x + b1 y + b2).
    """
    cy, cx = (size[0] - 1) / 2.0, (size[1] - 1) / 2.0
    if kind == "translation":
        matrix, shift = np.eye(2), np.array([0.0, -float(value)])
    elif kind == "scale":
        if not value > 0:
            raise Error(f"scale must be > 0, not {value}")
        matrix, shift = np.eye(2) / float(value), np.zeros(2)
    elif kind == "rotation":
        angle = math.radians(float(value))
        cos, sin = math.cos(angle), math.sin(angle)
        matrix, shift = np.array([[cos, -sin], [sin, cos]]), np.zeros(2)
    else:
        raise Error(f"unknown transform {kind!r}; valid: {', '.join(TRANSFORMS)}")
    # input = matrix @ (output - centre) + centre + shift, in (x, y) order.
    centre = np.array([cx, cy])
    offset = centre - matrix @ centre + shift
    row = [matrix[0, 0], matrix[0, 1], offset[0], matrix[1, 0], matrix[1, 1], offset[1], 0, 0]
    return np.asarray(row, np.float32)


def transform_views(views, matrices, fill="mean", mean=None):
    """Resamples views with per-image affine maps (bilinear), filling borders.

    Args:
        views: (N, H, W, C) uint8 or float images.
        matrices: float32 (N, 8) from `transform_matrix`.
        fill: one of `FILLS` (module docstring).
        mean: float (H, W, C) mean view, needed for fill='mean'.

    Returns:
        float32 (N, H, W, C) in [0, 255].
    """
    if fill not in FILLS:
        raise Error(f"unknown fill {fill!r}; valid: {', '.join(FILLS)}")
    views = np.asarray(views, np.float32)
    matrices = np.asarray(matrices, np.float32)
    if fill == "mean":
        if mean is None:
            raise Error("fill='mean' needs the mean view")
        # A ones channel transformed alongside gives each pixel's coverage by
        # the image; the rest of it is the mean.
        ones = np.ones(views.shape[:3] + (1,), np.float32)
        stacked = keras.ops.image.affine_transform(
            np.concatenate([views, ones], axis=-1), matrices, "bilinear", "constant", 0.0
        )
        stacked = keras.ops.convert_to_numpy(stacked)
        coverage = stacked[..., -1:]
        out = stacked[..., :-1] + (1.0 - coverage) * np.asarray(mean, np.float32)[None]
    else:
        mode = "constant" if fill == "black" else fill
        out = keras.ops.convert_to_numpy(
            keras.ops.image.affine_transform(views, matrices, "bilinear", mode, 0.0)
        )
    return np.clip(out, 0.0, 255.0).astype(np.float32)


# ---------------------------------------------------------------------------
# The experiment.


@dataclasses.dataclass(frozen=True)
class Sweeps:
    """The transform parameters of Fig. 5.

    Attributes:
        translations: vertical shifts as fractions of the crop size (the
            paper's +-60 pixels at 224 is about +-0.27).
        scales: zoom ratios (1 is the identity).
        rotations: angles in degrees, counterclockwise.
    """

    translations: tuple = tuple(np.round(np.linspace(-0.25, 0.25, 11), 4))
    scales: tuple = tuple(np.round(np.linspace(1.0, 1.8, 9), 4))
    rotations: tuple = tuple(float(v) for v in range(0, 361, 10))

    def values(self, kind, crop_size):
        """The parameters of one sweep in their plotted unit (pixels for translation)."""
        if kind == "translation":
            return [float(f) * crop_size for f in self.translations]
        return [float(v) for v in (self.scales if kind == "scale" else self.rotations)]


@dataclasses.dataclass(frozen=True)
class InvarianceResult:
    """Fig. 5's curves, one per image and transform.

    Attributes:
        names: the images.
        labels: int (N,) the true class of each image (the prediction on the
            untransformed image where no label was known).
        label_source: per image 'given' or 'predicted'.
        layers: {'layer1': layer name, 'layer7': layer name} actually used.
        note: a remark on the layer choice ('' if the model has fc7).
        parameters: {kind: list of values} (translation in pixels).
        distances: {kind: {'layer1': (N, P), 'layer7': (N, P)}} Euclidean
            distances to the untransformed image's features.
        probabilities: {kind: (N, P)} P(true class).
        predictions: {kind: (N, P)} the most probable class.
        examples: {kind: float (N, P, crop, crop, C)} the transformed crops
            (uint8-range floats) of the first images, for the figure.
    """

    names: tuple
    labels: np.ndarray
    label_source: tuple
    class_names: tuple
    layers: dict
    note: str
    fill: str
    parameters: dict
    distances: dict
    probabilities: dict
    predictions: dict
    examples: dict

    def to_json(self):
        out = {
            "images": list(self.names),
            "labels": [int(v) for v in self.labels],
            "label_names": [_class_name(self.class_names, v) for v in self.labels],
            "label_source": list(self.label_source),
            "layers": dict(self.layers),
            "note": self.note,
            "fill": self.fill,
            "units": dict(UNITS),
            "sweeps": {},
        }
        for kind in TRANSFORMS:
            out["sweeps"][kind] = {
                "parameters": list(self.parameters[kind]),
                "layer1_distance": self.distances[kind]["layer1"].tolist(),
                "layer7_distance": self.distances[kind]["layer7"].tolist(),
                "p_true_class": self.probabilities[kind].tolist(),
                "predicted_class": self.predictions[kind].tolist(),
            }
        return out

    def to_csv(self):
        lines = ["image,label,transform,parameter,layer1_distance,layer7_distance,p_true,predicted"]
        for kind in TRANSFORMS:
            for i, name in enumerate(self.names):
                for p, value in enumerate(self.parameters[kind]):
                    lines.append(
                        f"{_csv(name)},{int(self.labels[i])},{kind},{value:.6g},"
                        f"{self.distances[kind]['layer1'][i, p]:.6g},"
                        f"{self.distances[kind]['layer7'][i, p]:.6g},"
                        f"{self.probabilities[kind][i, p]:.6g},{int(self.predictions[kind][i, p])}"
                    )
        return "\n".join(lines) + "\n"


def _csv(text):
    text = str(text)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _class_name(class_names, index):
    index = int(index)
    return class_names[index] if 0 <= index < len(class_names) else str(index)


def invariance_layers(model):
    """({'layer1': name, 'layer7': name}, note) for Fig. 5's two feature vectors."""
    layer1 = probes.layer_output_name(model, 1)
    if layer1 is None:
        raise Error(f"model {model.name!r} has no conv1 layer")
    layer7, note = probes.top_feature_layer(model)
    return {"layer1": layer1, "layer7": layer7}, note


def measure_invariance(
    run, examples, sweeps=Sweeps(), fill="mean", batch_size=64, progress=None, keep_examples=5
):
    """Computes Fig. 5's curves for a few images.

    Args:
        run: a `runs.Run`.
        examples: an `Examples` (from `load_examples`).
        sweeps: the transform parameters.
        fill: how borders are filled (module docstring).
        batch_size: images per forward pass.
        progress: optional callable(str) told how far the work has got.
        keep_examples: transformed crops kept for the figure (first images).

    Returns:
        An `InvarianceResult`.
    """
    pre = run.preprocessing
    views = np.asarray(examples.views)
    if views.ndim != 4 or views.shape[1:] != (pre.resize_size, pre.resize_size, pre.channels):
        raise Error(
            f"example views must be (N, {pre.resize_size}, {pre.resize_size}, {pre.channels}), "
            f"not {views.shape}"
        )
    layers, note = invariance_layers(run.model)
    features = probes.feature_model(run.model, [layers["layer1"], layers["layer7"], None])
    size = views.shape[1:3]

    def forward(kind, values):
        """Features of every image under every value of one sweep."""
        rows = [(i, v) for i in range(len(views)) for v in values]
        outs = {"layer1": [], "layer7": [], "probs": [], "crops": []}
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            matrices = np.stack([transform_matrix(kind, v, size) for _, v in part])
            moved = transform_views(views[[i for i, _ in part]], matrices, fill, run.mean)
            crops = data.center_crop(moved, pre.crop_size)
            layer1, layer7, probs = features(run.model_input(crops), training=False)
            outs["layer1"].append(keras.ops.convert_to_numpy(layer1).reshape(len(part), -1))
            outs["layer7"].append(keras.ops.convert_to_numpy(layer7).reshape(len(part), -1))
            outs["probs"].append(keras.ops.convert_to_numpy(probs))
            outs["crops"].append(crops[[k for k, (i, _) in enumerate(part) if i < keep_examples]])
        shape = (len(views), len(values))
        return {
            "layer1": np.concatenate(outs["layer1"]).reshape(shape + (-1,)),
            "layer7": np.concatenate(outs["layer7"]).reshape(shape + (-1,)),
            "probs": np.concatenate(outs["probs"]).reshape(shape + (-1,)),
            "crops": np.concatenate(outs["crops"]),
        }

    # The untransformed image goes through the same resampling path (a
    # translation by 0 is exactly the identity).
    reference = forward("translation", [0.0])
    labels = examples.labels.copy()
    predicted = reference["probs"][:, 0].argmax(axis=1)
    source = tuple("given" if v >= 0 else "predicted" for v in labels)
    labels = np.where(labels >= 0, labels, predicted)

    parameters, distances, probabilities, predictions, kept = {}, {}, {}, {}, {}
    total = sum(len(sweeps.values(k, pre.crop_size)) for k in TRANSFORMS) * len(views)
    done = 0
    for kind in TRANSFORMS:
        values = sweeps.values(kind, pre.crop_size)
        if not values:
            raise Error(f"the {kind} sweep has no values")
        out = forward(kind, values)
        parameters[kind] = values
        distances[kind] = {
            key: np.linalg.norm(out[key] - reference[key], axis=-1) for key in ("layer1", "layer7")
        }
        index = np.arange(len(views))
        probabilities[kind] = out["probs"][index, :, labels[index]]
        predictions[kind] = out["probs"].argmax(axis=-1)
        kept[kind] = out["crops"].reshape((-1, len(values)) + out["crops"].shape[1:])
        done += len(values) * len(views)
        if progress:
            progress(f"{kind}: {len(values)} values x {len(views)} images ({done}/{total})")
    return InvarianceResult(
        names=tuple(examples.names),
        labels=labels,
        label_source=source,
        class_names=tuple(run.class_names),
        layers=layers,
        note=note,
        fill=fill,
        parameters=parameters,
        distances=distances,
        probabilities=probabilities,
        predictions=predictions,
        examples=kept,
    )


# ---------------------------------------------------------------------------
# The tool's entry point.


@dataclasses.dataclass(frozen=True)
class InvarianceConfig:
    """What `run_invariance` does (tools/invariance.py)."""

    checkpoint: str
    output_dir: str
    images: tuple = ()
    labels: tuple = ()
    dataset: str = ""
    split: str = "test"
    count: int = 5
    data_dir: str = ""
    manual_dir: str = ""
    sweeps: Sweeps = Sweeps()
    fill: str = "mean"
    batch_size: int = 64


def run_invariance(config, progress=None):
    """Loads a run, measures Fig. 5's curves and writes PNG, JSON and CSV.

    Writes `invariance.png` (the 3x4 panel), `invariance.json` and
    `invariance.csv` into `config.output_dir`.

    Returns:
        dict with the file paths, the `InvarianceResult` and a short summary.
    """
    from zfkeras.analysis import plots_b

    if config.fill not in FILLS:
        raise Error(f"unknown fill {config.fill!r}; valid: {', '.join(FILLS)}")
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise Error(f"{config.output_dir}: exists and is not a directory")
    run = runs.load_run(config.checkpoint)
    examples = load_examples(
        run,
        config.images,
        config.labels,
        config.dataset,
        config.split,
        config.count,
        config.data_dir or None,
        config.manual_dir or None,
    )
    if progress:
        progress(f"{len(examples.names)} images: {', '.join(examples.names)}")
    result = measure_invariance(
        run, examples, config.sweeps, config.fill, config.batch_size, progress
    )
    record = result.to_json()
    record.update(checkpoint=config.checkpoint, preprocessing=dataclasses.asdict(run.preprocessing))
    fileio.ensure_dir(config.output_dir)
    paths = {
        "figure": os.path.join(config.output_dir, "invariance.png"),
        "json": os.path.join(config.output_dir, "invariance.json"),
        "csv": os.path.join(config.output_dir, "invariance.csv"),
    }
    fileio.write_json(paths["json"], record)
    fileio.write_text(paths["csv"], result.to_csv())
    plots_b.save(plots_b.invariance_figure(result), paths["figure"])
    return {"paths": paths, "result": result}
