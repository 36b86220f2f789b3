"""TensorFlow's oneDNN kernels against its Eigen kernels, on this CPU.

    python bench/onednn_bench.py            # ZFNet 224x224, batch 32 (~3 min)
    python bench/onednn_bench.py --smoke    # a tiny model, seconds (used by the tests)

TensorFlow turns its oneDNN kernels on by itself only on x86 CPUs with
AVX-512 VNNI, BF16 or AMX; importing zfkeras first turns them on on every
x86-64 CPU (zfkeras/__init__.py). This measures what that choice is worth
here. TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it is imported, so
each setting runs in its own worker processes (each checks that the setting
took), interleaved as in the other benchmarks:

- `matmul`: the machine ceiling (a 4096^3 float32 matmul through TensorFlow).
- `forward bB`: Keras inference of ZFNet (1000 classes), `model(x,
  training=False)` in a `tf.function`, on one in-memory batch.
- `train bB`: `train_on_batch` of tools/train.py's model (10 classes,
  zfkeras' SGD) on one in-memory batch, as `bare` in train_bench.py.

Reported per measurement: images/s (GFLOP/s for the matmul) with oneDNN off
and on, the speed-up (median of per-repetition time ratios off / on), and
with oneDNN on the achieved GFLOP/s and fraction of the oneDNN matmul
ceiling (the higher of the two ceilings on every CPU measured so far).
"""

import common
import flops
from absl import app, flags

_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Model input size.", lower_bound=32)
_WIDTH = flags.DEFINE_float("width", 1.0, "Conv filter multiplier.", lower_bound=0.01)
_FC_UNITS = flags.DEFINE_integer("fc_units", 4096, "Width of fc6 and fc7.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per batch.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repetitions.", lower_bound=1)
_MIN_BLOCK = flags.DEFINE_float("min_block_s", 3.0, "Shortest timed block, seconds.", 0.0)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, one repetition (for tests).")

_NUM_CLASSES = common.INFERENCE_CLASSES
_SETTINGS = (("off", "0"), ("on", "1"))


def _check_setting(label):
    """Raises unless TensorFlow's oneDNN state in this process is `label`."""
    from tensorflow.python.util import _pywrap_util_port as port

    enabled = bool(port.IsMklEnabled())
    if enabled != (label == "on"):
        raise RuntimeError(
            f"asked for oneDNN {label}, but TensorFlow has it {'on' if enabled else 'off'}"
        )


def matmul_worker(label, size):
    _check_setting(label)
    return {f"matmul oneDNN {label}": common.matmul_worker(size)["matmul"]}


def model_worker(label, batch, size, width, fc_units):
    _check_setting(label)
    infer = common.forward_step(common.inference_model(size, width, fc_units), batch, size)
    config = common.training_config(batch, size, width, fc_units)
    trained = common.compiled_training_model(config)
    return {
        f"forward b{batch} oneDNN {label}": infer,
        f"train b{batch} oneDNN {label}": common.train_step(trained, batch, size),
    }


def main(argv):
    del argv
    size, width, fc_units, batch = _INPUT_SIZE.value, _WIDTH.value, _FC_UNITS.value, _BATCH.value
    repeats, min_block, matmul_size = _REPEATS.value, _MIN_BLOCK.value, common.MATMUL_SIZE
    if _SMOKE.value:
        size, width, fc_units, batch, repeats, min_block, matmul_size = 48, 0.125, 16, 2, 1, 0, 256
    from zfkeras import quiet

    quiet.import_tensorflow()
    from zfkeras import models

    forward_flops = sum(
        f
        for _, f in flops.forward_flops(
            models.ZFNet(_NUM_CLASSES, (size, size, 3), width=width, fc_units=fc_units)
        )
    )
    step_flops = flops.training_flops(
        common.compiled_training_model(common.training_config(batch, size, width, fc_units))
    )
    print(
        f"zfnet {size}x{size}x3 width {width}, batch {batch}, float32; forward "
        f"{forward_flops / 1e9:.3f} GFLOP/image ({_NUM_CLASSES} classes), training step "
        f"{step_flops / 1e9:.3f} GFLOP/image ({common.TRAINING_CLASSES} classes)"
    )
    print(common.machine_info())
    workers = []
    for label, value in _SETTINGS:
        env = {"TF_ENABLE_ONEDNN_OPTS": value}
        workers.append(
            common.Worker(
                f"matmul oneDNN {label}",
                matmul_worker,
                dict(label=label, size=matmul_size),
                env=env,
            )
        )
        workers.append(
            common.Worker(
                f"model oneDNN {label}",
                model_worker,
                dict(label=label, batch=batch, size=size, width=width, fc_units=fc_units),
                env=env,
            )
        )
    session = common.run_session(workers, repeats, min_block, log=common.log_to_stderr)
    rows = []
    for kind, per_item in (
        ("matmul", common.matmul_flops(matmul_size)),
        (f"forward b{batch}", forward_flops),
        (f"train b{batch}", step_flops),
    ):
        off, on = (session.results[f"{kind} oneDNN {label}"] for label, _ in _SETTINGS)
        # The matmul's rate is shown in GFLOP/s, the models' in images/s.
        scale = per_item / 1e9 if kind == "matmul" else 1.0
        fraction = session.of_ceiling(on.name, per_item, matmul_size, "matmul oneDNN on")
        rows.append(
            (
                kind,
                f"{off.rate * scale:.1f}",
                f"{on.rate * scale:.1f}",
                common.median_range(session.ratios(off.name, on.name)),
                f"{per_item * on.rate / 1e9:.1f}",
                common.median_range(fraction),
                f"{max(off.spread, on.spread):.0%}",
            )
        )
    print(
        common.ranges_caption(
            repeats,
            ("speed-up", "'of ceiling'"),
            "matmul in GFLOP/s, the others in images/s",
            "ceiling: the matmul with oneDNN on",
        )
    )
    print(
        common.table(
            (
                "measurement",
                "oneDNN off",
                "oneDNN on",
                "speed-up",
                "on: GFLOP/s",
                "on: of ceiling",
                "spread",
            ),
            rows,
        )
    )
    print(common.memory_table(session))


if __name__ == "__main__":
    app.run(main)
