"""Atomic file output: a file or directory appears complete or not at all.

Everything is written to a temporary name in the destination's own folder,
flushed and fsynced (every file of a directory tree too), then renamed into
place with `os.replace`, so a killed process leaves the previous good output
intact; only a hidden `.NAME.tmp-*` file or folder can be left behind, which
`remove_stale_temps` clears. A directory that replaces an existing one is
swapped in with one atomic `renameat2(RENAME_EXCHANGE)` on Linux (elsewhere
the old one is moved aside first, so a kill between the two renames leaves
it under `.NAME.tmp-*.old`).

Write failures (full disk, read-only or missing folder, a folder that is a
file) raise `zfkeras.errors.Error` with one line: the path and the reason.
"""

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile

import numpy as np

from zfkeras.errors import Error

_TEMP_MARK = ".tmp-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def ensure_dir(path):
    """Creates `path` (and parents) or raises a one-line Error."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise Error(f"{path}: cannot create directory ({_reason(e)})") from None
    if not os.access(path, os.W_OK):
        raise Error(f"{path}: directory is not writable")
    return path


def _reason(error):
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    if error.errno == errno.EROFS:
        return "read-only file system"
    return error.strerror or str(error)


def temp_name(path, suffix=""):
    """The hidden temporary name `atomic_path` uses for `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f".{os.path.basename(path)}{_TEMP_MARK}{os.getpid()}{suffix}")


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yields a temporary path next to `path`; renames it to `path` on success.

    The caller writes a file or a directory at the yielded path. On a clean
    exit it is fsynced and renamed to `path` (replacing any previous one);
    on an exception it is deleted and `path` is left as it was.

    Args:
        path: the final file or directory name.
        suffix: kept on the temporary name (Keras insists on '.keras').

    Raises:
        Error: the folder cannot be created or written (one line).
    """
    folder = os.path.dirname(os.path.abspath(path))
    ensure_dir(folder)
    tmp = temp_name(path, suffix)
    _remove(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.isdir(path) and os.path.isdir(tmp):
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
        fsync_dir(folder)
    except OSError as e:
        raise Error(f"{path}: cannot write ({_reason(e)})") from None
    finally:
        _remove(tmp)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


def replace_dir(new, old):
    """Moves directory `new` over the existing directory `old`, then deletes
    what was at `old`.

    On Linux the two are swapped by one atomic `renameat2(RENAME_EXCHANGE)`:
    a reader (or a kill) sees the old tree or the new one, never neither.
    Elsewhere the old one is moved aside first.

    Raises:
        OSError: the rename failed.
    """
    if _exchange(new, old):
        shutil.rmtree(new, ignore_errors=True)
        return
    aside = f"{new}.old"
    os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a, b):
    """Atomically swaps two paths (Linux renameat2); False if unsupported."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_uint,
            ]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    result = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), b)


def fsync_tree(path):
    """fsyncs a file, or every file and folder of a directory tree."""
    if os.path.isfile(path):
        _fsync_file(path)
        return
    if not os.path.isdir(path):
        return
    for folder, _, files in os.walk(path):
        for name in files:
            _fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder):
    """fsyncs a folder's entries (new names survive a power cut); best effort."""
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


def remove_stale_temps(folder, name=None):
    """Deletes temporaries that killed writers left in `folder`.

    A temporary whose name carries the id of a process that is still running
    (another tool writing there now) is left alone.

    Args:
        folder: a folder `atomic_path` wrote to.
        name: only the temporaries of this final name; None: all of them.

    Returns:
        The removed paths.
    """
    if not os.path.isdir(folder):
        return []
    prefix = f".{name}{_TEMP_MARK}" if name else "."
    removed = []
    for entry in os.listdir(folder):
        if entry.startswith(prefix) and _TEMP_MARK in entry and not _writer_alive(entry):
            path = os.path.join(folder, entry)
            _remove(path)
            removed.append(path)
    return removed


def _writer_alive(entry):
    digits = entry.rsplit(_TEMP_MARK, 1)[1]
    pid = digits[: len(digits) - len(digits.lstrip("0123456789"))]
    if not pid or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


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
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))


def save_npz(path, arrays):
    """Saves a dict of NumPy arrays to an uncompressed `.npz` atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def save_model(model, path):
    """Saves a Keras model to a `.keras` file atomically."""
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)


def temp_dir_like(path):
    """A fresh temporary directory beside `path` (same filesystem).

    Fill it, then `fsync_tree` it and rename it into place; a name matching
    `remove_stale_temps`.

    Raises:
        Error: the folder cannot be created or written (one line).
    """
    folder = os.path.dirname(os.path.abspath(path))
    ensure_dir(folder)
    try:
        return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{_TEMP_MARK}", dir=folder)
    except OSError as e:
        raise Error(f"{path}: cannot write ({_reason(e)})") from None
