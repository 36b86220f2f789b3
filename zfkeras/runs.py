"""A training run's files, and loading a trained model with its preprocessing.

A work dir written by `zfkeras.train` holds:

    run.json        dataset, class names, preprocessing, architecture
    mean.npy        per-pixel mean view of the training split
    model.keras     the final model
    config.json     the training config; flags.txt the tool's flags
    snapshots/      epoch_NNN.keras for the snapshot epochs (Fig. 4)
    backup/         checkpoint.npz, checkpoint.prev.npz: training state (resume)
    tensorboard/    TensorBoard logs
    eval.json       test-split evaluation

`load_run` accepts such a folder, or a bare `.keras` file (then the mean is 0
and the preprocessing is inferred from the model's input).
"""

import dataclasses
import json
import os

import keras
import numpy as np

from zfkeras import data, fileio
from zfkeras import layers as _layers  # noqa: F401  (registers custom objects)
from zfkeras.errors import Error

RUN_FILE = "run.json"
MEAN_FILE = "mean.npy"
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"
SNAPSHOT_DIR = "snapshots"
_PAPER_CROP_RATIO = 224 / 256


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained model and what is needed to feed it."""

    path: str
    model: keras.Model
    preprocessing: data.Preprocessing
    mean: np.ndarray
    class_names: tuple
    meta: dict

    def model_input(self, views):
        """uint8 centre views (N, crop, crop, C) -> float32 model input."""
        return data.subtract_mean(views, self.preprocessing, self.mean)


def write_run_files(workdir, preprocessing, mean, info, extra=None):
    """Writes run.json and mean.npy atomically."""
    meta = {
        "dataset": info.name,
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "preprocessing": dataclasses.asdict(preprocessing),
    }
    meta.update(extra or {})
    fileio.save_npy(os.path.join(workdir, MEAN_FILE), mean)
    fileio.write_json(os.path.join(workdir, RUN_FILE), meta)
    return meta


def read_meta(workdir):
    """The run.json of a work dir, or None when there is none."""
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise Error(f"{path}: unreadable run file ({e})") from None


def load_model(path):
    """Loads a .keras model with zfkeras' custom objects, one-line errors."""
    if not os.path.exists(path):
        raise Error(f"{path}: no such file")
    if os.path.isdir(path) or not path.endswith(".keras"):
        raise Error(f"{path}: not a .keras model file")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a bad file.
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise Error(f"{path}: cannot load model ({first})") from None


def _from_model(path, model):
    shape = model.input_shape
    if len(shape) != 4 or shape[1] is None:
        raise Error(f"{path}: model input must be (height, width, channels), not {shape}")
    crop, channels = int(shape[1]), int(shape[3])
    resize = max(crop, int(round(crop / _PAPER_CROP_RATIO)))
    preprocessing = data.Preprocessing(resize, crop, channels)
    mean = np.zeros((resize, resize, channels), np.float32)
    classes = int(model.output_shape[-1])
    names = tuple(str(i) for i in range(classes))
    return Run(path, model, preprocessing, mean, names, {})


def load_run(path, snapshot=None):
    """Loads a run folder (or a .keras file) with its preprocessing and mean.

    Args:
        path: a training work dir or a `.keras` file.
        snapshot: optional epoch number: load snapshots/epoch_NNN.keras.

    Raises:
        Error: missing or incompatible files.
    """
    if os.path.isfile(path):
        return _from_model(path, load_model(path))
    if not os.path.isdir(path):
        raise Error(f"{path}: no such run folder or .keras file")
    meta = read_meta(path)
    if meta is None:
        raise Error(f"{path}: not a zfkeras run (no {RUN_FILE})")
    if snapshot is None:
        model_path = os.path.join(path, MODEL_FILE)
        if not os.path.isfile(model_path):
            raise Error(f"{path}: run has no {MODEL_FILE} yet (training not finished)")
    else:
        model_path = snapshot_path(path, snapshot)
    model = load_model(model_path)
    try:
        preprocessing = data.Preprocessing(**meta["preprocessing"])
        mean = np.load(os.path.join(path, MEAN_FILE))
    except (KeyError, TypeError, OSError, ValueError) as e:
        raise Error(f"{path}: incomplete run files ({e})") from None
    expected = (preprocessing.resize_size, preprocessing.resize_size, preprocessing.channels)
    if mean.shape != expected:
        raise Error(f"{path}: {MEAN_FILE} has shape {mean.shape}, expected {expected}")
    shape = tuple(model.input_shape[1:])
    crop = (preprocessing.crop_size, preprocessing.crop_size, preprocessing.channels)
    if shape != crop:
        raise Error(f"{model_path}: model input {shape} does not match run.json's {crop}")
    return Run(
        path, model, preprocessing, mean.astype(np.float32), tuple(meta["class_names"]), meta
    )


def snapshot_path(workdir, epoch):
    """Path of the snapshot of `epoch` (1-based)."""
    return os.path.join(workdir, SNAPSHOT_DIR, f"epoch_{int(epoch):03d}.keras")


def snapshot_epochs(workdir):
    """Sorted epochs that have a snapshot in `workdir`."""
    folder = os.path.join(workdir, SNAPSHOT_DIR)
    if not os.path.isdir(folder):
        return []
    epochs = []
    for name in os.listdir(folder):
        if name.startswith("epoch_") and name.endswith(".keras"):
            try:
                epochs.append(int(name[len("epoch_") : -len(".keras")]))
            except ValueError:
                continue
    return sorted(epochs)
