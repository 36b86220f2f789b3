"""Crash-safe training checkpoints: every variable, and where training stands.

A checkpoint is one uncompressed `.npz` file holding the value of every
model variable (weights, and the dropout layers' seed-generator states),
every optimizer variable (iteration count, learning rate, momenta) and a
JSON record: the position in training (`epoch` in progress, `step` = batches
of it already trained), the batches per epoch and callback state (the plateau
schedule's counters). The zip format keeps a CRC-32 of every array, checked
when it is read.

Writing is crash-safe: the file is written under a temporary name, fsynced
and renamed over `checkpoint.npz`, and the checkpoint it replaces is kept
as `checkpoint.prev.npz`. A process killed at any moment therefore leaves
at least one complete checkpoint; `load` verifies the checksums and falls
back to the previous file when the latest is damaged (which a rename-based
write cannot cause, but a bad disk or copy can).

Restoring all of this, and feeding the batches of `epoch` from `step` on
(`zfkeras.train` makes each epoch's batch order a pure function of the seed
and the epoch), continues a run exactly where the checkpoint was taken.
"""

import dataclasses
import json
import os
import zipfile

import numpy as np
from absl import logging

from zfkeras import fileio
from zfkeras.errors import Error

LATEST = "checkpoint.npz"
PREVIOUS = "checkpoint.prev.npz"
FORMAT = 1
_STATE_KEY = "state"
# What keras.callbacks.BackupAndRestore (zfkeras before checkpoint.npz) left.
KERAS_BACKUP_WEIGHTS = "latest.weights.h5"
KERAS_BACKUP_METADATA = "training_metadata.json"


class NonFiniteState(Error):
    """A variable holds NaN or Inf: the state is not worth saving."""


@dataclasses.dataclass(frozen=True)
class Position:
    """Where training stands: `step` batches of 0-based `epoch` are done."""

    epoch: int = 0
    step: int = 0

    def describe(self, steps_per_epoch=None):
        if self.step == 0:
            return f"start of epoch {self.epoch + 1}"
        total = f"/{steps_per_epoch}" if steps_per_epoch else ""
        return f"epoch {self.epoch + 1}, step {self.step}{total}"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: arrays in variable order, and its JSON record."""

    path: str
    arrays: list
    state: dict

    @property
    def position(self):
        return Position(int(self.state["epoch"]), int(self.state["step"]))


def variables(model):
    """The variables a checkpoint holds: the model's, then its optimizer's."""
    found = list(model.variables)
    if model.optimizer is not None:
        found += list(model.optimizer.variables)
    return found


def save(folder, model, position, steps_per_epoch, extra=None):
    """Writes the training state to `folder/checkpoint.npz`, crash-safe.

    Args:
        folder: the checkpoint folder (created if needed).
        model: a compiled Keras model with a built optimizer.
        position: the `Position` this state is at.
        steps_per_epoch: batches per epoch (checked when resuming).
        extra: JSON-able dict kept in the record (callback state).

    Returns:
        The path written.

    Raises:
        NonFiniteState: a variable holds NaN or Inf (nothing is written).
        Error: the file cannot be written (one line).
    """
    values = [np.asarray(v.numpy()) for v in variables(model)]
    for variable, value in zip(variables(model), values):
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise NonFiniteState(f"variable {variable.path} holds NaN or Inf")
    state = {
        "format": FORMAT,
        "epoch": int(position.epoch),
        "step": int(position.step),
        "steps_per_epoch": int(steps_per_epoch),
        "variables": [
            {"path": v.path, "shape": list(a.shape), "dtype": str(a.dtype)}
            for v, a in zip(variables(model), values)
        ],
        "extra": extra or {},
    }
    arrays = {f"v{i:05d}": a for i, a in enumerate(values)}
    arrays[_STATE_KEY] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8)
    fileio.ensure_dir(folder)
    latest = os.path.join(folder, LATEST)
    with fileio.atomic_path(latest, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        # Only once the new file is complete and on disk does the current
        # one become the previous.
        fileio.fsync_tree(tmp)
        if os.path.exists(latest):
            os.replace(latest, os.path.join(folder, PREVIOUS))
    return latest


def read(path):
    """Reads and verifies one checkpoint file.

    Raises:
        Error: missing, truncated or damaged file (one line).
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            state = json.loads(bytes(npz[_STATE_KEY]).decode("utf-8"))
            records = state["variables"]
            arrays = [npz[f"v{i:05d}"] for i in range(len(records))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise Error(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if state.get("format") != FORMAT:
        raise Error(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    return Checkpoint(path, arrays, state)


def load(folder):
    """The newest intact checkpoint in `folder`, or None when there is none.

    Temporaries left by a writer that was killed are deleted. A damaged
    latest checkpoint is skipped (with a warning) for the previous one.

    Raises:
        Error: checkpoints exist but none is readable.
    """
    fileio.remove_stale_temps(folder, LATEST)
    problems = []
    for name in (LATEST, PREVIOUS):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            checkpoint = read(path)
        except Error as e:
            problems.append(str(e))
            logging.warning("%s; trying the previous checkpoint", e)
            continue
        return checkpoint
    if problems:
        raise Error(f"{problems[0]}; no intact checkpoint left in {folder}")
    return None


def restore(model, checkpoint):
    """Assigns a checkpoint's values to the model's and optimizer's variables.

    The optimizer is built first if needed. Call inside the strategy scope.

    Raises:
        Error: the checkpoint was written for a different model.
    """
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    targets = variables(model)
    records = checkpoint.state["variables"]
    if len(targets) != len(records):
        raise Error(
            f"{checkpoint.path}: holds {len(records)} variables, the model has "
            f"{len(targets)}; it belongs to another model"
        )
    for variable, record, array in zip(targets, records, checkpoint.arrays):
        if tuple(variable.shape) != tuple(array.shape):
            raise Error(
                f"{checkpoint.path}: {record['path']} has shape {tuple(array.shape)}, "
                f"the model's {variable.path} {tuple(variable.shape)}"
            )
    for variable, array in zip(targets, checkpoint.arrays):
        variable.assign(array)


def keras_backup_position(folder):
    """The epoch an old `keras.callbacks.BackupAndRestore` folder resumes at.

    Returns:
        A `Position` (step 0), or None if `folder` holds no such backup.
    """
    metadata = os.path.join(folder, KERAS_BACKUP_METADATA)
    weights = os.path.join(folder, KERAS_BACKUP_WEIGHTS)
    if not (os.path.isfile(metadata) and os.path.isfile(weights)):
        return None
    try:
        with open(metadata) as f:
            epoch = int(json.load(f)["epoch"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Error(f"{metadata}: unreadable Keras backup ({e})") from None
    return Position(epoch, 0)


def restore_keras_backup(model, folder):
    """Loads an old BackupAndRestore backup's weights and optimizer state."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    path = os.path.join(folder, KERAS_BACKUP_WEIGHTS)
    try:
        model.load_weights(path)
    except Exception as e:  # h5py and Keras raise many types for a bad file.
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise Error(f"{path}: cannot restore the old Keras backup ({first})") from None
