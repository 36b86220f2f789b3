"""Correspondence of object parts across images (Zeiler & Fergus Section 5, Table 1).

The paper occludes the same part (left eye, right eye, nose) in five frontal
dog images and asks whether the feature vectors change in the same way:
eps_i = x_i - x~_i is the change of image i's features at layer l when the
part is occluded, and Delta_l = sum_{i != j} H(sign(eps_i), sign(eps_j)), H the
Hamming distance. A lower value than for randomly placed occluders means the
model treats that part consistently across images (it "corresponds").

Choices made here:
- Occluder: the part's box set to the mean image in the model's input space
  (zero after the mean is subtracted), the "grey" of Fig. 7.
- Layer 5 is the output of pool5 (the flattened 6x6x256 vector fc6 sees,
  the layer's output in Fig. 3); layer 7 the rectified fc7 output ('relu7'),
  or the last fc layer if the model has no fc7 (the result says so).
- Normalisation: H is divided by the feature dimension D, so a value is the
  fraction of features whose sign of change differs between two images, and
  Delta is reported as the mean over the n(n-1) ordered pairs i != j (the
  paper's ~0.07 are such fractions), +- the standard deviation over the pairs
  (population std, ddof=0). The raw paper sum (unnormalised, over ordered
  pairs) is reported too as `hamming_sum`. sign(0) = 0, so a feature that is
  zero with and without the occluder in both images agrees.
- Random baseline: per part and repeat, each image gets a box of the size of
  its own part box at a uniformly random position inside the crop; the pair
  values of all repeats give its mean +- std, and `repeat_std` is the std of
  the per-repeat means.

Parts file (JSON): an object mapping each image file (relative to the JSON
file's folder, or absolute) to its parts, each a box [x0, y0, x1, y1] in
pixels of the original image (x right, y down, half-open), e.g.

    {"dog1.jpg": {"left_eye": [120, 80, 150, 105], "nose": [140, 130, 175, 160]},
     "dog2.jpg": {"left_eye": [98, 71, 131, 97], "nose": [120, 118, 160, 150]}}

Boxes are mapped through the model's preprocessing (resize, centre crops) and
clipped to the crop; every image must name the same parts.
"""

import dataclasses
import json
import math
import os

import keras
import numpy as np

from zfkeras import data, fileio, images, runs
from zfkeras.analysis import probes
from zfkeras.errors import Error

# ---------------------------------------------------------------------------
# The measure.


def sign_changes(eps):
    """Pairwise normalised Hamming distances between the signs of feature changes.

    Args:
        eps: float (n, D): each image's feature change x - x~.

    Returns:
        float (n, n): H(sign(eps_i), sign(eps_j)) / D, zero on the diagonal.
    """
    eps = np.asarray(eps)
    signs = np.sign(eps.reshape(len(eps), -1)).astype(np.int8)
    n, dims = signs.shape
    out = np.zeros((n, n), np.float64)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = np.count_nonzero(signs[i] != signs[j]) / dims
    return out


def delta(eps):
    """Delta_l of Table 1 for one set of feature changes (module docstring).

    Returns:
        dict: mean and std over ordered pairs i != j of H / D, `hamming_sum`
        (the paper's raw sum over i != j), `pairs` (the n(n-1)/2 unordered
        pair values).
    """
    eps = np.asarray(eps)
    if len(eps) < 2:
        raise Error("correspondence needs at least two images")
    distances = sign_changes(eps)
    upper = distances[np.triu_indices(len(eps), 1)]
    dims = eps.reshape(len(eps), -1).shape[1]
    return {
        "mean": float(upper.mean()),
        "std": float(upper.std()),
        "hamming_sum": int(round(2 * upper.sum() * dims)),
        "pairs": upper,
    }


# ---------------------------------------------------------------------------
# Boxes.


def read_parts(path):
    """Reads a parts file: [(image path, {part: (x0, y0, x1, y1)})] in file order.

    Raises:
        Error: unreadable file, bad boxes, or images naming different parts.
    """
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError:
        raise Error(f"{path}: no such parts file") from None
    except (OSError, ValueError) as e:
        raise Error(f"{path}: unreadable parts file ({e})") from None
    if not isinstance(content, dict) or not content:
        raise Error(f"{path}: a parts file is a JSON object {{image: {{part: [x0, y0, x1, y1]}}}}")
    folder = os.path.dirname(path)  # images named beside it, as the user gave the path
    entries = []
    for image, parts in content.items():
        if not isinstance(parts, dict) or not parts:
            raise Error(f"{path}: image {image!r} needs an object of parts")
        boxes = {}
        for part, box in parts.items():
            ok = isinstance(box, (list, tuple)) and len(box) == 4
            ok = ok and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
            if not ok or not (box[2] > box[0] and box[3] > box[1]):
                raise Error(
                    f"{path}: {image} part {part!r}: a box is [x0, y0, x1, y1] with "
                    f"x1 > x0 and y1 > y0, not {box!r}"
                )
            boxes[str(part)] = tuple(float(v) for v in box)
        entries.append((os.path.join(folder, image), boxes))
    names = [set(boxes) for _, boxes in entries]
    if any(n != names[0] for n in names):
        common = sorted(set.intersection(*names))
        extra = sorted(set.union(*names) - set(common))
        raise Error(f"{path}: every image must name the same parts; not in all: {', '.join(extra)}")
    return entries


def box_in_crop(box, image_shape, preprocessing):
    """Maps a box from original image pixels to the model's crop (as `data.view` resizes).

    Args:
        box: (x0, y0, x1, y1) in pixels of the original image.
        image_shape: (height, width) of the original image.
        preprocessing: the run's `data.Preprocessing`.

    Returns:
        (y0, x0, y1, x1) ints, half-open, clipped to the crop; may be empty.
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    size = preprocessing.resize_size
    # The same float32 arithmetic as data.view (np.round and tf.round both
    # round half to even).
    pad = int(np.round(np.float32(min(height, width)) * np.float32(preprocessing.border)))
    height, width = height + 2 * pad, width + 2 * pad
    box = tuple(v + pad for v in box)
    scale = np.float32(size) / np.float32(min(height, width))
    new_h = max(size, int(np.round(np.float32(height) * scale)))
    new_w = max(size, int(np.round(np.float32(width) * scale)))
    offset = (size - preprocessing.crop_size) // 2
    top = (new_h - size) // 2 + offset
    left = (new_w - size) // 2 + offset
    x0, y0, x1, y1 = box
    crop = preprocessing.crop_size
    y0 = math.floor(y0 * new_h / height - top)
    y1 = math.ceil(y1 * new_h / height - top)
    x0 = math.floor(x0 * new_w / width - left)
    x1 = math.ceil(x1 * new_w / width - left)
    return tuple(int(min(max(v, 0), crop)) for v in (y0, x0, y1, x1))


def occlude(inputs, boxes):
    """Model inputs with each image's box set to 0 (the mean image).

    Args:
        inputs: float (n, H, W, C) model inputs (mean subtracted).
        boxes: int (n, 4) (y0, x0, y1, x1).
    """
    out = np.array(inputs, np.float32, copy=True)
    for image, (y0, x0, y1, x1) in enumerate(np.asarray(boxes, np.int64)):
        out[image, y0:y1, x0:x1, :] = 0.0
    return out


def random_boxes(boxes, crop_size, rng):
    """Boxes of the same sizes as `boxes` at uniformly random positions in the crop."""
    boxes = np.asarray(boxes, np.int64)
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ys = rng.integers(0, crop_size - heights + 1)
    xs = rng.integers(0, crop_size - widths + 1)
    return np.stack([ys, xs, ys + heights, xs + widths], axis=1)


# ---------------------------------------------------------------------------
# The experiment.


def correspondence_layers(model):
    """({'layer5': name, 'layer7': name}, note) of Table 1's feature vectors."""
    names = {layer.name for layer in model.layers}
    layer5 = "pool5" if "pool5" in names else probes.layer_output_name(model, 5)
    if layer5 is None:
        raise Error(f"model {model.name!r} has neither pool5 nor conv5")
    layer7, note = probes.top_feature_layer(model)
    return {"layer5": layer5, "layer7": layer7}, note


def measure_correspondence(
    run, crops, part_boxes, repeats=10, seed=0, batch_size=64, progress=None
):
    """Table 1 for a set of images.

    Args:
        run: a `runs.Run`.
        crops: uint8 (n, crop, crop, C) model views of the images.
        part_boxes: {part: int (n, 4) (y0, x0, y1, x1) boxes in the crop}.
        repeats: random-occluder draws per part.
        seed: random seed.
        batch_size: images per forward pass.
        progress: optional callable(str).

    Returns:
        dict: layers, note, parts (one entry per part with layer5/layer7
        Delta and the random baseline).
    """
    crops = np.asarray(crops)
    if len(crops) < 2:
        raise Error("correspondence needs at least two images")
    if repeats < 1:
        raise Error(f"repeats must be >= 1, not {repeats}")
    layers, note = correspondence_layers(run.model)
    keys = ("layer5", "layer7")
    model = probes.feature_model(run.model, [layers[k] for k in keys])
    inputs = run.model_input(crops)

    def features(batch):
        outs = {k: [] for k in keys}
        for start in range(0, len(batch), batch_size):
            values = model(batch[start : start + batch_size], training=False)
            for k, v in zip(keys, values):
                v = keras.ops.convert_to_numpy(v)
                outs[k].append(v.reshape(len(v), -1))
        return {k: np.concatenate(v) for k, v in outs.items()}

    clean = features(inputs)
    rng = np.random.default_rng(seed)
    results = []
    for part, boxes in part_boxes.items():
        boxes = np.asarray(boxes, np.int64)
        occluded = features(occlude(inputs, boxes))
        entry = {"part": part, "boxes": boxes.tolist()}
        for k in keys:
            d = delta(clean[k] - occluded[k])
            entry[k] = {"mean": d["mean"], "std": d["std"], "hamming_sum": d["hamming_sum"]}
        # All random draws of this part in one batch of forward passes.
        drawn = [random_boxes(boxes, crops.shape[1], rng) for _ in range(repeats)]
        occluded = features(np.concatenate([occlude(inputs, b) for b in drawn]))
        entry["random"] = {"boxes": [b.tolist() for b in drawn]}
        for k in keys:
            changes = clean[k][None] - occluded[k].reshape((repeats, len(crops), -1))
            pairs = [delta(c)["pairs"] for c in changes]
            entry["random"][k] = {
                "mean": float(np.mean(pairs)),
                "std": float(np.std(pairs)),
                "repeat_std": float(np.std([p.mean() for p in pairs])),
            }
        results.append(entry)
        if progress:
            progress(
                f"{part}: layer 5 {entry['layer5']['mean']:.3f} (random "
                f"{entry['random']['layer5']['mean']:.3f}), layer 7 {entry['layer7']['mean']:.3f} "
                f"(random {entry['random']['layer7']['mean']:.3f})"
            )
    return {"layers": layers, "note": note, "repeats": repeats, "seed": seed, "parts": results}


@dataclasses.dataclass(frozen=True)
class CorrespondenceConfig:
    """What `run_correspondence` does (tools/correspondence.py)."""

    checkpoint: str
    parts_file: str
    output_dir: str
    parts: tuple = ()
    repeats: int = 10
    seed: int = 0
    batch_size: int = 64


def run_correspondence(config, progress=None):
    """Loads a run and a parts file, measures Table 1 and writes PNG, JSON and CSV.

    Writes `correspondence.png` (the images with their part boxes; Delta per
    part and layer against random occluders), `correspondence.json` and
    `correspondence.csv` into `config.output_dir`.

    Returns:
        dict with the file paths and the JSON record.
    """
    from zfkeras.analysis import plots_b

    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise Error(f"{config.output_dir}: exists and is not a directory")
    entries = read_parts(config.parts_file)
    if len(entries) < 2:
        raise Error(f"{config.parts_file}: correspondence needs at least two images")
    names = list(entries[0][1])
    if config.parts:
        unknown = sorted(set(config.parts) - set(names))
        if unknown:
            raise Error(
                f"{config.parts_file}: no part {', '.join(unknown)}; parts: {', '.join(names)}"
            )
        names = list(config.parts)
    run = runs.load_run(config.checkpoint)
    pre = run.preprocessing
    crops, part_boxes = [], {name: [] for name in names}
    for path, boxes in entries:
        image = images.read_image(path)
        crops.append(data.eval_view(image, pre))
        for name in names:
            box = box_in_crop(boxes[name], image.shape[:2], pre)
            if box[2] <= box[0] or box[3] <= box[1]:
                raise Error(
                    f"{path}: part {name!r} {list(boxes[name])} lies outside the model's "
                    f"centre crop"
                )
            part_boxes[name].append(box)
    crops = np.stack(crops)
    result = measure_correspondence(
        run, crops, part_boxes, config.repeats, config.seed, config.batch_size, progress
    )
    result.update(
        checkpoint=config.checkpoint,
        parts_file=config.parts_file,
        images=[path for path, _ in entries],
        normalisation="mean over ordered pairs i != j of Hamming(sign eps_i, sign eps_j) / D",
    )
    fileio.ensure_dir(config.output_dir)
    paths = {
        "figure": os.path.join(config.output_dir, "correspondence.png"),
        "json": os.path.join(config.output_dir, "correspondence.json"),
        "csv": os.path.join(config.output_dir, "correspondence.csv"),
    }
    fileio.write_json(paths["json"], result)
    fileio.write_text(paths["csv"], _csv(result))
    plots_b.save(plots_b.correspondence_figure(result, crops), paths["figure"])
    return {"paths": paths, "record": result}


def _csv(result):
    lines = ["part,occluder,layer,mean,std"]
    for entry in result["parts"]:
        for k in ("layer5", "layer7"):
            lines.append(f"{entry['part']},part,{k},{entry[k]['mean']:.6f},{entry[k]['std']:.6f}")
            r = entry["random"][k]
            lines.append(f"{entry['part']},random,{k},{r['mean']:.6f},{r['std']:.6f}")
    return "\n".join(lines) + "\n"
