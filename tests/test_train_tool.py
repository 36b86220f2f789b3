"""tools/train.py and tools/evaluate.py end to end on tiny data, as a user runs them."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, run_tool

from zfkeras import checkpoint

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def make_shapes_folder(root, per_class=20, size=24):
    """Two classes a tiny net separates at once: a bright square left or right."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("left", "right")):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            image = rng.integers(0, 40, (size, size, 1)).astype(np.uint8)
            x0 = 2 if label == 0 else size // 2 + 2
            image[6:18, x0 : x0 + 8] = 220
            with open(os.path.join(root, name, f"{i:03d}.png"), "wb") as f:
                f.write(tf.io.encode_png(image).numpy())


TINY_FLAGS = """# A tiny ZFNet on two synthetic classes.
--resize_size=64
--crop_size=56
--channels=1
--width=0.125
--fc_units=16
--conv_widths=64,64,64
--init=he
--input_scale=0.015625
--batch_size=8
--epochs=2
--learning_rate=0.01
--lr_schedule=constant
--snapshot_epochs=1,2
--eval_crops=1,10
--eval_batch_size=4
--verbose=0
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_shapes_folder(str(root / "data"))
    flagfile = root / "tiny.cfg"
    flagfile.write_text(TINY_FLAGS + f"--dataset=folder:{root / 'data'}\n")
    workdir = root / "run"
    result = run_tool("train", f"--flagfile={flagfile}", f"--workdir={workdir}")
    return root, flagfile, workdir, result


def test_train_writes_a_complete_run(tiny_run):
    _, _, workdir, result = tiny_run
    assert result.returncode == 0, result.stderr
    for name in (
        "model.keras",
        "mean.npy",
        "run.json",
        "config.json",
        "flags.txt",
        "eval.json",
        "snapshots/epoch_001.keras",
        "snapshots/epoch_002.keras",
    ):
        assert os.path.isfile(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert "test (10-crop" in result.stdout
    # Quiet: no TensorFlow start-up chatter reaches the user.
    assert "oneDNN" not in result.stderr and "cuda" not in result.stderr.lower()
    results = json.loads((workdir / "eval.json").read_text())
    assert results["test_1crop"]["examples"] == 4
    assert results["test_10crop"]["crops"] == 10
    run = json.loads((workdir / "run.json").read_text())
    assert run["class_names"] == ["left", "right"]
    assert run["preprocessing"] == {
        "resize_size": 64,
        "crop_size": 56,
        "channels": 1,
        "input_scale": 0.015625,
        "border": 0.0,
    }


def test_flags_txt_reruns_and_resumes(tiny_run):
    _, _, workdir, _ = tiny_run
    flags_txt = (workdir / "flags.txt").read_text()
    assert "--width=0.125" in flags_txt and "--epochs=2" in flags_txt
    before = os.path.getmtime(workdir / "snapshots" / "epoch_001.keras")
    first_run_s = checkpoint.load(str(workdir / "backup")).state["extra"]["elapsed_s"]
    started = time.time()
    again = run_tool("train", f"--flagfile={workdir / 'flags.txt'}")
    rerun_s = time.time() - started
    assert again.returncode == 0, again.stderr
    # Both epochs were restored from the backup: no epoch ran again.
    assert os.path.getmtime(workdir / "snapshots" / "epoch_001.keras") == before
    results = json.loads((workdir / "eval.json").read_text())
    assert results["resumed"] is True
    # The history of the epochs trained before is kept in the checkpoints.
    assert len(results["history"]["loss"]) == 2
    # Wall time: the first run's, as its last checkpoint recorded it, plus this one's.
    assert first_run_s < results["wall_time_s"] < first_run_s + rerun_s


def test_more_epochs_continue_from_the_backup(tiny_run, tmp_path):
    root, flagfile, workdir, _ = tiny_run
    result = run_tool(
        "train",
        f"--flagfile={flagfile}",
        f"--workdir={workdir}",
        "--epochs=3",
        "--snapshot_epochs=1,2,3",
    )
    assert result.returncode == 0, result.stderr
    history = json.loads((workdir / "eval.json").read_text())["history"]
    # Only epoch 3 ran here; the history still starts at epoch 1.
    assert len(history["loss"]) == len(history["val_loss"]) == 3


def test_evaluate_tool(tiny_run):
    _, _, workdir, _ = tiny_run
    result = run_tool("evaluate", f"--checkpoint={workdir}", "--crops=1,10")
    assert result.returncode == 0, result.stderr
    out = json.loads((workdir / "eval_test.json").read_text())
    assert [r["crops"] for r in out["results"]] == [1, 10]
    assert "top-1 error" in result.stdout


def test_incompatible_config_is_refused(tiny_run):
    _, flagfile, workdir, _ = tiny_run
    result = run_tool("train", f"--flagfile={flagfile}", f"--workdir={workdir}", "--width=0.25")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "different config (width)" in result.stderr


def test_foreign_workdir_is_refused(tmp_path, tiny_run):
    _, flagfile, _, _ = tiny_run
    (tmp_path / "notes.txt").write_text("mine")
    result = run_tool("train", f"--flagfile={flagfile}", f"--workdir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().endswith("choose a new or empty --workdir")
    assert result.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


@pytest.mark.parametrize(
    "args, code, fragment",
    [
        (["--dataset=no_such_set"], 1, "unknown dataset 'no_such_set'"),
        (["--architecture=vgg"], 2, "zfnet|alexnet|alexnet2"),
        (["--crop_size=80"], 2, "crop_size must be <= resize_size"),
        (["--epochs=0"], 2, "epochs"),
        (["--border=1.5"], 2, "--border"),
        (["--lr_schedule=step"], 2, "--lr_boundaries"),
        (["--snapshot_epochs=1,x"], 2, "positive integers"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, tiny_run, args, code, fragment):
    _, flagfile, _, _ = tiny_run
    result = run_tool("train", f"--flagfile={flagfile}", f"--workdir={tmp_path / 'w'}", *args)
    assert result.returncode == code, result.stderr
    assert fragment in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not os.path.exists(tmp_path / "w" / "model.keras")


def test_missing_workdir_flag(tiny_run):
    result = run_tool("train", "--dataset=fashion_mnist")
    assert result.returncode == 2
    assert "workdir" in result.stderr and result.stderr.count("\n") == 1


def test_nan_loss_stops_with_a_clear_message(tmp_path, tiny_run):
    _, flagfile, _, _ = tiny_run
    result = run_tool(
        "train",
        f"--flagfile={flagfile}",
        f"--workdir={tmp_path / 'w'}",
        "--learning_rate=1e12",
        "--input_scale=1000",
    )
    assert result.returncode == 1
    assert "NaN/Inf" in result.stderr and result.stderr.count("\n") == 1
    assert not os.path.exists(tmp_path / "w" / "model.keras")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="needs dataset-fashion-mnist")
def test_real_fashion_mnist_tiny_run(tmp_path):
    """The quick start's path on the real IDX files, cut to a few hundred images."""
    flags = [
        "--flagfile=tools/configs/quickstart.cfg",
        f"--workdir={tmp_path / 'run'}",
        f"--data_dir={tmp_path / 'tfds'}",
        "--train_split=train[:256]",
        "--val_split=train[256:320]",
        "--test_split=test[:64]",
        "--epochs=1",
        "--width=0.125",
        "--fc_units=32",
        "--eval_crops=1",
    ]
    result = run_tool("train", *flags)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert out["test_1crop"]["examples"] == 64
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["dataset"] == "fashion_mnist" and len(run["class_names"]) == 10


def _free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_through_the_tool(tmp_path, tiny_run):
    """--strategy=multi_worker: two processes on 127.0.0.1 share one work dir."""
    _, flagfile, _, _ = tiny_run
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(REPO, "tools", "train.py"),
                    f"--flagfile={flagfile}",
                    f"--workdir={tmp_path / 'run'}",
                    "--strategy=multi_worker",
                    "--eval_crops=1",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=REPO,
            )
        )
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err
    assert (tmp_path / "run" / "model.keras").is_file()
    assert (tmp_path / "run" / "backup_worker1").is_dir()
    # Both workers end with the same evaluation: the weights were kept in sync.
    assert outputs[0][0].splitlines()[-2] == outputs[1][0].splitlines()[-2]
