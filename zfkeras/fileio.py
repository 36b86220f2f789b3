"""Atomic file output: a file or directory appears complete or not at all.

Everything is written to a temporary name in the destination's own folder,
flushed and fsynced, then renamed into place with `os.replace`, so a killed
process leaves the previous good output intact.
"""

import contextlib
import io
import json
import os
import shutil
import tempfile

import numpy as np

from zfkeras.errors import Error


def ensure_dir(path):
    """Creates `path` (and parents) or raises a one-line Error."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise Error(f"{path}: cannot create directory ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise Error(f"{path}: directory is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yields a temporary path next to `path`; renames it to `path` on success.

    Args:
        path: the final file or directory name.
        suffix: kept on the temporary name (Keras insists on '.keras').
    """
    folder = os.path.dirname(os.path.abspath(path))
    ensure_dir(folder)
    base = os.path.basename(path)
    tmp = os.path.join(folder, f".{base}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if os.path.isdir(path) and os.path.isdir(tmp):
            old = f"{tmp}.old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(folder)
    except OSError as e:
        raise Error(f"{path}: cannot write ({e.strerror})") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path, data):
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path, text):
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    """Writes `obj` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_npy(path, array):
    """Saves a NumPy array to `path` atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    write_bytes(path, buffer.getvalue())


def save_model(model, path):
    """Saves a Keras model to a `.keras` file atomically."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def temp_dir_like(path):
    """A fresh temporary directory beside `path` (same filesystem)."""
    folder = os.path.dirname(os.path.abspath(path))
    ensure_dir(folder)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
