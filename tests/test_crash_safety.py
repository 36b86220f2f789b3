"""Crash-safe training: checkpoints, exact resume, kills, signals, NaN, determinism.

The tool-level tests train a tiny ZFNet on synthetic images; the reference run
(uninterrupted, --deterministic) is shared by the module. Run with --run-slow
for the repeated-SIGKILL test.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import REPO, run_tool
from test_train_tool import TINY_FLAGS, make_shapes_folder

from zfkeras import checkpoint, data, fileio, train
from zfkeras.errors import Error

# 72 training images in batches of 4: 18 steps an epoch, 54 in all.
CRASH_FLAGS = """--batch_size=4
--epochs=3
--snapshot_epochs=3
--eval_crops=1
--evolution_maps=0
--deterministic
--checkpoint_every_steps=1
"""


@pytest.fixture(scope="module")
def crash_setup(tmp_path_factory):
    """Data, a flagfile, and one uninterrupted reference run."""
    root = tmp_path_factory.mktemp("crash")
    make_shapes_folder(str(root / "data"), per_class=40)
    flagfile = root / "crash.cfg"
    flagfile.write_text(TINY_FLAGS + CRASH_FLAGS + f"--dataset=folder:{root / 'data'}\n")
    reference = root / "reference"
    result = run_tool("train", f"--flagfile={flagfile}", f"--workdir={reference}")
    assert result.returncode == 0, result.stderr
    return root, flagfile, reference


def _weights(workdir):
    model = keras.saving.load_model(str(workdir / "model.keras"), compile=False)
    return [np.asarray(w) for w in model.weights]


def _assert_bit_identical(a, b):
    wa, wb = _weights(a), _weights(b)
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_same_seed_deterministic_runs_are_bit_identical(crash_setup, tmp_path):
    _, flagfile, reference = crash_setup
    result = run_tool("train", f"--flagfile={flagfile}", f"--workdir={tmp_path / 'again'}")
    assert result.returncode == 0, result.stderr
    _assert_bit_identical(reference, tmp_path / "again")
    history = json.loads((tmp_path / "again" / "eval.json").read_text())["history"]
    assert history == json.loads((reference / "eval.json").read_text())["history"]


def _start(flagfile, workdir):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "train.py"), f"--flagfile={flagfile}"]
        + [f"--workdir={workdir}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _wait_for_new_checkpoint(process, path, timeout=600):
    """Waits until `path` is (re)written by `process`; False if it ended first."""
    before = os.stat(path).st_mtime_ns if os.path.exists(path) else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            now = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            now = None
        if now is not None and now != before:
            return True
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint within {timeout} s")


def test_sigint_saves_exits_130_and_resumes_exactly(crash_setup, tmp_path):
    _, flagfile, reference = crash_setup
    workdir = tmp_path / "run"
    latest = workdir / "backup" / checkpoint.LATEST
    process = _start(flagfile, workdir)
    try:
        assert _wait_for_new_checkpoint(process, latest), process.communicate()[1]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.count("\n") == 1, stderr
    assert "run the same command to resume" in stderr
    saved = checkpoint.load(str(workdir / "backup"))
    if stderr.startswith("train: SIGINT: stopped at"):
        assert saved.position.describe(18) in stderr
        assert str(latest) in stderr
    assert not (workdir / "model.keras").exists()

    result = run_tool("train", f"--flagfile={flagfile}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    assert f"resuming at {saved.position.describe(18)}" in result.stderr
    _assert_bit_identical(reference, workdir)


@pytest.mark.slow
def test_repeated_sigkill_resumes_to_the_uninterrupted_weights(crash_setup, tmp_path):
    """SIGKILL at random moments, four times; every restart continues exactly."""
    _, flagfile, reference = crash_setup
    workdir = tmp_path / "run"
    folder = workdir / "backup"
    rng = random.Random(os.environ.get("ZFKERAS_KILL_SEED", "0"))
    positions = []
    for _ in range(4):
        process = _start(flagfile, workdir)
        try:
            if not _wait_for_new_checkpoint(process, folder / checkpoint.LATEST):
                break  # finished before the kill
            time.sleep(rng.uniform(0.0, 1.5))
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=60)
        finally:
            process.kill()
        # Whatever the moment of the kill, an intact checkpoint is left.
        saved = checkpoint.load(str(folder))
        assert saved is not None
        positions.append(saved.position)
    assert positions == sorted(positions, key=lambda p: (p.epoch, p.step))
    assert len({(p.epoch, p.step) for p in positions}) >= 2, positions
    result = run_tool("train", f"--flagfile={flagfile}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    _assert_bit_identical(reference, workdir)


# ---------------------------------------------------------------------------
# In-process: the checkpoint file, and the resumable data stream.


def _tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, activation="relu")(inputs)
    x = keras.layers.Dropout(0.5, seed=seed)(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _xy(count=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(count, 4)).astype(np.float32), rng.integers(0, 2, count)


def _values(model):
    return [np.array(v.numpy()) for v in checkpoint.variables(model)]


def test_checkpoint_round_trip_keeps_the_previous(tmp_path):
    model = _tiny_model()
    model.fit(*_xy(), batch_size=8, verbose=0)
    first = _values(model)
    checkpoint.save(str(tmp_path), model, checkpoint.Position(1, 0), 4)
    model.fit(*_xy(), batch_size=8, verbose=0)
    second = _values(model)
    checkpoint.save(str(tmp_path), model, checkpoint.Position(2, 0), 4, {"plateau": None})
    assert sorted(os.listdir(tmp_path)) == [checkpoint.LATEST, checkpoint.PREVIOUS]

    other = _tiny_model(seed=1)
    loaded = checkpoint.load(str(tmp_path))
    assert loaded.position == checkpoint.Position(2, 0)
    checkpoint.restore(other, loaded)
    for a, b in zip(_values(other), second):
        np.testing.assert_array_equal(a, b)
    # Optimizer iterations, learning rate, momenta and dropout seed state included.
    assert int(other.optimizer.iterations.numpy()) == 8
    previous = checkpoint.read(str(tmp_path / checkpoint.PREVIOUS))
    for a, b in zip(previous.arrays, first):
        np.testing.assert_array_equal(a, b)


def test_a_kill_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _tiny_model()
    model.fit(*_xy(), batch_size=8, verbose=0)
    checkpoint.save(str(tmp_path), model, checkpoint.Position(0, 3), 4)
    good = _values(model)
    # A writer killed mid-write (another process) left its truncated temporary ...
    half = (tmp_path / checkpoint.LATEST).read_bytes()[:1000]
    (tmp_path / f".{checkpoint.LATEST}.tmp-99999.npz").write_bytes(half)
    temp = fileio.temp_name(str(tmp_path / checkpoint.LATEST), ".npz")
    # ... and a failure inside np.savez (disk full) leaves nothing at all.
    model.fit(*_xy(), batch_size=8, verbose=0)

    def broken_savez(file, **arrays):
        file.write(half)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(Error, match="no space left on device"):
        checkpoint.save(str(tmp_path), model, checkpoint.Position(0, 4), 4)
    monkeypatch.undo()
    assert not os.path.exists(temp)
    loaded = checkpoint.load(str(tmp_path))
    assert loaded.position == checkpoint.Position(0, 3)
    for a, b in zip(loaded.arrays, good):
        np.testing.assert_array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == [checkpoint.LATEST]  # temporaries cleared


def test_a_damaged_latest_falls_back_to_the_previous(tmp_path):
    model = _tiny_model()
    checkpoint.save(str(tmp_path), model, checkpoint.Position(0, 1), 4)
    checkpoint.save(str(tmp_path), model, checkpoint.Position(0, 2), 4)
    latest = tmp_path / checkpoint.LATEST
    # Truncated (a copy cut short) ...
    content = latest.read_bytes()
    latest.write_bytes(content[: len(content) // 3])
    assert checkpoint.load(str(tmp_path)).position == checkpoint.Position(0, 1)
    # ... or one flipped byte inside an array (caught by the zip's CRC-32).
    loaded = checkpoint.read(str(tmp_path / checkpoint.PREVIOUS))
    flipped = bytearray(content)
    offset = content.find(np.ascontiguousarray(loaded.arrays[0]).tobytes()[:16])
    assert offset > 0
    flipped[offset] ^= 0x40
    latest.write_bytes(bytes(flipped))
    with pytest.raises(Error, match="CRC"):
        checkpoint.read(str(latest))
    assert checkpoint.load(str(tmp_path)).position == checkpoint.Position(0, 1)
    (tmp_path / checkpoint.PREVIOUS).write_bytes(b"junk")
    with pytest.raises(Error, match="no intact checkpoint"):
        checkpoint.load(str(tmp_path))


def test_non_finite_weights_are_never_saved(tmp_path):
    model = _tiny_model()
    checkpoint.save(str(tmp_path), model, checkpoint.Position(0, 1), 4)
    model.layers[1].kernel.assign(np.full((4, 8), np.nan, np.float32))
    with pytest.raises(checkpoint.NonFiniteState):
        checkpoint.save(str(tmp_path), model, checkpoint.Position(0, 2), 4)
    assert checkpoint.load(str(tmp_path)).position == checkpoint.Position(0, 1)


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path):
    """_StopOnNonFinite stops at the bad batch before _Checkpointer saves it."""
    model = _tiny_model()
    x, y = _xy(40)
    x[20:24] = np.inf  # batch 6 of 10 (batch_size 4)
    checkpointer = train._Checkpointer(
        str(tmp_path), checkpoint.Position(), 10, 1, {"signum": None}
    )
    with pytest.raises(train._NonFiniteLoss, match="batch 6"):
        model.fit(
            x,
            y,
            batch_size=4,
            shuffle=False,
            callbacks=[train._StopOnNonFinite(), checkpointer],
            verbose=0,
        )
    saved = checkpoint.load(str(tmp_path))
    assert saved.position == checkpoint.Position(0, 5) == checkpointer.saved
    assert all(np.all(np.isfinite(a)) for a in saved.arrays)


def test_old_keras_backup_still_resumes(tmp_path):
    model = _tiny_model()
    backup = keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False)
    model.fit(*_xy(), batch_size=8, epochs=2, callbacks=[backup], verbose=0)
    assert checkpoint.keras_backup_position(str(tmp_path)) == checkpoint.Position(2, 0)
    other = _tiny_model(seed=1)
    checkpoint.restore_keras_backup(other, str(tmp_path))
    for a, b in zip(other.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(other.optimizer.iterations.numpy()) == 8


@pytest.fixture(scope="module")
def stream_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    make_shapes_folder(str(root / "data"), per_class=12)
    config = train.TrainConfig(
        workdir=str(root / "run"),
        dataset=f"folder:{root / 'data'}",
        resize_size=32,
        crop_size=24,
        channels=1,
        batch_size=4,
        epochs=3,
        shuffle_buffer=100,
        seed=7,
    )
    preprocessing = data.Preprocessing(32, 24, 1, 1 / 64)
    mean = np.full((32, 32, 1), 100.0, np.float32)
    return config, preprocessing, mean


def _batches(config, preprocessing, mean, start):
    steps = train.steps_per_epoch(config)
    stream = train.train_stream(config, preprocessing, mean, steps, start)
    return [(x.numpy(), y.numpy()) for x, y in stream]


def test_train_stream_runs_without_tf_data_autotuning(stream_config):
    # Its epochs are built inside flat_map, so the source's options do not reach it.
    config, preprocessing, mean = stream_config
    steps = train.steps_per_epoch(config)
    stream = train.train_stream(config, preprocessing, mean, steps, checkpoint.Position())
    assert stream.options().autotune.enabled is False


@pytest.mark.parametrize("cache", [False, True])
def test_each_epoch_is_a_pure_function_of_seed_and_epoch(stream_config, cache):
    config, preprocessing, mean = stream_config
    import dataclasses

    config = dataclasses.replace(config, cache=cache)
    steps = train.steps_per_epoch(config)
    assert steps == 5  # 20 of 24 images train (every 10th is the test split)
    full = _batches(config, preprocessing, mean, checkpoint.Position())
    assert len(full) == 3 * steps
    resumed = _batches(config, preprocessing, mean, checkpoint.Position(1, 2))
    assert len(resumed) == steps - 2 + steps
    for (xa, ya), (xb, yb) in zip(full[steps + 2 :], resumed):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # Epochs differ from each other (order and augmentation).
    assert not np.array_equal(full[0][0], full[steps][0])
    again = _batches(config, preprocessing, mean, checkpoint.Position())
    np.testing.assert_array_equal(np.stack([x for x, _ in again]), np.stack([x for x, _ in full]))


def test_workers_one_checkpoint_apart_agree_on_the_older(tmp_path, monkeypatch):
    """A kill between two workers' renames: the one ahead takes its previous."""
    from zfkeras import distribute

    model = _tiny_model()
    checkpoint.save(str(tmp_path), model, checkpoint.Position(0, 5), 10)
    checkpoint.save(str(tmp_path), model, checkpoint.Position(0, 6), 10)
    monkeypatch.setattr(distribute, "num_workers", lambda strategy: 2)
    here = checkpoint.Position(0, 6)
    others = {"value": train._global_step(checkpoint.Position(0, 5))}
    monkeypatch.setattr(
        distribute, "all_gather_int", lambda strategy, value: [value, others["value"]]
    )
    assert train._agree(None, str(tmp_path), here) == checkpoint.Position(0, 5)
    others["value"] = train._global_step(checkpoint.Position(0, 6))
    assert train._agree(None, str(tmp_path), here) == here
    others["value"] = 0  # the other worker had saved nothing yet
    assert train._agree(None, str(tmp_path), here) == checkpoint.Position()
    others["value"] = train._global_step(checkpoint.Position(0, 2))
    with pytest.raises(Error, match="cannot be matched"):
        train._agree(None, str(tmp_path), here)


_MIRRORED_RESUME = """
import os, signal, sys, threading, time
from zfkeras import quiet
tf = quiet.import_tensorflow()
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import dataclasses, keras, numpy as np
from zfkeras import train
data_dir, root = sys.argv[1], sys.argv[2]
config = train.TrainConfig(
    workdir=os.path.join(root, "a"), dataset="folder:" + data_dir, resize_size=64, crop_size=56,
    channels=1, width=0.125, fc_units=16, conv_widths=(64, 64, 64), init="he",
    input_scale=1 / 64, batch_size=4, epochs=2, snapshot_epochs=(), eval_crops=(1,),
    eval_batch_size=4, verbose=0, evolution_maps=0, deterministic=True,
    checkpoint_every_steps=1, strategy="mirrored")
train.train_and_evaluate(config)
resumed = dataclasses.replace(config, workdir=os.path.join(root, "b"))
def interrupt_after_the_first_checkpoint():
    while not os.path.exists(os.path.join(resumed.workdir, "backup", "checkpoint.npz")):
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=interrupt_after_the_first_checkpoint, daemon=True).start()
try:
    train.train_and_evaluate(resumed)
    print("not interrupted")
except train.Interrupted as e:
    print(e)
train.train_and_evaluate(resumed)
def weights(name):
    path = os.path.join(root, name, "model.keras")
    return [np.asarray(w) for w in keras.saving.load_model(path, compile=False).weights]
same = all(np.array_equal(x, y) for x, y in zip(weights("a"), weights("b")))
print("identical" if same else "different")
"""


@pytest.mark.slow
def test_mirrored_two_replicas_resume_exactly(crash_setup, tmp_path):
    """MirroredStrategy over 2 logical CPUs: SIGINT mid-run, resume, same weights."""
    root, _, _ = crash_setup
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_RESUME, str(root / "data"), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "identical", result.stdout
    assert "SIGINT: stopped at" in result.stdout, result.stdout


def test_shuffling_raw_images_or_views_gives_the_same_batches(stream_config, monkeypatch):
    """Small raw images are shuffled before their view: the batches do not change."""
    config, preprocessing, mean = stream_config
    start = checkpoint.Position(2, 1)
    monkeypatch.setattr(train, "_raw_fits_in_view", lambda raw, preprocessing: False)
    views_first = _batches(config, preprocessing, mean, start)
    monkeypatch.setattr(train, "_raw_fits_in_view", lambda raw, preprocessing: True)
    raw_first = _batches(config, preprocessing, mean, start)
    assert len(views_first) == len(raw_first) == 4
    for (xa, ya), (xb, yb) in zip(views_first, raw_first):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
