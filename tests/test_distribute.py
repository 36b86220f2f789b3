"""Tests for zfkeras/distribute.py.

The training runs happen in subprocesses (tests/distribute_worker.py): logical
CPU devices and multi-worker collectives must be configured before the first
TensorFlow op, which this pytest process has long passed.
"""

import json
import os
import socket
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from zfkeras import distribute
from zfkeras.errors import Error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "distribute_worker.py")
# Generous: on 2 loaded cores one run takes 20-60 s; a hung collective must
# fail the test rather than block CI.
TIMEOUT_SECONDS = 300
# Splitting a global batch over replicas changes only the float32 summation
# order of the gradients (two half-batch means summed vs one full-batch mean).
# Over the 12 SGD steps of a run this moves weights of size 0.01-0.4 by at most
# ~1.1e-6 (measured). A gradient twice too large (summed, not averaged, over
# replicas) moves every weight array by > 5e-3 (measured with a doubled
# learning rate); losing a replica's half-batch moves them by more.
WEIGHT_ATOL = 1e-5
LOSS_RTOL = 1e-5


def _env(tf_config=None):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _start(out_dir, result_file, strategy, *extra, tf_config=None):
    command = [sys.executable, WORKER, f"--strategy={strategy}", f"--out_dir={out_dir}"]
    command += [f"--result_file={result_file}", *extra]
    return subprocess.Popen(
        command,
        env=_env(tf_config),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_all(processes):
    """Waits for every process; kills all of them if any hangs or fails."""
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_SECONDS)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
            process.communicate()
        pytest.fail(f"a training process did not finish within {TIMEOUT_SECONDS} s")
    for process, output in zip(processes, outputs):
        if process.returncode != 0:
            for other in processes:
                if other.poll() is None:
                    other.kill()
            pytest.fail(f"training process exited with {process.returncode}:\n{output[-3000:]}")


def _run(tmp_path, name, strategy, *extra):
    out_dir = tmp_path / name
    out_dir.mkdir()
    result_file = out_dir / "result.npz"
    _wait_all([_start(out_dir, result_file, strategy, *extra)])
    return dict(np.load(result_file))


def _weights(result):
    count = sum(key.startswith("weight_") for key in result)
    return [result[f"weight_{i}"] for i in range(count)]


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _h5_arrays(path):
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
        )
    return arrays


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training without distribution."""
    return _run(tmp_path_factory.mktemp("reference"), "default", "default")


def _assert_matches_reference(result, reference):
    for got, want in zip(_weights(result), _weights(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=WEIGHT_ATOL)
    np.testing.assert_allclose(result["loss"], reference["loss"], rtol=LOSS_RTOL)


# Training under strategies.


def test_reference_run_learns(reference):
    assert int(reference["replicas"]) == 1
    assert reference["loss"][-1] < 0.6 * reference["loss"][0]


def test_mirrored_on_two_logical_cpus_matches_default(tmp_path, reference):
    result = _run(tmp_path, "mirrored", "mirrored", "--logical_cpus=2")
    assert int(result["replicas"]) == 2
    _assert_matches_reference(result, reference)


def test_two_workers_train_to_identical_weights(tmp_path, reference):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        result_file = tmp_path / f"result{index}.npz"
        processes.append(_start(tmp_path, result_file, "multi_worker", tf_config=tf_config))
    _wait_all(processes)
    chief, worker = (dict(np.load(tmp_path / f"result{i}.npz")) for i in range(2))

    for a, b in zip(_weights(chief), _weights(worker), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(chief["val_loss"], worker["val_loss"])
    assert chief["loss"][-1] < 0.6 * chief["loss"][0]
    assert int(chief["replicas"]) == 2
    assert str(chief["shard_policy"]) == "DATA"
    _assert_matches_reference(chief, reference)

    # Checkpoints: the chief's in the work dir, the worker's throwaway copy
    # gone, and one backup per worker with the same content.
    assert [bool(chief["is_chief"]), bool(worker["is_chief"])] == [True, False]
    assert (tmp_path / "model.weights.h5").is_file()
    assert not (tmp_path / "workertemp_1").exists()
    backups = [_h5_arrays(tmp_path / d / "latest.weights.h5") for d in ("backup", "backup_worker1")]
    assert backups[0].keys() == backups[1].keys() and backups[0]
    for name, array in backups[0].items():
        np.testing.assert_array_equal(array, backups[1][name], err_msg=name)


# make_strategy errors.


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(Error, match="unknown strategy 'gpu'") as info:
        distribute.make_strategy("gpu")
    for name in distribute.STRATEGIES:
        assert name in str(info.value)


def test_multi_worker_without_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(Error, match="^TF_CONFIG: not set"):
        distribute.make_strategy("multi_worker")


@pytest.mark.parametrize(
    "tf_config, problem",
    [
        ("{cluster:", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', "'cluster' must map"),
        ('{"cluster": {"worker": "a:1"}, "task": {"type": "worker"}}', "non-empty list"),
        ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker"}}', "non-empty list"),
        ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "job 'ps'"),
        ('{"cluster": {"chief": ["a:1", "b:2"]}, "task": {"type": "chief"}}', "one chief"),
        ('{"cluster": {"worker": ["a:1"]}}', "'task' must be an object"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief"}}', "not a job"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "index 1"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}', "index"),
    ],
)
def test_multi_worker_malformed_tf_config(monkeypatch, tf_config, problem):
    # TF_CONFIG is checked before anything touches TensorFlow's runtime.
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(Error, match="^TF_CONFIG: ") as info:
        distribute.make_strategy("multi_worker")
    assert problem in str(info.value)
    assert "\n" not in str(info.value)


def test_tpu_without_address(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    with pytest.raises(Error, match="^tpu: no TPU found"):
        distribute.make_strategy("tpu")


def test_tpu_unreachable_address_fails_fast():
    (port,) = _free_ports(1)
    with pytest.raises(Error, match=f"^tpu: no TPU reachable at grpc://127.0.0.1:{port}"):
        distribute.make_strategy("tpu", tpu_address=f"grpc://127.0.0.1:{port}")


def test_patch_refuses_other_keras_versions(monkeypatch):
    monkeypatch.setattr(keras, "version", lambda: "3.16.0")
    with pytest.raises(Error, match="keras 3.16.0: .* written for Keras 3.15.x"):
        distribute.patch_keras_for_multi_worker()


def test_patch_is_idempotent_and_keeps_originals(monkeypatch):
    from keras.src.backend.tensorflow import trainer as tf_trainer

    # Undo everything after the test so the rest of the suite runs unpatched.
    trainer_class = tf_trainer.TensorFlowTrainer
    original_build = trainer_class.__dict__["_maybe_symbolic_build"]
    original_reduce = tf_trainer.reduce_per_replica
    monkeypatch.setattr(distribute, "_ORIGINALS", {})
    monkeypatch.setattr(trainer_class, "_maybe_symbolic_build", original_build)
    monkeypatch.setattr(tf_trainer, "reduce_per_replica", original_reduce)

    distribute.patch_keras_for_multi_worker()
    patched = (trainer_class.__dict__["_maybe_symbolic_build"], tf_trainer.reduce_per_replica)
    distribute.patch_keras_for_multi_worker()

    assert patched == (distribute._maybe_symbolic_build, distribute._reduce_per_replica)
    assert trainer_class.__dict__["_maybe_symbolic_build"] is patched[0]
    assert tf_trainer.reduce_per_replica is patched[1]
    assert distribute._ORIGINALS["build"] is original_build
    assert distribute._ORIGINALS["reduce"] is original_reduce
    # Outside multi-worker mode the patched reduction is Keras' own.
    strategy = tf.distribute.get_strategy()
    logs = tf_trainer.reduce_per_replica({"loss": tf.constant(2.0)}, strategy, "auto")
    assert float(logs["loss"]) == 2.0


# Helpers under a single-worker strategy, and the chief rule.


def test_single_worker_helpers(tmp_path):
    strategy = distribute.make_strategy("default")
    workdir = str(tmp_path)
    assert distribute.is_chief(strategy)
    assert distribute.worker_dir(workdir, strategy) == workdir
    assert distribute.backup_dir(workdir, strategy) == os.path.join(workdir, "backup")
    distribute.remove_worker_dir(workdir, strategy)
    assert os.path.isdir(workdir)
    dataset = tf.data.Dataset.range(4).batch(2)
    assert distribute.distribute_dataset_options(dataset, strategy) is dataset


@pytest.mark.parametrize(
    "task_type, task_id, jobs, chief",
    [
        ("worker", 0, ("worker",), True),
        ("worker", 1, ("worker",), False),
        ("chief", 0, ("chief", "worker"), True),
        ("worker", 0, ("chief", "worker"), False),
    ],
)
def test_chief_rule(monkeypatch, task_type, task_id, jobs, chief):
    cluster = {job: ["127.0.0.1:1", "127.0.0.1:2"] for job in jobs}
    monkeypatch.setattr(distribute, "_task", lambda strategy: (task_type, task_id, cluster))
    assert distribute.is_chief(None) is chief
