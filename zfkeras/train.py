"""Training and evaluation as in Zeiler & Fergus Section 3.

`train_and_evaluate(config)` trains a ZFNet or AlexNet with SGD (momentum 0.9),
the learning rate lowered when the validation error plateaus (or on an
explicit schedule), keeps the snapshot epochs for the feature-evolution
figure, logs to TensorBoard, saves the final model with its preprocessing,
and evaluates it with 1 and 10 crops.

Crash safety: the whole training state is checkpointed (`zfkeras.checkpoint`,
atomically) every `checkpoint_every_steps` batches and at each epoch end, and
re-running the same command continues from the last checkpoint at the exact
batch: each epoch's batches (file order, shuffle, crops, flips) are a pure
function of (seed, epoch), so a resumed run trains on the batches an
uninterrupted one would, and with `deterministic=True` ends with bit-identical
weights. SIGINT or SIGTERM saves a checkpoint at the current batch and stops
(`Interrupted`); a NaN/Inf loss stops without saving the bad state.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from zfkeras import checkpoint, data, distribute, evaluation, fileio, models, optimizers, runs
from zfkeras.errors import Error

LR_SCHEDULES = ("plateau", "step", "cosine", "constant")
# Fields that may change when a run is resumed with the same work dir.
_RESUMABLE_CHANGES = (
    "epochs",
    "verbose",
    "snapshot_epochs",
    "eval_crops",
    "eval_batch_size",
    "checkpoint_every_steps",
)


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
    border: float = 0.0
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
    # Batches between checkpoints (0: only at epoch ends); a kill loses at most these.
    checkpoint_every_steps: int = 100
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
        if self.checkpoint_every_steps < 0:
            raise Error(f"checkpoint_every_steps must be >= 0, not {self.checkpoint_every_steps}")


class Interrupted(Error):
    """Training was stopped by a signal (SIGINT, SIGTERM) after a checkpoint.

    Attributes:
        exit_code: the conventional shell status, 128 + the signal number.
    """

    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


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
    """Raises (before any checkpoint of that state) when the loss is NaN or Inf.

    It must come first among the callbacks, so that `_Checkpointer` never
    sees the batch that broke the weights.
    """

    def __init__(self, start=None):
        super().__init__()
        self.start = start or checkpoint.Position()
        self.epoch = 0
        self.offset = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.offset = self.start.step if epoch == self.start.epoch else 0

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise _NonFiniteLoss(f"epoch {self.epoch + 1}, batch {self.offset + batch + 1}")


class _StopAt(Exception):
    """Raised by `_Checkpointer` after saving on a signal."""

    def __init__(self, position, signum):
        super().__init__(position)
        self.position = position
        self.signum = signum


class _Checkpointer(keras.callbacks.Callback):
    """Saves the training state every `every_steps` batches and at epoch ends.

    It also finishes a resumed epoch early: `fit` runs `steps_per_epoch`
    batches in every epoch, but the first epoch of a run resumed at step s
    has only `steps_per_epoch - s` left in the stream, so after those this
    callback sets `stop_training` (which ends the epoch after its validation)
    and clears it again in `on_epoch_end`, so the next epochs run. It must be
    the last callback: its epoch-end checkpoint then includes what the other
    callbacks changed (the plateau schedule's learning rate and counters).

    Args:
        folder: the checkpoint folder.
        start: the `checkpoint.Position` the run starts at.
        steps_per_epoch: batches per epoch.
        every_steps: batches between checkpoints within an epoch (0: none).
        signals: dict whose "signum" a signal handler sets; checked after
            each batch.
        lr_callback: the learning-rate callback whose state is checkpointed.
        saved: the position of the checkpoint on disk, if any.
        restored_extra: the callback state of the checkpoint resumed from.
        elapsed: callable giving the run's wall time so far (s), kept in
            each checkpoint.
    """

    def __init__(
        self,
        folder,
        start,
        steps_per_epoch,
        every_steps,
        signals,
        lr_callback=None,
        saved=None,
        restored_extra=None,
        elapsed=None,
    ):
        super().__init__()
        self.folder = folder
        self.start = start
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.signals = signals
        self.lr_callback = lr_callback
        self.saved = saved
        self.restored_extra = restored_extra or {}
        self.elapsed = elapsed
        # Per-epoch logs of the whole run, kept in every checkpoint so that a
        # resumed run's history starts at epoch 1, not at the resumed epoch.
        self.history = {
            key: list(values) for key, values in self.restored_extra.get("history", {}).items()
        }
        self.save_seconds = []
        self._epoch = start.epoch
        self._offset = 0
        self._cut_short = False

    def on_train_begin(self, logs=None):
        # ReduceLROnPlateau resets its counters in its own on_train_begin,
        # which has run by now.
        _set_plateau_state(self.lr_callback, self.restored_extra.get("plateau"))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._offset = self.start.step if epoch == self.start.epoch else 0

    def on_train_batch_end(self, batch, logs=None):
        step = self._offset + batch + 1
        if step >= self.steps_per_epoch:
            if self._offset:
                self.model.stop_training = True
                self._cut_short = True
            return  # the epoch-end checkpoint follows the validation
        position = checkpoint.Position(self._epoch, step)
        if self.signals.get("signum") is not None:
            self._save(position)
            raise _StopAt(position, self.signals["signum"])
        if self.every_steps and step % self.every_steps == 0:
            self._save(position)

    def on_epoch_end(self, epoch, logs=None):
        if self._cut_short:
            self.model.stop_training = False
            self._cut_short = False
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        position = checkpoint.Position(epoch + 1, 0)
        self._save(position)
        if self.signals.get("signum") is not None:
            raise _StopAt(position, self.signals["signum"])

    def _save(self, position):
        start = time.monotonic()
        extra = {"plateau": _plateau_state(self.lr_callback), "history": self.history}
        if self.elapsed is not None:
            extra["elapsed_s"] = self.elapsed()
        checkpoint.save(self.folder, self.model, position, self.steps_per_epoch, extra)
        self.saved = position
        self.save_seconds.append(time.monotonic() - start)


def _plateau_state(callback):
    if not isinstance(callback, keras.callbacks.ReduceLROnPlateau):
        return None
    return {
        "wait": int(callback.wait),
        "best": None if callback.best is None else float(callback.best),
        "cooldown_counter": int(callback.cooldown_counter),
    }


def _set_plateau_state(callback, state):
    if state and isinstance(callback, keras.callbacks.ReduceLROnPlateau):
        callback.wait = int(state["wait"])
        callback.best = None if state["best"] is None else float(state["best"])
        callback.cooldown_counter = int(state["cooldown_counter"])


@contextlib.contextmanager
def _signals_caught(enabled):
    """Turns SIGINT/SIGTERM into a flag that `_Checkpointer` acts on.

    The first signal only sets the flag (the current batch finishes, a
    checkpoint is saved, training stops); the handlers that were there before
    come back at once, so a second Ctrl-C interrupts immediately.

    Yields:
        A dict whose "signum" is set when a signal arrives.
    """
    state = {"signum": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {}

    def handler(signum, frame):
        state["signum"] = signum
        for number, old in previous.items():
            signal.signal(number, old)

    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, handler)
    try:
        yield state
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


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


def _load_split(config, split, shuffle_files=False, channels=None, seed=None):
    return data.load(
        config.dataset,
        split,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        download=config.download,
        shuffle_files=shuffle_files,
        channels=channels,
        seed=config.seed if seed is None else seed,
    )


def _verbosity(config):
    if config.verbose >= 0:
        return config.verbose
    return 1 if sys.stdout.isatty() else 2


def epoch_seed(seed, epoch):
    """The seed of one epoch's file order, shuffle and augmentation."""
    state = np.random.SeedSequence([int(seed) % 2**32, int(epoch)]).generate_state(1)
    return int(state[0] >> 1)


def steps_per_epoch(config):
    """Training batches per epoch (the last incomplete batch is dropped).

    Raises:
        Error: the training split has fewer examples than one batch.
    """
    raw, _ = _load_split(config, config.train_split)
    count = int(raw.cardinality())
    if count < 0:  # unknown: count once, without decoding
        count = int(
            raw.map(lambda *example: tf.constant(1, tf.int64)).reduce(
                tf.constant(0, tf.int64), lambda total, one: total + one
            )
        )
    steps = count // config.batch_size
    if steps < 1:
        raise Error(
            f"training split {config.train_split!r} has {count} examples, fewer than "
            f"one batch (batch_size {config.batch_size})"
        )
    return steps


def train_stream(config, preprocessing, mean, steps, start, epochs=None):
    """The training batches from `start` to the last epoch, as one dataset.

    Each example is `data.augment`ed (mean subtraction, random crop and
    flip) with a stateless seed, so each epoch's batches are a pure
    function of (config.seed, epoch), independent of what ran before in the
    process: the epoch's file order and shuffle use `epoch_seed(seed, epoch)`,
    and each example's crop and flip use stateless random ops seeded by that
    seed and the example's place in the epoch. A run resumed at
    (epoch e, step s) therefore gets exactly the batches an uninterrupted run
    trains on from there. The s skipped batches are read (the shuffle needs
    them) but not augmented, nor viewed when the raw images are small
    (`_raw_fits_in_view`).

    Args:
        config: a `TrainConfig`.
        preprocessing: a `data.Preprocessing`.
        mean: float32 (resize, resize, C) mean view.
        steps: batches per epoch (`steps_per_epoch`).
        start: the `checkpoint.Position` to start at.
        epochs: last epoch (exclusive); default `config.epochs`.

    Returns:
        A dataset of (float32 images (B, crop, crop, C), int64 labels (B,)),
        `steps` batches per epoch (fewer for a resumed first epoch), of
        unknown cardinality (with a known one Keras starts the stream anew,
        and prefetches from it, after the last epoch; `fit` takes
        `steps_per_epoch=steps`).
    """
    epochs = config.epochs if epochs is None else epochs
    batch = config.batch_size
    mean = tf.constant(mean, tf.float32)

    def views(raw):
        return raw.map(
            lambda image, label: (data.view(image, preprocessing), label),
            num_parallel_calls=data.PARALLEL_CALLS,
        )

    def raw(seed):
        return _load_split(config, config.train_split, shuffle_files=True, seed=seed)[0]

    cached = None
    if config.cache:
        # One cache for all epochs (its file order is fixed by config.seed).
        cached = _fresh_per_iterator(lambda: views(raw(config.seed))).cache()

    def epoch_batches(epoch, skip):
        seed = epoch_seed(config.seed, epoch)
        if cached is not None:
            source, view_later = cached, False
        else:
            source = raw(seed)
            view_later = _raw_fits_in_view(source, preprocessing)
            if not view_later:
                source = views(source)
        ds = source.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        ds = ds.take(steps * batch).enumerate().skip(skip * batch)

        def augment(index, example):
            image, label = example
            if view_later:
                image = data.view(image, preprocessing)
            example_seed = tf.stack([tf.constant(seed, tf.int64), index])
            return data.augment(image, mean, preprocessing, example_seed), label

        ds = ds.map(augment, num_parallel_calls=data.PARALLEL_CALLS)
        return ds.batch(batch, drop_remainder=True)

    stream = None
    for epoch in range(start.epoch, epochs):
        skip = start.step if epoch == start.epoch else 0
        part = _fresh_per_iterator(lambda epoch=epoch, skip=skip: epoch_batches(epoch, skip))
        stream = part if stream is None else stream.concatenate(part)
    if stream is None:
        raise Error(f"nothing to train: the run is at epoch {start.epoch} of {epochs}")
    return data.untuned(stream.prefetch(data.PREFETCH_BATCHES))


def _raw_fits_in_view(raw, preprocessing):
    """Whether raw images are no bigger than their views (fixed-size datasets
    such as Fashion-MNIST or CIFAR at the paper's upscaling).

    Such images are shuffled before the view is made: the shuffle buffer is
    then smaller, and a resumed epoch skips its done batches without making
    their views. The batches are the same either way (the shuffle's order
    does not depend on the values, and the view is per image); images of
    unknown or larger size are shuffled as views to bound the buffer.
    """
    shape = raw.element_spec[0].shape
    if not shape.is_fully_defined():
        return False
    size = preprocessing.resize_size
    return shape.num_elements() <= size * size * preprocessing.channels


def _fresh_per_iterator(make):
    """A dataset that runs `make()` anew for every iterator over it.

    Some input stages keep state between iterations of one dataset object:
    file shuffling with `reshuffle_each_iteration=True` (`data.load`) gives
    each new iterator the next order. Keras under a distribution strategy
    opens the training data once just to build the model, so without this the
    order would depend on how many iterators came before. Built inside
    `flat_map`, the stages are created for each iterator and always give
    their first order.
    """
    return tf.data.Dataset.from_tensors(np.int64(0)).flat_map(lambda _: make())


def _restore(model, folder, strategy, steps):
    """Restores the newest checkpoint of `folder` into `model`.

    Returns:
        (the Position to start at, the restored file or None, its callback
        state dict).
    """
    fileio.remove_stale_temps(folder)
    loaded = checkpoint.load(folder)
    if loaded is None:
        old = checkpoint.keras_backup_position(folder)
        _agree(strategy, folder, old or checkpoint.Position())
        if old is None:
            return checkpoint.Position(), None, {}
        # A work dir of an older zfkeras: weights and optimizer state, at an
        # epoch boundary (its batch order differs from the current one).
        checkpoint.restore_keras_backup(model, folder)
        return old, os.path.join(folder, checkpoint.KERAS_BACKUP_WEIGHTS), {}
    agreed = _agree(strategy, folder, loaded.position)
    if agreed == checkpoint.Position() != loaded.position:
        return agreed, None, {}
    if agreed != loaded.position:
        loaded = checkpoint.read(os.path.join(folder, checkpoint.PREVIOUS))
    position = loaded.position
    if position.step and int(loaded.state["steps_per_epoch"]) != steps:
        raise Error(
            f"{loaded.path}: saved at {position.describe()} of "
            f"{loaded.state['steps_per_epoch']} batches per epoch, but the training split "
            f"now gives {steps}; use a new --workdir"
        )
    checkpoint.restore(model, loaded)
    return position, loaded.path, loaded.state.get("extra", {})


def _agree(strategy, folder, position):
    """Makes every worker of a multi-worker run resume at the same position.

    Workers save at the same batches, but a kill can fall between two
    workers' renames, leaving one a checkpoint ahead; that worker then takes
    its previous checkpoint, which is the others' latest.

    Returns:
        The position this worker must restore.

    Raises:
        Error: the workers' checkpoints cannot be matched.
    """
    if distribute.num_workers(strategy) < 2:
        return position
    here = _global_step(position)
    everyone = distribute.all_gather_int(strategy, here)
    target = min(everyone)
    if here == target:
        return position
    if target == 0:
        logging.warning("workers disagree (%s): starting from scratch", everyone)
        return checkpoint.Position()
    previous_path = os.path.join(folder, checkpoint.PREVIOUS)
    if os.path.exists(previous_path):
        previous = checkpoint.read(previous_path).position
        if _global_step(previous) == target:
            logging.warning("workers disagree (%s): resuming at %s", everyone, previous)
            return previous
    raise Error(
        f"{folder}: this worker's checkpoint is at {position.describe()}, the other "
        "workers' are older and cannot be matched; restart with a new --workdir"
    )


def _global_step(position):
    # Epoch and step packed in one integer that orders positions.
    return position.epoch * 2**32 + position.step


def train_and_evaluate(config, flags_text=None, report=None):
    """Trains the model of `config` in `config.workdir` and evaluates it.

    Re-running with the same config resumes from the last checkpoint, at the
    exact batch it was taken at.

    Args:
        config: a `TrainConfig`.
        flags_text: the calling tool's flags as a flagfile, kept as flags.txt.
        report: optional callable taking a one-line status message (where a
            run resumes).

    Returns:
        dict with the evaluation results, wall time and file locations.

    Raises:
        Interrupted: SIGINT or SIGTERM (a checkpoint was saved first).
        Error: bad data, work dir or config; a NaN/Inf loss; a write failure.
    """
    start_time = time.time()
    report = report or (lambda message: logging.info("%s", message))
    resumed = _check_workdir(config)
    workdir = config.workdir
    # Multi-worker strategies must exist before any other TensorFlow op.
    strategy = distribute.make_strategy(config.strategy, config.tpu_address or None)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    chief = distribute.is_chief(strategy)
    if chief:
        # What writers killed mid-write left (the outputs themselves are intact).
        for folder in (workdir, os.path.join(workdir, runs.SNAPSHOT_DIR)):
            fileio.remove_stale_temps(folder)
        fileio.write_json(os.path.join(workdir, runs.CONFIG_FILE), dataclasses.asdict(config))
        if flags_text is not None:
            fileio.write_text(os.path.join(workdir, "flags.txt"), flags_text)

    _, info = _load_split(config, config.train_split, shuffle_files=True)
    channels = config.channels or info.channels
    preprocessing = data.Preprocessing(
        config.resize_size, config.crop_size, channels, config.input_scale, config.border
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
    steps = steps_per_epoch(config)

    val_raw, _ = _load_split(config, config.val_split, channels=channels)
    val_ds = data.eval_batches(
        val_raw, preprocessing, mean, config.eval_batch_size, 1, cache=config.cache
    )
    val_ds = distribute.distribute_dataset_options(val_ds, strategy)

    folder = distribute.backup_dir(workdir, strategy)
    with strategy.scope():
        model = build_model(config, info.num_classes, channels)
        optimizer = optimizers.SGD(
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
        start, restored_from, extra = _restore(model, folder, strategy, steps)
    if restored_from and chief:
        report(f"resuming at {start.describe(steps)} from {restored_from}")
    saved = start if restored_from else None

    history = (extra or {}).get("history", {})
    # Wall time of the whole run: earlier, interrupted invocations up to the
    # checkpoint resumed from, then this one.
    earlier_s = float((extra or {}).get("elapsed_s", 0.0))

    def elapsed():
        return earlier_s + time.time() - start_time

    if start.epoch < config.epochs:
        train_ds = train_stream(config, preprocessing, mean, steps, start)
        history = _fit(
            config,
            model,
            strategy,
            distribute.distribute_dataset_options(train_ds, strategy),
            val_ds,
            steps,
            checkpoint_folder=folder,
            start=start,
            saved=saved,
            extra=extra,
            elapsed=elapsed,
        )

    results = {"workdir": workdir, "resumed": resumed, "history": history}
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
    results["wall_time_s"] = round(elapsed(), 1)
    if chief:
        fileio.write_json(os.path.join(workdir, "eval.json"), results)
    return results


def _fit(
    config,
    model,
    strategy,
    train_ds,
    val_ds,
    steps,
    checkpoint_folder,
    start,
    saved,
    extra,
    elapsed,
):
    """Runs `fit` from `start` with checkpoints; returns the run's per-epoch logs.

    The logs are {metric: [value per epoch]} from epoch 1, including the
    epochs of earlier, interrupted runs (kept in the checkpoints).
    """
    folder = checkpoint_folder
    chief = distribute.is_chief(strategy)
    verbose = _verbosity(config) if chief else 0
    lr_callback = _lr_callback(config)
    # A signal on one worker cannot stop the others at the same batch: under
    # multi-worker training only the periodic checkpoints count.
    catch = distribute.num_workers(strategy) < 2
    with _signals_caught(catch) as signals:
        checkpointer = _Checkpointer(
            folder,
            start,
            steps,
            config.checkpoint_every_steps,
            signals,
            lr_callback=lr_callback,
            saved=saved,
            restored_extra=extra,
            elapsed=elapsed,
        )
        callbacks = [_StopOnNonFinite(start)]
        if lr_callback is not None:
            callbacks.append(lr_callback)
        if chief:
            log_dir = os.path.join(config.workdir, "tensorboard")
            callbacks += [
                _Snapshots(config.workdir, config.snapshot_epochs),
                keras.callbacks.TensorBoard(log_dir, write_graph=False, update_freq="epoch"),
                _FilterImages(log_dir),
            ]
            if config.evolution_maps:
                callbacks.append(_evolution_callback(model, val_ds, config, log_dir))
        callbacks.append(checkpointer)
        try:
            model.fit(
                train_ds,
                validation_data=val_ds,
                initial_epoch=start.epoch,
                epochs=config.epochs,
                steps_per_epoch=steps,
                callbacks=callbacks,
                verbose=verbose,
            )
        except _NonFiniteLoss as e:
            raise Error(
                f"loss became NaN/Inf at {e}; stopped without saving that state; "
                f"{_last_checkpoint(folder, checkpointer.saved, steps)}; start again with a "
                "lower --learning_rate (in a new --workdir)"
            ) from None
        except checkpoint.NonFiniteState as e:
            raise Error(
                f"weights became NaN/Inf ({e}); stopped without saving them; "
                f"{_last_checkpoint(folder, checkpointer.saved, steps)}; start again with a "
                "lower --learning_rate (in a new --workdir)"
            ) from None
        except _StopAt as e:
            name = signal.Signals(e.signum).name
            raise Interrupted(
                f"{name}: stopped at {e.position.describe(steps)}, saved in "
                f"{os.path.join(folder, checkpoint.LATEST)}; run the same command to resume",
                e.signum,
            ) from None
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted; {_last_checkpoint(folder, checkpointer.saved, steps)}; run the "
                "same command to resume from there"
            ) from None
    if checkpointer.save_seconds:
        logging.info(
            "%d checkpoints, %.3f s each on average",
            len(checkpointer.save_seconds),
            sum(checkpointer.save_seconds) / len(checkpointer.save_seconds),
        )
    return checkpointer.history


def _last_checkpoint(folder, saved, steps):
    if saved is None:
        return "no checkpoint had been saved yet"
    return (
        f"the last good checkpoint ({saved.describe(steps)}) is kept in "
        f"{os.path.join(folder, checkpoint.LATEST)}"
    )
