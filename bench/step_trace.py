"""Where the whole training step's time goes, read from TensorFlow's profiler.

    python bench/step_trace.py --batch_size=32           # ZFNet 224x224 (~1 min)
    python bench/step_trace.py --forward                 # the inference forward pass instead
    python bench/step_trace.py --keep_trace=/tmp/trace   # also keep the raw trace (TensorBoard)
    python bench/step_trace.py --smoke                   # a tiny model (used by the tests)

`layer_profile.py` times each layer alone. This script traces the real
compiled step instead (`train_on_batch` on one in-memory batch, as
train_bench's bare step) with `tf.profiler`, after warm-up steps, and reads
the trace: every TensorFlow op the step ran, with its start and end on
TensorFlow's inter-op threads. It prints, per step:

- per layer: the wall time of its forward ops, input-gradient ops,
  weight-gradient ops and other backward ops (ReLU, pooling and bias
  gradients), ms; for convolutions and dense layers also the GFLOP/s of the
  forward and of each gradient while it ran. An activation's ops count for
  the layer before it (TensorFlow fuses the ReLU into the convolution).
  Rows with a total only: `XLA`, the compiled clusters, forward and
  backward (in ZFNet the contrast normalisations, which the trace does not
  name); `SGD update`, the optimizer's ops with the filter
  renormalisation; `loss`; `other` (metrics, bookkeeping).
- concurrency: the share of the traced span in which no op, one op, or two
  or more ops ran. Ops that run at the same time share the cores, so the
  per-op times add up to more than the wall time where two or more overlap.

The profiler costs a little time itself: compare `step, traced` with
`step, not traced` (medians of the same number of steps; the untraced steps
alternate with the 4096^3 matmul that gives the ceiling).

`--forward` traces inference instead, as inference_bench's Keras model runs
it: ZFNet with 1,000 classes, `model(x, training=False)` in a `tf.function`.
"""

import collections
import glob
import os
import re
import shutil
import statistics
import tempfile
import time

import common
import flops
from absl import app, flags

_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Input height and width.", lower_bound=32)
_WIDTH = flags.DEFINE_float("width", 1.0, "Conv filter multiplier.", lower_bound=0.01)
_FC_UNITS = flags.DEFINE_integer("fc_units", 4096, "Width of fc6 and fc7.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 5, "Traced steps (and untraced ones).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps first.", lower_bound=1)
_KEEP = flags.DEFINE_string("keep_trace", "", "Keep the raw trace in this folder (TensorBoard).")
_FORWARD = flags.DEFINE_bool("forward", False, "Trace the inference forward pass instead.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, one step (for tests).")
flags.register_validator(
    "keep_trace",
    lambda path: not (path and os.path.isdir(path) and os.listdir(path)),
    message="must be a new or empty folder (the trace's file is found by its name pattern)",
)

KINDS = ("forward", "input gradient", "weight gradient", "other backward")
SGD, XLA, LOSS, OTHER = "SGD update", "XLA", "loss", "other"


def op_events(xspace):
    """[(name, op type, start ps, end ps)] of every op on TensorFlow's inter-op threads."""
    plane = next(p for p in xspace.planes if p.name == "/host:CPU")
    events = []
    for line in plane.lines:
        if not line.name.startswith("tf_Compute"):
            continue
        for event in line.events:
            name = plane.event_metadata[event.metadata_id].name
            start = line.timestamp_ns * 1000 + event.offset_ps
            if name == "CpuExecutable::ExecuteAsyncOnStream":  # an XLA cluster's run
                events.append((name, XLA, start, start + event.duration_ps))
            elif ":" in name and "::" not in name:  # "scope/op_name:OpType"
                op_name, op_type = name.rsplit(":", 1)
                events.append((op_name, op_type, start, start + event.duration_ps))
    return events


def _producers(model):
    """{activation layer name: the weighted layer before it}."""
    producers, previous = {}, None
    for layer in model.layers:
        if layer.name.startswith("relu") and previous is not None:
            producers[layer.name] = previous
        previous = layer.name if hasattr(layer, "kernel") else None
    return producers


def classify(op_name, op_type, layer_names, producers):
    """(row, kind) of one op: a layer name and one of KINDS, or a non-layer row and None."""
    if op_type == XLA:
        return XLA, None
    parts = op_name.split("/")
    backward = parts[0] == "gradient_tape"
    if parts[0] == "sgd":
        return SGD, None
    if parts[backward] == "compile_loss":
        return LOSS, None
    layer = next((p for p in (re.sub(r"_\d+$", "", q) for q in parts) if p in layer_names), None)
    if layer is None:
        return OTHER, None
    # An activation's ops count for the layer before it: TensorFlow fuses
    # them (relu1/Relu:_MklNativeFusedConv2D is conv1's forward pass).
    layer = producers.get(layer, layer)
    if not backward:
        return layer, "forward"
    if "BackpropFilter" in op_type:
        return layer, "weight gradient"
    if "BackpropInput" in op_type:
        return layer, "input gradient"
    if op_type.endswith("MatMul"):
        # TensorFlow's MatMul gradient makes the input's product first
        # (".../MatMul") and then the kernel's (".../MatMul_1").
        return layer, "weight gradient" if op_name.endswith("_1") else "input gradient"
    return layer, "other backward"


def concurrency(events):
    """{0, 1, 2: picoseconds of the events' span with that many running (2: two or more)}."""
    edges = sorted([(s, 1) for _, _, s, _ in events] + [(e, -1) for _, _, _, e in events])
    shares = {0: 0, 1: 0, 2: 0}
    running, last = 0, edges[0][0] if edges else 0
    for time_ps, change in edges:
        shares[min(running, 2)] += time_ps - last
        running, last = running + change, time_ps
    return shares


def summarise(events, model, steps):
    """{row: {kind: ms per step}} in model order, then the non-layer rows (kind None)."""
    names = [layer.name for layer in model.layers]
    producers = _producers(model)
    totals = collections.defaultdict(lambda: collections.defaultdict(float))
    for op_name, op_type, start, end in events:
        row, kind = classify(op_name, op_type, set(names), producers)
        totals[row][kind] += (end - start) / 1e9 / steps
    order = [n for n in names if n in totals] + [r for r in (XLA, SGD, LOSS, OTHER) if r in totals]
    return {row: dict(totals[row]) for row in order}


def _trace(tf, step, steps, directory):
    """Runs `steps` traced steps; returns (their median seconds, the parsed XSpace)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    options = tf.profiler.experimental.ProfilerOptions(
        host_tracer_level=2, python_tracer_level=0, device_tracer_level=0
    )
    times = []
    tf.profiler.experimental.start(directory, options=options)
    try:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    finally:
        tf.profiler.experimental.stop()
    (path,) = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    xspace = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        xspace.ParseFromString(f.read())
    return statistics.median(times), xspace


def _fmt(value):
    return f"{value:.1f}" if value else "-"


def _rate(flop, ms):
    return f"{flop / ms / 1e6:.0f}" if ms else "-"


def _layer_table(rows, model, batch):
    """The per-layer Markdown table of `summarise`'s rows."""
    counted = dict(flops.forward_flops(model))
    first = next(iter(counted), None)
    table_rows = []
    for row, kinds in rows.items():
        total = sum(kinds.values())
        if None in kinds:  # a non-layer row: its total only
            table_rows.append((row, "", "", "", "", _fmt(total), "", "", ""))
            continue
        forward, dx, dw, other = (kinds.get(k, 0.0) for k in KINDS)
        flop = counted.get(row, 0) * batch
        rates = ("", "", "")
        if flop:
            dx_rate = "n/a" if row == first else _rate(flop, dx)
            rates = (_rate(flop, forward), dx_rate, _rate(flop, dw))
        table_rows.append((row, *(_fmt(v) for v in (forward, dx, dw, other)), _fmt(total), *rates))
    op_ms = sum(sum(k.values()) for k in rows.values())
    table_rows.append(("**all ops**", "", "", "", "", f"{op_ms:.1f}", "", "", ""))
    header = (
        "layer",
        "forward ms",
        "input grad ms",
        "weight grad ms",
        "other backward ms",
        "total ms",
        "forward GFLOP/s",
        "input grad GFLOP/s",
        "weight grad GFLOP/s",
    )
    return common.table(header, table_rows)


def main(argv):
    del argv
    size, width, fc_units, batch = _INPUT_SIZE.value, _WIDTH.value, _FC_UNITS.value, _BATCH.value
    steps, warmup = _STEPS.value, _WARMUP.value
    if _SMOKE.value:
        size, width, fc_units, batch, steps, warmup = 48, 0.125, 16, 2, 1, 1
    from zfkeras import quiet

    tf = quiet.import_tensorflow()

    if _FORWARD.value:
        model = common.inference_model(size, width, fc_units)
        step = common.forward_step(model, batch, size)
        unit, step_flop = "pass", sum(f for _, f in flops.forward_flops(model)) * batch
    else:
        config = common.training_config(batch, size, width, fc_units)
        model = common.compiled_training_model(config)
        step = common.train_step(model, batch, size)
        unit, step_flop = "step", flops.training_flops(model) * batch
    matmul_size = 256 if _SMOKE.value else common.MATMUL_SIZE
    matmul = common.matmul_worker(matmul_size)["matmul"]
    for _ in range(warmup):
        step()
    matmul()
    untraced, matmuls = [], []
    for _ in range(steps):  # the untraced steps alternate with the ceiling's matmul
        for work, times in ((step, untraced), (matmul, matmuls)):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
    ceiling = common.matmul_flops(matmul_size) / statistics.median(matmuls) / 1e9
    directory = _KEEP.value or tempfile.mkdtemp(prefix="step_trace_")
    try:
        traced_s, xspace = _trace(tf, step, steps, directory)
    finally:
        if not _KEEP.value:
            shutil.rmtree(directory, ignore_errors=True)
    events = op_events(xspace)

    print(common.machine_info())
    what = "forward pass" if _FORWARD.value else "training step"
    print(f"ZFNet {size}x{size}, {what}, batch {batch}, {steps} traced after {warmup} warm-up\n")
    print(_layer_table(summarise(events, model, steps), model, batch))
    shares = concurrency(events)
    span = sum(shares.values()) or 1
    untraced_s = statistics.median(untraced)
    print()
    print(
        common.table(
            ("measurement", "value"),
            [
                ("matmul ceiling", f"{ceiling:.1f} GFLOP/s"),
                (f"{unit}, not traced", f"{untraced_s * 1000:.1f} ms"),
                (
                    f"{unit}, not traced, of ceiling",
                    f"{step_flop / untraced_s / 1e9 / ceiling:.2f}",
                ),
                (f"{unit}, traced", f"{traced_s * 1000:.1f} ms"),
                (f"{unit}, traced, of ceiling", f"{step_flop / traced_s / 1e9 / ceiling:.2f}"),
                (f"traced span, per {unit}", f"{span / 1e9 / steps:.1f} ms"),
                ("no op running", f"{shares[0] / span:.0%}"),
                ("one op running", f"{shares[1] / span:.0%}"),
                ("two or more ops running", f"{shares[2] / span:.0%}"),
            ],
        )
    )
    if _KEEP.value:
        print(
            f"\ntrace kept in {_KEEP.value} (TensorBoard's Profile tab shows it, with the"
            " tensorboard-plugin-profile package installed)"
        )


if __name__ == "__main__":
    app.run(main)
