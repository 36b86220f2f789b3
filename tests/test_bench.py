"""Smoke tests of the benchmark scripts: each runs once on a tiny model; nothing is timed."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO

BENCH = os.path.join(REPO, "bench")


def bench_process(name, *args):
    """The finished process of one benchmark script run."""
    return subprocess.run(
        [sys.executable, os.path.join(BENCH, f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )


def run_bench(name, *args):
    result = bench_process(name, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(text):
    """{first cell: other cells} of the Markdown table rows in `text`."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(line) <= set("|- "):
            rows.setdefault(cells[0], cells[1:])  # the first table wins
    return rows


def test_flops_counts_the_paper_model():
    out = run_bench("flops")
    rows = table_rows(out)
    assert rows["**forward**"][0] == "2,336.1"  # ZFNet at 224x224x3, 1000 classes
    assert rows["**training step**"][0] == "6,666.7"
    assert rows["conv2"][0] == "830.7"


def test_deconv_bench_smoke():
    rows = table_rows(run_bench("deconv_bench", "--smoke"))
    for name in (
        "forward b4",
        "one per image b4",
        "maps of one image b4",
        "switches, whole maps b4",
    ):
        assert name in rows
    assert float(rows["one per image b4"][3]) > 0  # cost in forward passes


def test_inference_bench_smoke():
    rows = table_rows(run_bench("inference_bench", "--smoke"))
    for name in (
        "keras b2",
        "savedmodel b2",
        "savedmodel xla b2",
        "litert float32 b2",
        "litert int8 b1",
        "one process: keras b2",
        "one process: savedmodel b1",
        "one process: savedmodel xla b2",
    ):
        assert float(rows[name][0]) > 0  # images/s


def test_mining_bench_smoke():
    rows = table_rows(run_bench("mining_bench", "--smoke"))
    for n in (6, 12):
        assert float(rows[f"mine N={n}"][4]) > 0  # x reference
        assert "project" in rows[f"mine N={n}"][1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_images")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        os.makedirs(root / name)
        for i in range(10):
            image = rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)
            (root / name / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    return root


def test_train_bench_smoke(image_folder):
    rows = table_rows(run_bench("train_bench", "--smoke", f"--dataset=folder:{image_folder}"))
    assert float(rows["bare b4"][0]) > 0
    assert float(rows["pipeline b4"][3]) > 0  # x bare step


def test_towers_bench_smoke():
    rows = table_rows(run_bench("towers_bench", "--smoke"))
    assert set(rows) >= {"one tower", "two towers", "two towers, tf grouped"}
    assert rows["one tower"][2] == "1.00"  # its own time ratio


def test_onednn_bench_smoke():
    # Its workers run in their own processes and raise if TF_ENABLE_ONEDNN_OPTS
    # did not take, so this also checks that each setting reached TensorFlow.
    rows = table_rows(run_bench("onednn_bench", "--smoke"))
    for name in ("matmul", "forward b2", "train b2"):
        assert float(rows[name][0]) > 0 and float(rows[name][1]) > 0  # off, on
        assert float(rows[name][2]) > 0  # speed-up


def test_noise_bench_smoke():
    out = run_bench("noise_bench", "--smoke")
    rows = table_rows(out)
    for name in ("matmul ceiling", "memory copy", "training step"):
        lowest, median, highest = (float(rows[name][i]) for i in (1, 3, 5))
        assert 0 < lowest <= median <= highest
    assert "ratio of the medians" in out and "correlation over the rounds" in out


def test_noise_bench_forward_smoke():
    rows = table_rows(run_bench("noise_bench", "--smoke", "--forward"))
    assert float(rows["inference pass"][3]) > 0


def test_worker_env_is_refused_inline(monkeypatch):
    # Inline, TensorFlow is already imported: an environment setting could not take.
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.delitem(sys.modules, "common", raising=False)
    import common

    worker = common.Worker("w", dict, env={"TF_ENABLE_ONEDNN_OPTS": "0"})
    with pytest.raises(ValueError, match="not inline"):
        common.run_session([worker], repeats=1, inline=True)


def test_layer_profile_smoke():
    rows = table_rows(run_bench("layer_profile", "--smoke"))
    assert "conv1" in rows and "sgd update" in rows
    assert float(rows["**train step**"][1]) > 0  # ms


def test_step_trace_smoke():
    out = run_bench("step_trace", "--smoke")
    rows = table_rows(out)
    # header: forward, input grad, weight grad, other backward, total (ms), then 3 rates
    assert "fc6" in rows and "XLA" in rows  # the contrast normalisations
    for name in ("conv1", "conv2", "conv5"):
        assert float(rows[name][0]) > 0 and float(rows[name][2]) > 0, name  # forward, dW
    assert rows["conv1"][1] == "-" and rows["conv1"][6] == "n/a"  # no image gradient
    assert float(rows["conv2"][1]) > 0  # input gradient
    assert "relu1" not in rows  # the fused ReLU counts for conv1
    assert float(rows["SGD update"][4]) > 0 and rows["SGD update"][0] == ""
    shares = [int(rows[k][0].rstrip("%")) for k in ("no op running", "one op running")]
    shares.append(int(rows["two or more ops running"][0].rstrip("%")))
    assert 98 <= sum(shares) <= 102  # rounded shares of one span


def test_step_trace_forward_smoke():
    rows = table_rows(run_bench("step_trace", "--smoke", "--forward"))
    assert float(rows["conv2"][0]) > 0 and rows["conv2"][1:4] == ["-", "-", "-"]  # no gradients
    assert "SGD update" not in rows and float(rows["pass, traced"][0].split()[0]) > 0


def test_step_trace_refuses_a_used_trace_folder(tmp_path):
    (tmp_path / "old.xplane.pb").write_bytes(b"")
    result = bench_process("step_trace", "--smoke", f"--keep_trace={tmp_path}")
    assert result.returncode != 0
    assert "--keep_trace" in result.stderr and "new or empty folder" in result.stderr


def test_step_trace_classifies_ops(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import step_trace

    names = {"conv1", "relu1", "conv2", "fc6", "pool1"}
    producers = {"relu1": "conv1"}

    def kind(op_name, op_type):
        return step_trace.classify(op_name, op_type, names, producers)

    assert kind("zfnet_1/relu1_1/Relu", "_MklNativeFusedConv2D") == ("conv1", "forward")
    assert kind("gradient_tape/zfnet_1/relu1_1/ReluGrad", "ReluGrad") == (
        "conv1",
        "other backward",
    )
    prefix = "gradient_tape/zfnet_1/conv2_1/convolution/"
    assert kind(prefix + "Conv2DBackpropFilter", "_MklNativeConv2DBackpropFilterWithBias") == (
        "conv2",
        "weight gradient",
    )
    assert kind(prefix + "Conv2DBackpropInput", "_MklNativeConv2DBackpropInput") == (
        "conv2",
        "input gradient",
    )
    grad = "gradient_tape/zfnet_1/fc6_1/MatMul/"
    assert kind(grad + "MatMul", "_MklMatMul") == ("fc6", "input gradient")
    assert kind(grad + "MatMul_1", "_MklMatMul") == ("fc6", "weight gradient")
    assert kind("zfnet_1/pool1_1/MaxPool2d", "_MklNativeMaxPool") == ("pool1", "forward")
    assert kind("sgd/ResourceApplyKerasMomentum_3", "ResourceApplyKerasMomentum")[0] == "SGD update"
    assert kind("compile_loss/x/SparseSoftmaxCrossEntropyWithLogits", "S")[0] == "loss"
    assert kind("Cast_6", "Cast") == ("other", None)
    assert kind("CpuExecutable::ExecuteAsyncOnStream", step_trace.XLA) == ("XLA", None)


def test_step_trace_concurrency_counts_overlap(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import step_trace

    # a: 0-10, b: 5-20, gap 20-30, c: 30-40 (picoseconds)
    events = [("a", "T", 0, 10), ("b", "T", 5, 20), ("c", "T", 30, 40)]
    assert step_trace.concurrency(events) == {0: 10, 1: 25, 2: 5}


def test_worker_processes_report_memory(monkeypatch):
    # The spawned worker unpickles `common.matmul_worker`: bench/ must stay on the path.
    # Spawned workers start a fresh interpreter: give them bench/ through PYTHONPATH too,
    # whatever other tests did to this process's sys.path and modules.
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([BENCH, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delitem(sys.modules, "common", raising=False)
    import common

    session = common.run_session(
        [common.Worker("matmul", common.matmul_worker, {"size": 64})], repeats=2, min_block_s=0.0
    )
    result = session.results["matmul"]
    assert len(result.per_item_s) == 2 and result.rate > 0
    memory = session.memory_mb["matmul"]
    assert memory["peak"] >= memory["baseline"] > 0
    assert "| matmul" in common.memory_table(session)


def test_ratios_are_taken_per_repetition(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import common

    # The machine is twice as slow in the second repetition: both measurements
    # slow down, and their per-repetition ratio does not move.
    size = 2  # the matmul does 2 * 2**3 = 16 FLOP
    results = {
        "matmul": common.Result("matmul", "w", [1.0, 2.0, 1.0]),
        "step": common.Result("step", "w", [4.0, 8.0, 2.0]),
    }
    session = common.Session(results, {}, repeats=3)
    assert session.ratios("step", "matmul") == [4.0, 4.0, 2.0]
    assert session.ratio("step", "matmul") == 4.0
    # 32 FLOP per item: 8, 4 and 16 FLOP/s against the matmul's 16, 8 and 16.
    assert session.of_ceiling("step", 32.0, size) == [0.5, 0.5, 1.0]
    assert common.median_range([0.5, 0.5, 1.0]) == "0.50 (0.50-1.00)"
    assert common.median_range([0.734]) == "0.73"
    assert common.ranges_caption(3, ("a", "b"), "note") == (
        "median of 3 interleaved repetitions; note; a and b: median (lowest-highest) of "
        "per-repetition ratios"
    )
