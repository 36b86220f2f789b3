"""Atomic outputs: complete or absent, the previous output kept, one-line errors."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import REPO, run_tool

from zfkeras import fileio
from zfkeras.errors import Error


class _FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        raise OSError(28, "No space left on device")


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    fileio.write_json(str(path), {"accuracy": 1})
    monkeypatch.setattr(fileio, "open", _FullDisk, raising=False)
    with pytest.raises(Error) as info:
        fileio.write_json(str(path), {"accuracy": 2})
    assert str(info.value) == f"{path}: cannot write (no space left on device)"
    monkeypatch.undo()
    assert path.read_text() == '{\n  "accuracy": 1\n}\n'
    assert os.listdir(tmp_path) == ["eval.json"]


def test_output_under_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(Error) as info:
        fileio.write_text(str(tmp_path / "file" / "out" / "a.txt"), "y")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'file' / 'out'}: cannot create directory (")
    assert "\n" not in message
    with pytest.raises(Error, match="cannot create directory"):
        fileio.temp_dir_like(str(tmp_path / "file" / "out"))


def test_a_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "export"
    for version in ("one", "two"):
        with fileio.atomic_path(str(target)) as tmp:
            os.makedirs(os.path.join(tmp, "variables"))
            with open(os.path.join(tmp, "variables", "data"), "w") as f:
                f.write(version)
            with open(os.path.join(tmp, version), "w") as f:
                f.write(version)
    assert sorted(os.listdir(target)) == ["two", "variables"]
    assert (target / "variables" / "data").read_text() == "two"
    assert os.listdir(tmp_path) == ["export"]


def test_a_failed_write_leaves_no_trace(tmp_path):
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(str(tmp_path / "figure.png"), suffix=".png") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half a figure")
            raise RuntimeError("drawing failed")
    assert os.listdir(tmp_path) == []


_SLOW_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from zfkeras import fileio
    path, kind = sys.argv[1], sys.argv[2]
    with fileio.atomic_path(path) as tmp:
        if kind == "dir":
            os.makedirs(tmp)
            target = os.path.join(tmp, "part")
        else:
            target = tmp
        with open(target, "wb") as f:
            for _ in range(100000):
                f.write(b"new " * 256)
                f.flush()
                time.sleep(0.001)
    """
)


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_sigkill_mid_write_keeps_the_previous_output(tmp_path, kind):
    """A real writer process killed while it writes: the old output survives."""
    path = tmp_path / "output"
    if kind == "dir":
        path.mkdir()
        (path / "part").write_bytes(b"old")
    else:
        path.write_bytes(b"old")
    writer = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(path), kind], cwd=REPO, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and writer.poll() is None:
            temps = [e for e in os.listdir(tmp_path) if e.startswith(".output.tmp-")]
            if temps and _size(tmp_path / temps[0]) > 10000:
                break
            time.sleep(0.01)
        assert writer.poll() is None, writer.communicate()[1]
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    finally:
        writer.kill()
    if kind == "dir":
        assert (path / "part").read_bytes() == b"old"
    else:
        assert path.read_bytes() == b"old"
    assert fileio.remove_stale_temps(str(tmp_path))
    assert os.listdir(tmp_path) == ["output"]


def _size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    return os.path.getsize(path)


def test_npz_and_npy_round_trip(tmp_path):
    fileio.save_npz(str(tmp_path / "a.npz"), {"x": np.arange(3)})
    fileio.save_npy(str(tmp_path / "b.npy"), np.ones(2))
    with np.load(tmp_path / "a.npz") as npz:
        np.testing.assert_array_equal(npz["x"], np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npy"]


# ---------------------------------------------------------------------------
# The training tool on an unusable output folder.


def test_train_into_a_folder_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_tool("train", f"--workdir={tmp_path / 'file' / 'run'}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot create directory (Not a directory)" in result.stderr


def _mount_namespace_works(tmp_path):
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.fixture
def tiny_flagfile(tmp_path):
    from test_train_tool import TINY_FLAGS, make_shapes_folder

    make_shapes_folder(str(tmp_path / "data"))
    flagfile = tmp_path / "tiny.cfg"
    flagfile.write_text(
        TINY_FLAGS + f"--dataset=folder:{tmp_path / 'data'}\n--evolution_maps=0\n--eval_crops=1\n"
    )
    return flagfile


@pytest.mark.parametrize(
    "options, reason",
    [("ro", "read-only file system"), ("size=160k", "no space left on device")],
)
def test_train_on_a_read_only_or_full_disk(tmp_path, tiny_flagfile, options, reason):
    """A real tmpfs (in a private mount namespace): read-only, or too small."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if not _mount_namespace_works(mount_point):
        pytest.skip("needs unshare -m and mount (root or CAP_SYS_ADMIN)")
    script = f'mount -t tmpfs -o {options} tmpfs "$0" && exec "$@"'
    command = [
        "unshare",
        "-m",
        "sh",
        "-c",
        script,
        str(mount_point),
        sys.executable,
        os.path.join(REPO, "tools", "train.py"),
        f"--flagfile={tiny_flagfile}",
        f"--workdir={mount_point / 'run'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert reason in result.stderr
