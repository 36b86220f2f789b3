"""Per-layer linear probes (Zeiler & Fergus Table 7) and transfer (Tables 4-6).

Per-layer probes: the features of each of layers 1-7 of a trained model are
fixed, and a linear classifier is trained on them for a dataset (the model's
own or another one) and tested on a held-out split. The paper finds that
deeper layers give better features.

Transfer: layers 1-7 are frozen and a new softmax is trained on top of layer 7
with N training images per class; the test accuracy is reported as mean +- std
over repeats with different random draws of the N images (Tables 4-6).

Features:
- layer n of 1-5 is the rectified conv output ('relu<n>'), globally pooled
  over its positions: average pooling by default. The average of a rectified
  map says how much of a feature there is in the whole image; it is a smooth
  statistic, unlike the maximum, which one noisy position can set, and it
  keeps the feature count small (the conv maps themselves are up to
  110x110x96 at layer 1, too many dimensions for a short linear fit). 'max'
  pooling is available ("is the feature anywhere").
- layers 6 and 7 are the rectified fc outputs ('relu6', 'relu7'), as they are.
Layers missing from a model (Table 3 ablations) are skipped and named.
Every feature is standardised with the training set's mean and standard
deviation before the classifier (an affine map the classifier could absorb;
it only makes the short optimisation well conditioned).

Classifiers: 'softmax' (multinomial logistic regression) or 'svm' (linear
one-vs-rest SVM, squared hinge loss), both a Keras Dense layer with an L2
penalty trained with Adam for a fixed number of steps.
"""

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf

from zfkeras import data, fileio, runs
from zfkeras.errors import Error

POOLINGS = ("avg", "max")
CLASSIFIERS = ("softmax", "svm")
EXPERIMENTS = ("layers", "transfer")


# ---------------------------------------------------------------------------
# Which Keras layer is "layer n" of the paper.


def _has(model, name):
    return any(layer.name == name for layer in model.layers)


def layer_output_name(model, index):
    """The Keras layer whose output is the paper's layer `index` (1-7), or None.

    Layers 1-5: the rectified conv output 'relu<n>' ('conv<n>' if it has no
    separate ReLU); 6-7: 'relu6' / 'relu7' ('fc6' / 'fc7'). None when the
    model lacks the layer (a Table 3 ablation).
    """
    if not 1 <= int(index) <= 7:
        raise Error(f"layers are numbered 1-7, not {index}")
    base = f"conv{index}" if index <= 5 else f"fc{index}"
    if not _has(model, base):
        return None
    relu = f"relu{index}"
    return relu if _has(model, relu) else base


def top_feature_layer(model):
    """(layer name, note) of layer 7: relu7, else the last fc layer, else flatten.

    The note is '' for a model with fc7 and says what was used otherwise.
    """
    name = layer_output_name(model, 7)
    if name is not None:
        return name, ""
    name = layer_output_name(model, 6)
    if name is not None:
        return name, f"the model has no fc7; layer 7 is its last fc layer ({name})"
    if _has(model, "flatten"):
        return "flatten", "the model has no fc6 or fc7; layer 7 is the flattened pool5"
    raise Error(f"model {model.name!r} has neither fc layers nor a flatten layer")


def feature_model(model, names, pooling=None):
    """A model from the input to the outputs of layers `names` (shared weights).

    Args:
        model: a functional Keras model.
        names: layer names; None stands for the model's own output.
        pooling: None, or 'avg' / 'max' to pool rank-4 outputs globally.

    Returns:
        A `keras.Model` with one output per name.
    """
    outputs = []
    for name in names:
        if name is None:
            output = model.outputs[0]
        else:
            try:
                output = model.get_layer(name).output
            except ValueError:
                raise Error(f"model {model.name!r} has no layer {name!r}") from None
        if pooling and len(output.shape) == 4:
            if pooling not in POOLINGS:
                raise Error(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
            pool = (
                keras.layers.GlobalAveragePooling2D
                if pooling == "avg"
                else (keras.layers.GlobalMaxPooling2D)
            )
            output = pool(name=f"{pooling}pool_{name}")(output)
        outputs.append(output)
    return keras.Model(model.inputs[0], outputs, name=f"{model.name}_features")


# ---------------------------------------------------------------------------
# Features of a dataset.


@dataclasses.dataclass(frozen=True)
class Features:
    """Fixed features of a split: {layer key: float32 (N, D)} and int64 labels (N,)."""

    by_layer: dict
    labels: np.ndarray


def extract_features(run, dataset, layers, pooling="avg", batch_size=100, progress=None):
    """Features of layers (paper numbering) for every example of a dataset.

    Args:
        run: a `runs.Run` (its preprocessing: view, centre crop, mean).
        dataset: a tf.data.Dataset of (uint8 image, label).
        layers: {key (e.g. the paper's layer number): Keras layer name}.
        pooling: 'avg' or 'max' for conv layers.
        batch_size: images per forward pass.
        progress: optional callable(str).

    Returns:
        A `Features`.
    """
    indices = list(layers)
    model = feature_model(run.model, [layers[i] for i in indices], pooling)
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    batches = data.eval_batches(dataset, run.preprocessing, run.mean, batch_size, crops=1)
    parts = {i: [] for i in indices}
    labels = []
    for step, (images, batch_labels) in enumerate(batches, start=1):
        outputs = forward(images)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for i, value in zip(indices, outputs):
            parts[i].append(np.asarray(value, np.float32).reshape(len(value), -1))
        labels.append(batch_labels.numpy())
        if progress and step % 20 == 0:
            progress(f"features: {sum(len(b) for b in labels)} images")
    if not labels:
        raise Error("the dataset split is empty")
    return Features(
        {i: np.concatenate(p) for i, p in parts.items()}, np.concatenate(labels).astype(np.int64)
    )


def sample_per_class(labels, per_class, num_classes, rng):
    """Indices of `per_class` random examples of each class (sorted).

    Raises:
        Error: a class has fewer than `per_class` examples.
    """
    chosen = []
    for label in range(num_classes):
        where = np.flatnonzero(labels == label)
        if len(where) < per_class:
            raise Error(
                f"class {label} has {len(where)} training examples, fewer than {per_class} "
                "per class; use a larger training split or fewer per class"
            )
        chosen.append(rng.choice(where, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------------------
# The linear classifier.


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """How a linear probe is trained."""

    classifier: str = "softmax"
    steps: int = 500
    batch_size: int = 128
    learning_rate: float = 0.01
    l2: float = 1e-4


def train_linear(train_x, train_y, test_x, test_y, num_classes, config=LinearConfig(), seed=0):
    """Trains a linear classifier on fixed features; returns its test accuracy.

    The features are standardised with the training set's statistics (a
    constant feature is left unscaled). The classifier is a Keras Dense layer
    from zero weights, trained with Adam for `config.steps` steps on shuffled
    mini-batches (a convex problem, so the zero start is as good as any).

    Args:
        train_x, test_x: float (N, D) features.
        train_y, test_y: int (N,) labels in [0, num_classes).
        num_classes: number of classes.
        config: a `LinearConfig`.
        seed: shuffling seed.

    Returns:
        Test accuracy in [0, 1].
    """
    if config.classifier not in CLASSIFIERS:
        raise Error(f"unknown classifier {config.classifier!r}; valid: {', '.join(CLASSIFIERS)}")
    train_x = np.asarray(train_x, np.float32)
    test_x = np.asarray(test_x, np.float32)
    train_y = np.asarray(train_y, np.int64)
    test_y = np.asarray(test_y, np.int64)
    if len(train_x) == 0 or len(test_x) == 0:
        raise Error("a probe needs training and test examples")
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std = np.where(std > 1e-6 * max(float(std.max()), 1e-12), std, 1.0).astype(np.float32)
    train_x = (train_x - mean) / std
    test_x = (test_x - mean) / std

    inputs = keras.Input((train_x.shape[1],))
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer="zeros",
        kernel_regularizer=keras.regularizers.L2(config.l2) if config.l2 else None,
    )(inputs)
    model = keras.Model(inputs, outputs)
    if config.classifier == "softmax":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        targets = train_y
    else:
        loss = keras.losses.SquaredHinge()
        targets = np.eye(num_classes, dtype=np.float32)[train_y]  # 0/1 -> -1/+1 inside
    # Many steps per call: a linear step is cheap, the Python round trip is not.
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss=loss,
        steps_per_execution=min(config.steps, 50),
    )
    batch = min(config.batch_size, len(train_x))
    ds = data.untuned(
        tf.data.Dataset.from_tensor_slices((train_x, targets))
        .shuffle(len(train_x), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch, drop_remainder=True)
    )
    model.fit(ds, epochs=1, steps_per_epoch=config.steps, verbose=0, shuffle=False)
    correct = 0
    for start in range(0, len(test_x), 4096):  # eager calls: no predict() tracing
        scores = keras.ops.convert_to_numpy(model(test_x[start : start + 4096]))
        correct += int(np.sum(scores.argmax(axis=1) == test_y[start : start + 4096]))
    return correct / len(test_x)


# ---------------------------------------------------------------------------
# The experiments.


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """What `run_probes` does (tools/probe.py).

    Attributes:
        checkpoint: a training work dir or a .keras file.
        output_dir: where probe.png, probe.json and probe.csv go.
        dataset: the probe dataset (default: the run's own).
        train_split, test_split: the splits the classifiers train and test on.
        data_dir, manual_dir: as for `data.load`.
        experiments: 'layers' (Table 7) and/or 'transfer' (Tables 4-6).
        layers: paper layer numbers probed (1-7).
        pooling: 'avg' or 'max' for conv layers.
        probe_per_class: training images per class of the layer probes (0: the
            whole training split).
        per_class: training images per class of the transfer runs.
        repeats: random draws per transfer setting.
        linear: a `LinearConfig`.
        batch_size: images per forward pass.
        seed: sampling and shuffling seed.
    """

    checkpoint: str
    output_dir: str
    dataset: str = ""
    train_split: str = "train"
    test_split: str = "test"
    data_dir: str = ""
    manual_dir: str = ""
    experiments: tuple = EXPERIMENTS
    layers: tuple = (1, 2, 3, 4, 5, 6, 7)
    pooling: str = "avg"
    probe_per_class: int = 0
    per_class: tuple = (5, 10, 30)
    repeats: int = 5
    linear: LinearConfig = LinearConfig()
    batch_size: int = 100
    seed: int = 0


def _check(config):
    unknown = sorted(set(config.experiments) - set(EXPERIMENTS))
    if unknown or not config.experiments:
        raise Error(f"experiments must be among {', '.join(EXPERIMENTS)}, not {unknown}")
    if config.pooling not in POOLINGS:
        raise Error(f"unknown pooling {config.pooling!r}; valid: {', '.join(POOLINGS)}")
    bad = [n for n in config.layers if not 1 <= int(n) <= 7]
    if bad or not config.layers:
        raise Error(f"layers are numbered 1-7, not {bad or 'none'}")
    if config.repeats < 1:
        raise Error(f"repeats must be >= 1, not {config.repeats}")
    if any(int(n) < 1 for n in config.per_class) or (
        "transfer" in config.experiments and not config.per_class
    ):
        raise Error(f"per_class must be positive integers, not {list(config.per_class)}")
    if config.probe_per_class < 0:
        raise Error(f"probe_per_class must be >= 0, not {config.probe_per_class}")
    if config.linear.steps < 1:
        raise Error(f"steps must be >= 1, not {config.linear.steps}")
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise Error(f"{config.output_dir}: exists and is not a directory")


def probe_layers(run, train, test, layers, num_classes, config, progress=None):
    """Table 7: one linear classifier per layer. Returns a list of row dicts."""
    rng = np.random.default_rng(config.seed)
    chosen = None
    if config.probe_per_class:
        chosen = sample_per_class(train.labels, config.probe_per_class, num_classes, rng)
    rows = []
    for index, name in sorted(layers.items()):
        x, y = train.by_layer[index], train.labels
        if chosen is not None:
            x, y = x[chosen], y[chosen]
        accuracy = train_linear(
            x, y, test.by_layer[index], test.labels, num_classes, config.linear, config.seed
        )
        rows.append({"layer": index, "name": name, "dims": int(x.shape[1]), "accuracy": accuracy})
        if progress:
            progress(f"layer {index} ({name}, {x.shape[1]} features): accuracy {accuracy:.3f}")
    return rows


def transfer(train, test, layer, num_classes, config, progress=None):
    """Tables 4-6: a new softmax on frozen layer-7 features, N images per class.

    Returns:
        A list of dicts per N: per_class, accuracies (one per repeat), mean, std.
    """
    rows = []
    for per_class in config.per_class:
        accuracies = []
        for repeat in range(config.repeats):
            rng = np.random.default_rng([config.seed, int(per_class), repeat])
            chosen = sample_per_class(train.labels, int(per_class), num_classes, rng)
            accuracies.append(
                train_linear(
                    train.by_layer[layer][chosen],
                    train.labels[chosen],
                    test.by_layer[layer],
                    test.labels,
                    num_classes,
                    dataclasses.replace(config.linear, classifier="softmax"),
                    seed=config.seed + repeat,
                )
            )
        rows.append(
            {
                "per_class": int(per_class),
                "accuracies": accuracies,
                "mean": float(np.mean(accuracies)),
                "std": float(np.std(accuracies)),
            }
        )
        if progress:
            progress(
                f"transfer, {per_class} per class: {rows[-1]['mean']:.3f} +- {rows[-1]['std']:.3f}"
            )
    return rows


def run_probes(config, progress=None):
    """Runs the probe experiments of a trained model and writes PNG, JSON and CSV.

    Writes probe.png (accuracy per layer; transfer accuracy against images
    per class), probe.json and probe.csv into `config.output_dir`.

    Returns:
        dict with the file paths and the JSON record.
    """
    from zfkeras.analysis import plots_b

    _check(config)
    run = runs.load_run(config.checkpoint)
    dataset = config.dataset or run.meta.get("dataset", "")
    if not dataset:
        raise Error(f"{config.checkpoint}: a bare .keras file needs --dataset")

    wanted, skipped = {}, []
    if "layers" in config.experiments:
        for index in sorted(set(int(n) for n in config.layers)):
            name = layer_output_name(run.model, index)
            if name is None:
                skipped.append(index)
            else:
                wanted[index] = name
    # Transfer trains on layer 7, or on what stands in for it (top_feature_layer).
    top_name, top_note = top_feature_layer(run.model)
    top_key = 7 if layer_output_name(run.model, 7) == top_name else "top"
    if "transfer" in config.experiments:
        wanted.setdefault(top_key, top_name)
    if not wanted:
        raise Error(f"{config.checkpoint}: the model has none of layers {list(config.layers)}")

    loaded = {}
    for role, split in (("train", config.train_split), ("test", config.test_split)):
        ds, info = data.load(
            dataset,
            split,
            config.data_dir or None,
            config.manual_dir or None,
            channels=run.preprocessing.channels,
        )
        if progress:
            progress(f"{role}: features of {dataset} {split}")
        loaded[role] = extract_features(
            run, ds, wanted, config.pooling, config.batch_size, progress
        )
    num_classes = info.num_classes
    for role, features in loaded.items():
        if features.labels.max() >= num_classes or features.labels.min() < 0:
            raise Error(f"{dataset}: {role} labels outside 0-{num_classes - 1}")

    record = {
        "checkpoint": config.checkpoint,
        "dataset": dataset,
        "train_split": config.train_split,
        "test_split": config.test_split,
        "num_classes": num_classes,
        "chance": 1.0 / num_classes,
        "train_examples": int(len(loaded["train"].labels)),
        "test_examples": int(len(loaded["test"].labels)),
        "pooling": config.pooling,
        "linear": dataclasses.asdict(config.linear),
        "seed": config.seed,
    }
    if "layers" in config.experiments:
        probed = set(int(n) for n in config.layers)
        layer_rows = {k: v for k, v in wanted.items() if k in probed}
        record["layers"] = probe_layers(
            run, loaded["train"], loaded["test"], layer_rows, num_classes, config, progress
        )
        record["probe_per_class"] = config.probe_per_class
        record["skipped_layers"] = skipped
    if "transfer" in config.experiments:
        record["transfer"] = {
            "layer": top_name,
            "note": top_note,
            "repeats": config.repeats,
            "results": transfer(
                loaded["train"], loaded["test"], top_key, num_classes, config, progress
            ),
        }

    fileio.ensure_dir(config.output_dir)
    paths = {
        "figure": os.path.join(config.output_dir, "probe.png"),
        "json": os.path.join(config.output_dir, "probe.json"),
        "csv": os.path.join(config.output_dir, "probe.csv"),
    }
    fileio.write_json(paths["json"], record)
    fileio.write_text(paths["csv"], _csv(record))
    plots_b.save(plots_b.probe_figure(record), paths["figure"])
    return {"paths": paths, "record": record}


def _csv(record):
    lines = ["experiment,layer,name,per_class,repeat,accuracy"]
    for row in record.get("layers", []):
        lines.append(f"layers,{row['layer']},{row['name']},,,{row['accuracy']:.6f}")
    if "transfer" in record:
        name = record["transfer"]["layer"]
        for row in record["transfer"]["results"]:
            for repeat, accuracy in enumerate(row["accuracies"]):
                lines.append(f"transfer,7,{name},{row['per_class']},{repeat},{accuracy:.6f}")
    return "\n".join(lines) + "\n"
