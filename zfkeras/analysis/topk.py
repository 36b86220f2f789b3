"""Top-k mining: the strongest activations of every feature map over a dataset (Fig. 2).

Zeiler & Fergus (2013) Fig. 2 shows, for a subset of the feature maps of
layers 1-5, the 9 strongest activations over the validation set, each
projected separately to pixel space beside the image patch it sees. One
image counts once per map: its activation for a map is the map's maximum
over positions.

`mine_top_k` finds them in one streaming pass. For each batch and each
chosen layer it takes every image's per-map maximum and its position, then
merges these with the running top k of each map by one sort per batch (all
in TensorFlow, no loop over images or maps). The state is k values, image
indices and positions per map, so memory does not grow with the dataset.
The pass runs under any `tf.distribute` strategy: each replica reduces its
share of the batch to per-image maxima, which are gathered and merged.
Ties go to the lower image index, so the result does not depend on the
batch size or the number of replicas.

The pass is resumable: with a `state_path` it saves its state (an .npz)
every `checkpoint_every` batches, and a later call with the same model and
settings continues after the last saved batch; a complete state is simply
reused, which is also how figures are re-plotted without re-mining.

`run_topk(TopKConfig(...))` does the whole experiment on a trained run:
mine, fetch the winning images (a second pass that keeps only them),
project the winners of the chosen maps with the deconvnet at their recorded
positions, and write one grid per layer.
"""

import dataclasses
import hashlib
import io
import json
import os
import weakref

import keras
import numpy as np
import tensorflow as tf

from zfkeras import data, deconv, distribute, fileio, runs
from zfkeras.errors import Error

STATE_FILE = "top9_state.npz"
_STATE_VERSION = 1


# ---------------------------------------------------------------------------
# Feature maps without switches.


def _is_relu(layer):
    if isinstance(layer, keras.layers.ReLU):
        return True
    activation = getattr(layer, "activation", None)
    return isinstance(layer, keras.layers.Activation) and (
        getattr(activation, "__name__", "") == "relu"
    )


def feature_model(model, layers, probabilities=False):
    """A Keras model from model inputs to the feature maps of `layers`.

    A layer's feature map is the one the deconvnet visualizes (see
    `zfkeras.deconv`): the rectified output of a Conv2D / Dense (its fused
    ReLU, or the ReLU after it through any BatchNormalization), and the
    pre-softmax class scores of a softmax Dense. Unlike the deconvnet's probe
    it uses the model's own pooling (no switches), so it also runs where
    `max_pool_with_argmax` does not (XLA, TPU).

    Args:
        model: a model the deconvnet accepts (a linear chain).
        layers: names of visualizable layers (`Deconvnet.layer_names`).
        probabilities: also output the model's own output as "probabilities".

    Returns:
        A `keras.Model` whose output is a dict {layer: feature map}.

    Raises:
        Error: for a layer that is not visualizable.
    """
    chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = [layer.name for layer in chain]
    outputs = {}
    for name in layers:
        if name not in names:
            raise Error(f"unknown layer {name!r}")
        index = names.index(name)
        layer = chain[index]
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            raise Error(f"layer {name!r} is not a Conv2D or Dense layer")
        activation = getattr(layer.activation, "__name__", "")
        if activation == "relu":
            outputs[name] = layer.output
        elif activation == "softmax":
            outputs[name] = deconv.DenseLogits(layer, name=f"{name}_class_scores")(layer.input)
        else:
            ahead = index + 1
            while ahead < len(chain) and isinstance(chain[ahead], keras.layers.BatchNormalization):
                ahead += 1
            rectified = ahead < len(chain) and _is_relu(chain[ahead])
            outputs[name] = chain[ahead].output if rectified else layer.output
    if probabilities:
        outputs["probabilities"] = model.outputs[0]
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, outputs, name=f"{model.name}_features")


# ---------------------------------------------------------------------------
# The mined state.


@dataclasses.dataclass(frozen=True)
class TopK:
    """The k strongest activations of every feature map of some layers.

    For layer L with C maps, rank r = 0..k-1 (strongest first):

    Attributes:
        layers: the layer names.
        values: {L: float32 (C, k)} activations (the map's maximum over
            positions in that image); -inf where fewer than k images exist.
        image_index: {L: int64 (C, k)} index of the image in the dataset
            order (0-based), -1 where there is none.
        positions: {L: int64 (C, k, 2)} (y, x) of the maximum in the map
            (the first in row-major order on ties); (0, 0) for fc layers.
        num_images: images seen.
        complete: whether the pass reached the end of the data.
        batches: batches consumed (the resume point).
        fingerprint: dict describing model and settings (resume check).
    """

    layers: tuple
    values: dict
    image_index: dict
    positions: dict
    num_images: int
    complete: bool
    batches: int
    fingerprint: dict


def save_top_k(path, top_k):
    """Writes a `TopK` as an .npz file atomically."""
    arrays = {
        "version": np.int64(_STATE_VERSION),
        "layers": np.array(json.dumps(list(top_k.layers))),
        "num_images": np.int64(top_k.num_images),
        "complete": np.bool_(top_k.complete),
        "batches": np.int64(top_k.batches),
        "fingerprint": np.array(json.dumps(top_k.fingerprint, sort_keys=True)),
    }
    for layer in top_k.layers:
        arrays[f"{layer}__values"] = top_k.values[layer]
        arrays[f"{layer}__image_index"] = top_k.image_index[layer]
        arrays[f"{layer}__positions"] = top_k.positions[layer]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    fileio.write_bytes(path, buffer.getvalue())
    return path


def load_top_k(path):
    """Reads a `TopK` written by `save_top_k`, or raises Error."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if int(f["version"]) != _STATE_VERSION:
                raise Error(f"{path}: unknown state version {int(f['version'])}")
            layers = tuple(json.loads(str(f["layers"])))
            return TopK(
                layers=layers,
                values={layer: f[f"{layer}__values"] for layer in layers},
                image_index={layer: f[f"{layer}__image_index"] for layer in layers},
                positions={layer: f[f"{layer}__positions"] for layer in layers},
                num_images=int(f["num_images"]),
                complete=bool(f["complete"]),
                batches=int(f["batches"]),
                fingerprint=json.loads(str(f["fingerprint"])),
            )
    except (OSError, ValueError, KeyError) as e:
        raise Error(f"{path}: unreadable top-k state ({e})") from None


def weights_digest(model):
    """A short hash of a model's weights (to tell whether a state is stale)."""
    digest = hashlib.sha1()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------
# The streaming pass.


def model_input_batches(dataset, preprocessing, mean, batch_size, num_images=0):
    """(index, model input) batches of a raw (image, label) dataset, in order.

    The index is the example's position in `dataset` (0-based); the input is
    the model's evaluation view (centre crop, minus mean, scaled), exactly
    what `Run.model_input` gives for `fetch_views`' views.
    """
    crop = preprocessing.crop_size
    mean = tf.constant(data.center_crop(np.asarray(mean, np.float32), crop))
    scale = float(preprocessing.input_scale)
    ds = dataset.enumerate()
    if num_images:
        ds = ds.take(num_images)

    def prepare(index, example):
        view = data.center_crop(data.view(example[0], preprocessing), crop)
        return index, (tf.cast(view, tf.float32) - mean) * scale

    ds = ds.map(prepare, num_parallel_calls=data.PARALLEL_CALLS)
    # A fixed prefetch (`data.untuned`): the pass's memory should not depend on
    # the dataset's size.
    return data.untuned(ds.batch(batch_size).prefetch(data.PREFETCH_BATCHES))


# Positions are found as float32 weights, exact below 2^24 positions.
_FLOAT_EXACT = 2**24


@tf.function(jit_compile=True)
def _max_and_first_position(flat):
    """(B, n, C) -> maxima (B, C), first row-major position of each (B, C).

    The position is n minus the largest weight n - p over the positions p
    holding the maximum: an elementwise select and a max reduction, which XLA
    fuses into one pass over the maps. tf.argmax (Eigen's tuple reducer) over
    the middle axis took 8x a plain max over conv1's maps and kept mining at
    1.3-1.4x a forward pass (BENCHMARKS.md).
    """
    maxima = tf.reduce_max(flat, axis=1)
    size = flat.shape[1]
    weight = tf.range(size, 0, -1, dtype=tf.float32)[None, :, None]
    hits = tf.equal(flat, maxima[:, None, :])
    best = tf.reduce_max(tf.where(hits, weight, 0.0), axis=1)
    # No hit only if the maximum is NaN: position 0, as tf.argmax gives.
    position = tf.where(best > 0, size - tf.cast(best, tf.int64), 0)
    return maxima, position


def _per_image_max(feature):
    """(B, h, w, C) or (B, C) -> per-image maxima (B, C), flat positions (B, C).

    Each position is the first maximum in row-major order (ties are common:
    dead ReLU maps are all zero); tests compare with NumPy's argmax.
    """
    if feature.shape.rank == 2:
        return feature, tf.zeros(tf.shape(feature), tf.int64)
    height, width, channels = feature.shape[1:]
    flat = tf.reshape(feature, [-1, height * width, channels])
    if height * width < _FLOAT_EXACT:
        return _max_and_first_position(flat)
    # tf.argmax's CPU kernel also returns the first maximum, at several times the cost.
    return tf.reduce_max(flat, axis=1), tf.argmax(flat, axis=1, output_type=tf.int64)


def _merge(state, maxima, positions, indices, k):
    """Merges one batch's per-image maxima into the running top k of each map.

    Candidates (the state and the batch) are ordered by image index, then
    stably by value, descending: ties go to the lower image index.
    """
    values, images, places = state
    channels = tf.shape(values)[0]
    count = tf.shape(indices)[0]
    candidate_values = tf.concat([values, tf.transpose(maxima)], axis=1)
    candidate_images = tf.concat(
        [images, tf.broadcast_to(indices[None, :], tf.stack([channels, count]))], axis=1
    )
    candidate_places = tf.concat([places, tf.transpose(positions)], axis=1)
    by_image = tf.argsort(candidate_images, axis=1, stable=True)
    candidate_values = tf.gather(candidate_values, by_image, batch_dims=1)
    candidate_images = tf.gather(candidate_images, by_image, batch_dims=1)
    candidate_places = tf.gather(candidate_places, by_image, batch_dims=1)
    # top_k keeps the lower index first among equal values.
    _, best = tf.math.top_k(candidate_values, k=k, sorted=True)
    return (
        tf.gather(candidate_values, best, batch_dims=1),
        tf.gather(candidate_images, best, batch_dims=1),
        tf.gather(candidate_places, best, batch_dims=1),
    )


def _initial_state(features, layers, k):
    state = {}
    for layer in layers:
        channels = int(features.output[layer].shape[-1])
        state[layer] = (
            np.full((channels, k), -np.inf, np.float32),
            np.full((channels, k), -1, np.int64),
            np.zeros((channels, k), np.int64),
        )
    return state


def _to_top_k(state, layers, features, num_images, complete, batches, fingerprint):
    values, images, positions = {}, {}, {}
    for layer in layers:
        v, i, p = (np.asarray(a) for a in state[layer])
        shape = features.output[layer].shape
        width = int(shape[2]) if len(shape) == 4 else 1
        values[layer] = v.astype(np.float32)
        images[layer] = i.astype(np.int64)
        positions[layer] = np.stack(np.divmod(p.astype(np.int64), width), axis=-1)
    return TopK(
        tuple(layers), values, images, positions, num_images, complete, batches, fingerprint
    )


def _from_top_k(top_k, features):
    state = {}
    for layer in top_k.layers:
        shape = features.output[layer].shape
        width = int(shape[2]) if len(shape) == 4 else 1
        y, x = top_k.positions[layer][..., 0], top_k.positions[layer][..., 1]
        state[layer] = (top_k.values[layer], top_k.image_index[layer], y * width + x)
    return state


# Compiled passes per model: a later call with the same model, layers, k and
# strategy (e.g. mining several snapshots' data, or benchmarks) skips building
# the feature model and tracing.
_COMPILED = weakref.WeakKeyDictionary()


def _compiled_pass(model, layers, k, strategy):
    """(feature model, per-batch reduction step, merge) of a mining pass."""
    cache = _COMPILED.setdefault(model, {})
    key = (layers, k, id(strategy))
    if key in cache and cache[key][0] is strategy:
        return cache[key][1:]
    features = feature_model(model, layers)

    @tf.function
    def reduce_batch(indices, images):
        maps = features(images, training=False)
        return indices, {layer: _per_image_max(maps[layer]) for layer in layers}

    def gather(value):
        return strategy.gather(value, axis=0)

    @tf.function
    def step(batch):
        per_replica = strategy.run(reduce_batch, args=batch)
        return tf.nest.map_structure(gather, per_replica)

    @tf.function
    def merge(state, indices, reduced):
        return {layer: _merge(state[layer], *reduced[layer], indices, k) for layer in layers}

    cache[key] = (strategy, features, step, merge)
    return features, step, merge


def mine_top_k(
    model,
    batches,
    layers,
    k=9,
    strategy=None,
    state_path=None,
    checkpoint_every=200,
    fingerprint=None,
    total_batches=None,
    progress=None,
):
    """The k strongest activations of every map of `layers`, in one streaming pass.

    Args:
        model: a model the deconvnet accepts; under a strategy, built in its
            scope.
        batches: a dataset of (int64 image index (B,), float32 model input
            (B, H, W, C)) batches, e.g. `model_input_batches`. It must give
            the same batches in the same order on every call (resuming skips
            the batches already consumed).
        layers: visualizable layer names.
        k: activations kept per map.
        strategy: a `tf.distribute.Strategy` (default: the current one).
        state_path: optional .npz path: resume from it, save to it every
            `checkpoint_every` batches and at the end. A state whose
            `fingerprint` differs is ignored (mined afresh).
        checkpoint_every: batches between saves.
        fingerprint: JSON-able dict identifying model and settings.
        total_batches: for progress reports, if known.
        progress: optional callable(done_batches, total_batches).

    Returns:
        A `TopK`.
    """
    if k < 1:
        raise Error(f"k must be >= 1, not {k}")
    strategy = strategy or tf.distribute.get_strategy()
    layers = tuple(layers)
    fingerprint = json.loads(
        json.dumps(dict(fingerprint or {}, layers=list(layers), k=int(k)), sort_keys=True)
    )
    features, step, merge = _compiled_pass(model, layers, k, strategy)
    state = _initial_state(features, layers, k)
    done, seen = 0, 0
    if state_path and os.path.isfile(state_path):
        previous = load_top_k(state_path)
        if previous.fingerprint == fingerprint:
            if previous.complete:
                return previous
            state = _from_top_k(previous, features)
            done, seen = previous.batches, previous.num_images

    distributed = strategy.experimental_distribute_dataset(
        distribute.distribute_dataset_options(batches.skip(done), strategy)
    )
    chief = distribute.is_chief(strategy)
    for batch in distributed:
        indices, reduced = step(batch)
        state = merge(state, indices, reduced)
        done += 1
        seen += int(tf.size(indices))
        if progress is not None:
            progress(done, total_batches)
        if state_path and chief and done % checkpoint_every == 0:
            save_top_k(
                state_path, _to_top_k(state, layers, features, seen, False, done, fingerprint)
            )
    result = _to_top_k(state, layers, features, seen, True, done, fingerprint)
    if state_path and chief:
        save_top_k(state_path, result)
    return result


# ---------------------------------------------------------------------------
# Fetching and projecting the winners.


def fetch_views(dataset, preprocessing, indices, batch_size=64):
    """The uint8 evaluation views and labels of some examples of a dataset.

    A second pass that keeps only the examples at `indices` (positions in the
    order of `dataset`) and stops after the last one.

    Args:
        dataset: raw (image, label) examples, in the order used for mining.
        preprocessing: the run's `Preprocessing`.
        indices: example indices.

    Returns:
        (views uint8 (n, crop, crop, C), labels int64 (n,)) in the order of
        `indices` (repeats allowed).
    """
    indices = np.asarray(indices, np.int64).reshape(-1)
    wanted = np.unique(indices)
    if wanted.size == 0:
        crop, channels = preprocessing.crop_size, preprocessing.channels
        return np.zeros((0, crop, crop, channels), np.uint8), np.zeros(0, np.int64)
    lookup = tf.constant(wanted)
    crop = preprocessing.crop_size
    ds = (
        dataset.enumerate()
        .take(int(wanted[-1]) + 1)
        .filter(lambda index, example: tf.reduce_any(tf.equal(lookup, index)))
        .map(
            lambda index, example: (
                index,
                data.center_crop(data.view(example[0], preprocessing), crop),
                example[1],
            ),
            num_parallel_calls=data.PARALLEL_CALLS,
        )
        .batch(batch_size)
    )
    found, views, labels = [], [], []
    for index, view, label in ds:
        found.append(index.numpy())
        views.append(view.numpy())
        labels.append(label.numpy())
    found = np.concatenate(found) if found else np.zeros(0, np.int64)
    if len(found) != len(wanted):
        missing = sorted(set(wanted.tolist()) - set(found.tolist()))
        raise Error(f"examples {missing[:5]} not found in the dataset (it changed?)")
    views, labels = np.concatenate(views), np.concatenate(labels)
    rows = np.searchsorted(found, indices)
    return views[rows], labels[rows]


def dataset_labels(dataset, count=0):
    """The labels of a raw (image, label) dataset, in its order (int64 (n,))."""
    ds = dataset.take(count) if count else dataset
    parts = [label for label in ds.map(lambda image, label: label).batch(4096).as_numpy_iterator()]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def class_summary(top_k, labels, seed=0):
    """How class-specific each layer's maps are: Fig. 2's reading, as numbers.

    For the maps that fire at all (strongest activation > 0), the share of a
    map's top-k images that belong to its most common class, averaged over the
    maps, and the fraction of maps whose top-k images are all of one class.
    The control is the same share with the dataset's labels shuffled (one
    seeded permutation): what k images picked without regard to class give.

    Args:
        top_k: a complete `TopK`.
        labels: int (num_images,) labels in dataset order (negative: unknown).
        seed: seed of the permutation.

    Returns:
        {layer: {maps, silent_maps, majority_share, one_class_maps,
        shuffled_majority_share}} (shares None when no map fires).
    """
    labels = np.asarray(labels, np.int64)
    shuffled = np.random.default_rng(seed).permutation(labels)
    summary = {}
    for layer in top_k.layers:
        index = top_k.image_index[layer]
        firing = (top_k.values[layer][:, 0] > 0) & (index >= 0).all(axis=1)
        shares = _majority_shares(labels[index[firing]])
        summary[layer] = {
            "maps": int(len(index)),
            "silent_maps": int((~firing).sum()),
            "majority_share": _mean_or_none(shares),
            "one_class_maps": float(np.mean(np.equal(shares, 1.0))) if shares else None,
            "shuffled_majority_share": _mean_or_none(_majority_shares(shuffled[index[firing]])),
        }
    return summary


def _majority_shares(winner_labels):
    """Per map (row) with a known label: the commonest known label's share of all its winners."""
    return [np.bincount(w[w >= 0]).max() / len(w) for w in winner_labels if (w >= 0).any()]


def _mean_or_none(values):
    return float(np.mean(values)) if values else None


@dataclasses.dataclass(frozen=True)
class Winners:
    """The projected top-k activations of some maps of one layer.

    Attributes:
        layer: the layer name.
        channels: int (M,) the maps shown.
        values, image_index, positions: the mined (M, k), (M, k), (M, k, 2).
        projections: list of M lists of k float32 crops (h, w, C) of the
            projections to their receptive fields (None where no image).
        patches: the same for the uint8 image patches.
        boxes: int (M, k, 4) receptive fields (y0, x0, y1, x1) in the view.
        labels: int (M, k) true labels of the images (-1 where none).
        projected_values: float32 (M, k) the deconvnet's own activation at
            the recorded position (equals `values` up to float rounding).
    """

    layer: str
    channels: np.ndarray
    values: np.ndarray
    image_index: np.ndarray
    positions: np.ndarray
    projections: list
    patches: list
    boxes: np.ndarray
    labels: np.ndarray
    projected_values: np.ndarray


def project_winners(dn, run, top_k, layer, channels, views, labels, view_rows, batch_size=32):
    """Projects the mined top-k of `channels` of `layer` with the deconvnet.

    Args:
        dn: a `zfkeras.deconv.Deconvnet` of the mined model.
        run: the `Run` (its preprocessing and mean make the model input).
        top_k: a `TopK`.
        layer: a mined layer.
        channels: the maps to project.
        views, labels: fetched uint8 views and labels (`fetch_views`).
        view_rows: {image index: row of `views`}.
        batch_size: requests per deconv pass.

    Returns:
        A `Winners`.
    """
    channels = np.asarray(channels, np.int64)
    values = top_k.values[layer][channels]
    images = top_k.image_index[layer][channels]
    positions = top_k.positions[layer][channels]
    valid = images >= 0
    m, k = images.shape
    boxes = np.zeros((m, k, 4), np.int64)
    projected = np.full((m, k), np.nan, np.float32)
    out_labels = np.full((m, k), -1, np.int64)
    projections = [[None] * k for _ in range(m)]
    patches = [[None] * k for _ in range(m)]
    if valid.any():
        wanted = np.unique(images[valid])
        rows = np.array([view_rows[int(i)] for i in wanted])
        inputs = run.model_input(views[rows])
        local = np.searchsorted(wanted, images[valid])
        result = dn.project(
            inputs,
            image_index=local,
            layer=layer,
            channel=np.broadcast_to(channels[:, None], (m, k))[valid],
            positions=positions[valid],
            batch_size=batch_size,
        )
        boxes[valid] = result.boxes
        projected[valid] = result.values
        out_labels[valid] = labels[rows[local]]
        for r, (i, j) in enumerate(zip(*np.nonzero(valid))):
            y0, x0, y1, x1 = result.boxes[r]
            projections[i][j] = result.projections[r, y0:y1, x0:x1]
            patches[i][j] = views[rows[local[r]], y0:y1, x0:x1]
    return Winners(
        layer,
        channels,
        values,
        images,
        positions,
        projections,
        patches,
        boxes,
        out_labels,
        projected,
    )


# ---------------------------------------------------------------------------
# The experiment on a trained run (tools/mine_top9.py).


def _run_config(run):
    path = os.path.join(run.path, runs.CONFIG_FILE) if os.path.isdir(run.path) else ""
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load_dataset(run, dataset="", split="test", data_dir="", manual_dir=""):
    """A split of the run's dataset (or another), for analyses of that run.

    Args:
        run: a `zfkeras.runs.Run`.
        dataset: dataset name (default: the run's).
        split: split name.
        data_dir: TFDS folder (default: the run's training data_dir, if any).
        manual_dir: folder of manually obtained files.

    Returns:
        (raw (image, label) dataset, DatasetInfo, number of examples or None).
    """
    config = _run_config(run)
    name = dataset or run.meta.get("dataset")
    if not name:
        raise Error(f"{run.path}: a bare .keras file needs --dataset")
    if not data_dir and not dataset:
        data_dir = config.get("data_dir", "")
    ds, info = data.load(
        name,
        split,
        data_dir=data_dir or None,
        manual_dir=manual_dir or None,
        channels=run.preprocessing.channels,
    )
    try:
        count = data.num_examples(name, split, data_dir or None)
    except Exception:  # Sliced split names etc.: progress just lacks a total.
        count = None
    return ds, info, count


def check_layers(dn, layers, path, default=None):
    """Validated layer names (default: every conv layer), or raises Error."""
    layers = tuple(layers) or tuple(default or dn.conv_layer_names)
    for layer in layers:
        if layer not in dn.layer_names:
            raise Error(f"{path}: unknown layer {layer!r}; valid: {', '.join(dn.layer_names)}")
    if len(set(layers)) != len(layers):
        raise Error(f"layers named twice: {', '.join(layers)}")
    return layers


def choose_maps(dn, layers, maps, num_maps, seed):
    """{layer: sorted map indices}: explicit `maps`, else `num_maps` random ones.

    Args:
        maps: {layer: channel list} given explicitly (others get random ones).
        num_maps: random maps per layer; 0 means all.
    """
    rng = np.random.default_rng(seed)
    chosen = {}
    for layer in layers:
        size = dn.num_channels(layer)
        if layer in maps:
            picked = np.asarray(maps[layer], np.int64)
            bad = picked[(picked < 0) | (picked >= size)]
            if bad.size:
                raise Error(
                    f"map {int(bad[0])} out of range for {layer} ({size} maps: 0-{size - 1})"
                )
        elif num_maps and num_maps < size:
            picked = np.sort(rng.choice(size, num_maps, replace=False))
        else:
            picked = np.arange(size)
        chosen[layer] = picked
    unknown = sorted(set(maps) - set(layers))
    if unknown:
        raise Error(f"maps given for layers not shown: {', '.join(unknown)}")
    return chosen


@dataclasses.dataclass(frozen=True)
class TopKConfig:
    """What `run_topk` does.

    Attributes:
        checkpoint: a training work dir or a .keras file.
        output_dir: where the figures, JSON and the mined state go.
        dataset, split, data_dir, manual_dir: the data (default: the run's
            dataset, its data_dir, the test split).
        layers: layers to mine (default: every conv layer).
        k: activations per map (9 in the paper).
        maps: ((layer, (channels...)), ...) maps to show explicitly.
        num_maps: random maps shown per layer otherwise (0: all).
        num_images: mine only the first N images (0: all).
        batch_size: images per mining batch.
        strategy: a `zfkeras.distribute` strategy name.
        seed: seed of the random map choice.
        checkpoint_every: batches between saves of the mining state.
        remine: ignore a saved state.
    """

    checkpoint: str
    output_dir: str
    dataset: str = ""
    split: str = "test"
    data_dir: str = ""
    manual_dir: str = ""
    layers: tuple = ()
    k: int = 9
    maps: tuple = ()
    num_maps: int = 16
    num_images: int = 0
    batch_size: int = 100
    strategy: str = "default"
    seed: int = 0
    checkpoint_every: int = 200
    remine: bool = False


def run_topk(config, progress=None):
    """Mines the top k of every map of a run's layers and draws Fig. 2 grids.

    Writes into `config.output_dir`: `top9_state.npz` (the mined state of
    every map: `load_top_k`), `top9_<layer>.png` (for each shown map its k
    projections beside their image patches) and `top9.json` (for each shown
    map and rank: image index, label, activation, position, box; and per
    layer, `class_summary`'s numbers under "classes").

    Args:
        config: a `TopKConfig`.
        progress: optional callable(done_batches, total_batches).

    Returns:
        dict: figures, json, state, resumed_from (batches), reused (bool),
        num_images, layers, classes (`class_summary`).

    Raises:
        Error: bad checkpoint, data, layer or map (one line).
    """
    from zfkeras.analysis import plots_a  # matplotlib only when drawing.

    if config.k < 1:
        raise Error(f"k must be >= 1, not {config.k}")
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise Error(f"{config.output_dir}: exists and is not a directory")
    # Multi-worker strategies must exist before any other TensorFlow op.
    strategy = distribute.make_strategy(config.strategy)
    with strategy.scope():
        run = runs.load_run(config.checkpoint)
    try:
        dn = deconv.Deconvnet(run.model)
    except Error as e:
        raise Error(f"{config.checkpoint}: {e}") from None
    layers = check_layers(dn, config.layers, config.checkpoint)
    maps = choose_maps(dn, layers, dict(config.maps), config.num_maps, config.seed)
    raw, info, count = load_dataset(
        run, config.dataset, config.split, config.data_dir, config.manual_dir
    )
    if config.num_images:
        count = min(count, config.num_images) if count else config.num_images
    total = -(-count // config.batch_size) if count else None

    fileio.ensure_dir(config.output_dir)
    state_path = os.path.join(config.output_dir, STATE_FILE)
    if config.remine and os.path.exists(state_path):
        os.remove(state_path)
    fingerprint = {
        "weights": weights_digest(run.model),
        "dataset": config.dataset or run.meta.get("dataset", ""),
        "split": config.split,
        "num_images": int(config.num_images),
        "batch_size": int(config.batch_size),
        "preprocessing": dataclasses.asdict(run.preprocessing),
    }
    previous = load_top_k(state_path) if os.path.isfile(state_path) else None
    batches = model_input_batches(
        raw, run.preprocessing, run.mean, config.batch_size, config.num_images
    )
    top_k = mine_top_k(
        run.model,
        batches,
        layers,
        config.k,
        strategy=strategy,
        state_path=state_path,
        checkpoint_every=config.checkpoint_every,
        fingerprint=fingerprint,
        total_batches=total,
        progress=progress,
    )
    if top_k.num_images == 0:
        raise Error(f"split {config.split!r} is empty")
    same = previous is not None and previous.fingerprint == top_k.fingerprint
    reused = same and previous.complete
    resumed = previous.batches if same and not reused else 0
    if not distribute.is_chief(strategy):
        return {"figures": [], "json": None, "state": None, "layers": layers}

    wanted = np.concatenate([top_k.image_index[layer][maps[layer]].reshape(-1) for layer in layers])
    wanted = np.unique(wanted[wanted >= 0])
    views, labels = fetch_views(raw, run.preprocessing, wanted)
    view_rows = {int(index): row for row, index in enumerate(wanted)}
    class_names = info.class_names
    record = {
        "checkpoint": config.checkpoint,
        "dataset": fingerprint["dataset"],
        "split": config.split,
        "num_images": top_k.num_images,
        "k": config.k,
        "state": STATE_FILE,
        "layers": {},
    }
    record["classes"] = class_summary(top_k, dataset_labels(raw, top_k.num_images))
    figures_written = []
    for layer in layers:
        winners = project_winners(dn, run, top_k, layer, maps[layer], views, labels, view_rows)
        entries = []
        for i, channel in enumerate(winners.channels):
            ranks = []
            for j in range(config.k):
                index = int(winners.image_index[i, j])
                if index < 0:
                    continue
                label = int(winners.labels[i, j])
                ranks.append(
                    {
                        "rank": j,
                        "image_index": index,
                        "label": label,
                        "class_name": class_names[label] if 0 <= label < len(class_names) else "",
                        "activation": float(winners.values[i, j]),
                        "position": [int(v) for v in winners.positions[i, j]],
                        "box": [int(v) for v in winners.boxes[i, j]],
                    }
                )
            entries.append({"map": int(channel), "top": ranks})
        png = f"top9_{layer}.png"
        record["layers"][layer] = {"figure": png, "maps": entries}
        title = (
            f"{layer}: top {config.k} activations of {len(winners.channels)} maps "
            f"over {top_k.num_images} {config.split} images (projection | image patch)"
        )
        figure = plots_a.top_k_figure(winners, plots_a.cell_size(dn, layer), title)
        figures_written.append(plots_a.save(figure, os.path.join(config.output_dir, png)))
    json_path = os.path.join(config.output_dir, "top9.json")
    fileio.write_json(json_path, record)
    return {
        "figures": figures_written,
        "json": json_path,
        "state": state_path,
        "resumed_from": resumed,
        "reused": reused,
        "num_images": top_k.num_images,
        "layers": layers,
        "classes": record["classes"],
    }
