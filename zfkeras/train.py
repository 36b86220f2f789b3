"""Training and evaluation as in Zeiler & Fergus Section 3.

`train_and_evaluate(config)` trains a ZFNet or AlexNet with SGD (momentum 0.9),
the learning rate lowered when the validation error plateaus (or on an
explicit schedule), checkpoints every epoch (re-running resumes), keeps the
snapshot epochs for the feature-evolution figure, logs to TensorBoard, saves
the final model with its preprocessing, and evaluates it with 1 and 10 crops.
"""

import dataclasses
import json
import math
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from zfkeras import data, distribute, evaluation, fileio, models, runs
from zfkeras.errors import Error

LR_SCHEDULES = ("plateau", "step", "cosine", "constant")
# Fields that may change when a run is resumed with the same work dir.
_RESUMABLE_CHANGES = ("epochs", "verbose", "snapshot_epochs", "eval_crops", "eval_batch_size")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (written to config.json)."""

    workdir: str
    # Data.
    dataset: str = "fashion_mnist"
    data_dir: str = ""
    manual_dir: str = ""
    download: bool = False
    train_split: str = "train"
    val_split: str = "test"
    test_split: str = "test"
    resize_size: int = 256
    crop_size: int = 224
    channels: int = 0
    input_scale: float = 1.0
    cache: bool = False
    shuffle_buffer: int = 10000
    # Model.
    architecture: str = "zfnet"
    width: float = 1.0
    fc_units: int = 4096
    conv_widths: tuple = (384, 384, 256)
    remove: tuple = ()
    dropout: float = 0.5
    filter_rms: float = 0.1
    init: str = "paper"
    # Optimisation.
    batch_size: int = 128
    epochs: int = 70
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "plateau"
    lr_factor: float = 0.1
    lr_patience: int = 3
    lr_boundaries: tuple = ()
    min_learning_rate: float = 1e-5
    # Bookkeeping.
    snapshot_epochs: tuple = (1, 2, 5, 10, 20, 30, 40, 64)
    eval_crops: tuple = (1, 10)
    evolution_maps: int = 4
    eval_batch_size: int = 100
    seed: int = 0
    deterministic: bool = False
    strategy: str = "default"
    tpu_address: str = ""
    verbose: int = -1

    def __post_init__(self):
        if self.architecture not in models.ARCHITECTURES:
            raise Error(
                f"unknown architecture {self.architecture!r}; valid: "
                f"{', '.join(models.ARCHITECTURES)}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise Error(
                f"unknown lr_schedule {self.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}"
            )
        if self.lr_schedule == "step" and not self.lr_boundaries:
            raise Error("lr_schedule=step needs lr_boundaries (epochs at which to lower it)")
        for crops in self.eval_crops:
            if crops not in (1, 10):
                raise Error(f"eval_crops must be 1 and/or 10, not {crops}")


def _check_workdir(config):
    """Creates the work dir, or checks that it holds a compatible run."""
    workdir = config.workdir
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise Error(f"{workdir}: work dir exists and is not a directory")
    fileio.ensure_dir(workdir)
    config_path = os.path.join(workdir, runs.CONFIG_FILE)
    entries = [e for e in os.listdir(workdir) if not e.startswith(".")]
    if not os.path.isfile(config_path):
        if entries and entries != ["flags.txt"]:
            raise Error(
                f"{workdir}: not a zfkeras work dir (it holds other files); "
                "choose a new or empty --workdir"
            )
        return False
    try:
        with open(config_path) as f:
            previous = json.load(f)
    except (OSError, ValueError) as e:
        raise Error(f"{config_path}: unreadable ({e})") from None
    current = json.loads(json.dumps(dataclasses.asdict(config)))
    # A run from an older zfkeras lacks newer fields: they had their defaults.
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(TrainConfig)
        if f.default is not dataclasses.MISSING
    }
    defaults = json.loads(json.dumps(defaults))
    differ = sorted(
        k
        for k in set(previous) | set(current)
        if k not in _RESUMABLE_CHANGES and previous.get(k, defaults.get(k)) != current.get(k)
    )
    if differ:
        raise Error(
            f"{workdir}: holds a run with a different config ({', '.join(differ)}); "
            "use a new --workdir or the same flags to resume"
        )
    return True


def build_model(config, num_classes, channels):
    """The model a config describes."""
    kwargs = dict(
        num_classes=num_classes,
        input_shape=(config.crop_size, config.crop_size, channels),
        width=config.width,
        fc_units=config.fc_units,
        conv_widths=tuple(config.conv_widths),
        remove=tuple(config.remove),
        dropout=config.dropout,
        filter_rms=config.filter_rms or None,
        init=config.init,
        seed=config.seed,
    )
    try:
        return models.build(config.architecture, **kwargs)
    except ValueError as e:
        raise Error(str(e)) from None


def _lr_callback(config):
    if config.lr_schedule == "plateau":
        return keras.callbacks.ReduceLROnPlateau(
            monitor="val_accuracy",
            mode="max",
            factor=config.lr_factor,
            patience=config.lr_patience,
            min_lr=config.min_learning_rate,
            verbose=0,
        )
    if config.lr_schedule == "constant":
        return None
    base = config.learning_rate

    def schedule(epoch, lr):
        if config.lr_schedule == "step":
            passed = sum(1 for b in config.lr_boundaries if epoch >= b)
            return base * config.lr_factor**passed
        return config.min_learning_rate + 0.5 * (base - config.min_learning_rate) * (
            1 + math.cos(math.pi * epoch / max(1, config.epochs))
        )

    return keras.callbacks.LearningRateScheduler(schedule)


class _NonFiniteLoss(Exception):
    pass


class _StopOnNonFinite(keras.callbacks.Callback):
    """Raises (before the epoch's checkpoint) when the loss is NaN or Inf."""

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise _NonFiniteLoss(f"epoch {self.epoch + 1}, batch {batch + 1}")


class _Snapshots(keras.callbacks.Callback):
    """Saves snapshots/epoch_NNN.keras at the chosen epochs (Fig. 4)."""

    def __init__(self, workdir, epochs):
        super().__init__()
        self.workdir = workdir
        self.epochs = set(int(e) for e in epochs)

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 in self.epochs:
            fileio.save_model(self.model, runs.snapshot_path(self.workdir, epoch + 1))


class _FilterImages(keras.callbacks.Callback):
    """Writes the first-layer filters to TensorBoard as an image each epoch."""

    def __init__(self, log_dir):
        super().__init__()
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "filters"))

    def on_epoch_end(self, epoch, logs=None):
        grid = filter_grid(self.model.get_layer("conv1").kernel.numpy())
        with self.writer.as_default():
            tf.summary.image("conv1_filters", grid[None], step=epoch + 1)
        self.writer.flush()


def filter_grid(kernel, pad=1):
    """First-layer filters (kh, kw, C, N) as one float image in [0, 1].

    Each filter is scaled to its own range, as in the paper's figures.
    """
    kh, kw, channels, count = kernel.shape
    columns = int(math.ceil(math.sqrt(count)))
    rows = int(math.ceil(count / columns))
    grid = np.ones((rows * (kh + pad) + pad, columns * (kw + pad) + pad, 3), np.float32)
    for index in range(count):
        w = kernel[..., index]
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-12)
        if channels == 1:
            w = np.repeat(w, 3, axis=-1)
        r, c = divmod(index, columns)
        y, x = pad + r * (kh + pad), pad + c * (kw + pad)
        grid[y : y + kh, x : x + kw] = w[..., :3]
    return grid


def _evolution_callback(model, val_ds, config, log_dir, count=16):
    """Fig. 4 as training runs: projections of the first maps of each conv layer."""
    from zfkeras.analysis.evolution import EvolutionCallback

    images = next(iter(val_ds.take(1)))[0][:count]
    layers = [f"conv{i}" for i in range(1, 6) if f"conv{i}" in {x.name for x in model.layers}]
    channels = {
        name: range(min(config.evolution_maps, model.get_layer(name).filters)) for name in layers
    }
    return EvolutionCallback(layers, channels, images, log_dir, epochs=config.snapshot_epochs)


def _load_split(config, split, shuffle_files=False, channels=None):
    return data.load(
        config.dataset,
        split,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        download=config.download,
        shuffle_files=shuffle_files,
        channels=channels,
        seed=config.seed,
    )


def _verbosity(config):
    if config.verbose >= 0:
        return config.verbose
    return 1 if sys.stdout.isatty() else 2


def train_and_evaluate(config, flags_text=None):
    """Trains the model of `config` in `config.workdir` and evaluates it.

    Re-running with the same config resumes from the last finished epoch.

    Args:
        config: a `TrainConfig`.
        flags_text: the calling tool's flags as a flagfile, kept as flags.txt.

    Returns:
        dict with the evaluation results, wall time and file locations.

    Raises:
        Error: bad data, work dir or config; a NaN/Inf loss.
    """
    start = time.time()
    resumed = _check_workdir(config)
    workdir = config.workdir
    # Multi-worker strategies must exist before any other TensorFlow op.
    strategy = distribute.make_strategy(config.strategy, config.tpu_address or None)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    chief = distribute.is_chief(strategy)
    if chief:
        fileio.write_json(os.path.join(workdir, runs.CONFIG_FILE), dataclasses.asdict(config))
        if flags_text is not None:
            fileio.write_text(os.path.join(workdir, "flags.txt"), flags_text)

    train_raw, info = _load_split(config, config.train_split, shuffle_files=True)
    verbose = _verbosity(config) if chief else 0
    channels = config.channels or info.channels
    preprocessing = data.Preprocessing(
        config.resize_size, config.crop_size, channels, config.input_scale
    )
    mean_path = os.path.join(workdir, runs.MEAN_FILE)
    if os.path.isfile(mean_path):
        mean = np.load(mean_path)
    else:
        logging.info("Computing the mean image of %s", config.train_split)
        unshuffled, _ = _load_split(config, config.train_split, channels=channels)
        mean = data.compute_mean(unshuffled, preprocessing)
    if chief:
        runs.write_run_files(
            workdir,
            preprocessing,
            mean,
            info,
            {"architecture": config.architecture, "train_split": config.train_split},
        )

    train_ds = data.train_batches(
        train_raw,
        preprocessing,
        mean,
        config.batch_size,
        seed=config.seed,
        shuffle_buffer=config.shuffle_buffer,
        cache=config.cache,
    )
    val_raw, _ = _load_split(config, config.val_split, channels=channels)
    val_ds = data.eval_batches(
        val_raw, preprocessing, mean, config.eval_batch_size, 1, cache=config.cache
    )
    train_ds = distribute.distribute_dataset_options(train_ds, strategy)
    val_ds = distribute.distribute_dataset_options(val_ds, strategy)

    with strategy.scope():
        model = build_model(config, info.num_classes, channels)
        optimizer = keras.optimizers.SGD(
            learning_rate=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay or None,
        )
        k = min(5, info.num_classes)
        model.compile(
            optimizer=optimizer,
            loss="sparse_categorical_crossentropy",
            metrics=[
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                keras.metrics.SparseTopKCategoricalAccuracy(k=k, name=f"top{k}"),
            ],
        )

    backup_dir = distribute.backup_dir(workdir, strategy)
    callbacks = [
        _StopOnNonFinite(),
        keras.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False),
    ]
    lr_callback = _lr_callback(config)
    if lr_callback is not None:
        callbacks.append(lr_callback)
    if chief:
        log_dir = os.path.join(workdir, "tensorboard")
        callbacks += [
            _Snapshots(workdir, config.snapshot_epochs),
            keras.callbacks.TensorBoard(log_dir, write_graph=False, update_freq="epoch"),
            _FilterImages(log_dir),
        ]
        if config.evolution_maps:
            callbacks.append(_evolution_callback(model, val_ds, config, log_dir))
    try:
        history = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=config.epochs,
            callbacks=callbacks,
            verbose=verbose,
        )
    except _NonFiniteLoss as e:
        raise Error(
            f"loss became NaN/Inf at {e}; stopped, the last good epoch is kept in "
            f"{backup_dir}; lower --learning_rate"
        ) from None
    except KeyboardInterrupt:
        raise Error(
            f"interrupted; finished epochs are saved in {backup_dir}: run the same "
            "command again to resume"
        ) from None

    results = {"workdir": workdir, "resumed": resumed, "history": _history(history)}
    if chief:
        fileio.save_model(model, os.path.join(workdir, runs.MODEL_FILE))
    test_raw_cache = {}
    for crops in config.eval_crops:
        test_raw = test_raw_cache.setdefault(
            "ds", _load_split(config, config.test_split, channels=channels)[0]
        )
        results[f"test_{crops}crop"] = evaluation.evaluate(
            model, test_raw, preprocessing, mean, crops, config.eval_batch_size
        )
    results["wall_time_s"] = round(time.time() - start, 1)
    if chief:
        fileio.write_json(os.path.join(workdir, "eval.json"), results)
    return results


def _history(history):
    out = {}
    for key, values in (history.history or {}).items():
        out[key] = [float(v) for v in values]
    return out
