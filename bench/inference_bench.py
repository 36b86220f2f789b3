"""Inference throughput: Keras, the exported SavedModel and LiteRT float32 / int8.

    python bench/inference_bench.py              # ZFNet 224x224, batch 1 and 32 (~6 min)
    python bench/inference_bench.py --smoke      # a tiny model, seconds (used by the tests)

A first process builds ZFNet (seed 0, 1000 classes) and exports it with
zfkeras_export's own code: the SavedModel (`savedmodel.write_savedmodel`,
TF Serving layout) and the float32 and int8 LiteRT models (`litert.convert`,
builtin ops only; int8 calibrated on `--int8_samples` random model inputs).
Then one worker process per format, interleaved with the matmul ceiling,
times batches of float32 model inputs (already preprocessed):

- `keras bB`: the Keras model loaded from its .keras file, a compiled
  `model(x)`.
- `savedmodel bB`: `tf.saved_model.load` and its `classify_inputs`
  signature (input check, softmax, top-5 classes and names).
- `savedmodel xla bB`: the same, exported with `savedmodel_xla` (Keras' XLA
  computations, instead of the same in plain TensorFlow ops).
- `litert float32 bB`, `litert int8 bB`: `ai_edge_litert` interpreters (one
  per batch size, 2 threads, XNNPACK) running `serving_default`; the int8
  inputs are quantized beforehand. These workers do not import TensorFlow.
- `one process: ...`: the Keras model and both SavedModels again, all in
  one worker, so that their ratio is also measured without what differs
  between processes (BENCHMARKS.md section 9).
"""

import os
import shutil
import tempfile

import common
import flops
import numpy as np
from absl import app, flags

_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Input height and width.", lower_bound=32)
_WIDTH = flags.DEFINE_float("width", 1.0, "Conv filter multiplier.", lower_bound=0.01)
_FC_UNITS = flags.DEFINE_integer("fc_units", 4096, "Width of fc6 and fc7.", lower_bound=1)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes to time.")
_INT8_SAMPLES = flags.DEFINE_integer(
    "int8_samples", 16, "Representative inputs for int8 calibration.", lower_bound=1
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repetitions.", lower_bound=1)
_MIN_BLOCK = flags.DEFINE_float("min_block_s", 1.5, "Shortest timed block, seconds.", 0.0)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, one repetition, inline (for tests).")

_NUM_CLASSES = common.INFERENCE_CLASSES
_SCALE = 50.0  # model inputs are pixels minus the mean: roughly N(0, 50)
_ONE_PROCESS = "one process: "


def _inputs(batch, size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, _SCALE, (batch, size, size, 3)).astype(np.float32)


def export_all(folder, size, width, fc_units, int8_samples):
    """Builds the model and writes model.keras, savedmodel/ and the .tflite files."""
    from zfkeras import quiet

    quiet.import_tensorflow()
    from zfkeras import data, fileio
    from zfkeras import layers as zlayers
    from zfkeras_export import graph, litert, savedmodel, source

    model = common.inference_model(size, width, fc_units)
    fileio.save_model(model, os.path.join(folder, "model.keras"))
    resize = round(size * 256 / 224)
    serving = graph.ServingGraph(
        source.Source(
            path=folder,
            model=model,
            preprocessing=data.Preprocessing(resize, size, 3, 1.0),
            mean=np.zeros((resize, resize, 3), np.float32),
            class_names=tuple(str(i) for i in range(_NUM_CLASSES)),
            conv_layers=(),  # classification only: the deconv signatures are not timed
            meta={},
        )
    )
    savedmodel.write_savedmodel(serving, os.path.join(folder, "savedmodel"))
    with serving.using_ops(zlayers.XLA):
        savedmodel.write_savedmodel(serving, os.path.join(folder, "savedmodel_xla"))

    def representative():
        for index in range(int8_samples):
            yield [_inputs(1, size, seed=100 + index)]

    with litert.lite_savedmodel(serving) as lite_path:
        for variant in ("float32", "int8"):
            content = litert.convert(lite_path, variant, (), representative)
            with open(os.path.join(folder, litert.model_file(variant)), "wb") as f:
                f.write(content)


def keras_worker(folder, size, batch_sizes):
    import keras
    import tensorflow as tf

    from zfkeras import layers  # noqa: F401  (registers the custom objects)

    model = keras.saving.load_model(os.path.join(folder, "model.keras"))
    forward = tf.function(lambda x: model(x, training=False))
    works = {}
    for batch in batch_sizes:
        tensor = tf.constant(_inputs(batch, size))

        def run(t=tensor, b=batch):
            forward(t).numpy()
            return b

        works[f"keras b{batch}"] = run
    return works


def savedmodel_worker(folder, size, batch_sizes, xla=False):
    import tensorflow as tf

    name, subfolder = ("savedmodel xla", "savedmodel_xla") if xla else ("savedmodel", "savedmodel")
    loaded = tf.saved_model.load(os.path.join(folder, subfolder))
    classify = loaded.signatures["classify_inputs"]
    works = {}
    for batch in batch_sizes:
        tensor = tf.constant(_inputs(batch, size))

        def run(t=tensor, b=batch):
            classify(inputs=t)["all_probabilities"].numpy()
            return b

        works[f"{name} b{batch}"] = run
    return works


def one_process_worker(folder, size, batch_sizes):
    works = {
        **keras_worker(folder, size, batch_sizes),
        **savedmodel_worker(folder, size, batch_sizes),
        **savedmodel_worker(folder, size, batch_sizes, xla=True),
    }
    return {f"{_ONE_PROCESS}{name}": run for name, run in works.items()}


def litert_worker(folder, size, batch_sizes, variant):
    from ai_edge_litert.interpreter import Interpreter

    from zfkeras import quiet  # no TensorFlow import

    path = os.path.join(folder, f"model_{variant}.tflite")
    works = {}
    for batch in batch_sizes:
        # One interpreter per batch size: resizing the input reallocates.
        runner = Interpreter(model_path=path, num_threads=2).get_signature_runner()
        detail = runner.get_input_details()["inputs"]
        inputs = _inputs(batch, size)
        scale, zero = detail["quantization"]
        if np.issubdtype(detail["dtype"], np.integer):
            inputs = np.clip(np.round(inputs / scale + zero), -128, 127).astype(detail["dtype"])
        with quiet.stderr_silenced():  # the first call prints XNNPACK's "Created delegate"
            runner(inputs=inputs)

        def run(r=runner, x=inputs, b=batch):
            r(inputs=x)
            return b

        works[f"litert {variant} b{batch}"] = run
    return works


def main(argv):
    del argv
    size, width, fc_units = _INPUT_SIZE.value, _WIDTH.value, _FC_UNITS.value
    repeats, min_block, inline = _REPEATS.value, _MIN_BLOCK.value, False
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
    matmul_size, samples = common.MATMUL_SIZE, _INT8_SAMPLES.value
    if _SMOKE.value:
        size, width, fc_units, repeats, min_block, inline = 48, 0.125, 16, 1, 0.0, True
        batch_sizes, matmul_size, samples = [1, 2], 256, 2
    from zfkeras import quiet

    quiet.import_tensorflow()
    from zfkeras import models

    model = models.ZFNet(_NUM_CLASSES, (size, size, 3), width=width, fc_units=fc_units)
    forward_flops = sum(f for _, f in flops.forward_flops(model))
    print(
        f"zfnet {size}x{size}x3 width {width}, {_NUM_CLASSES} classes "
        f"({model.count_params():,} params), float32 inputs; forward "
        f"{forward_flops / 1e9:.3f} GFLOP/image (computed with Winograd, from batch 4: "
        f"{flops.computed_flops(model)[0] / 1e9:.3f}; LiteRT computes the former)"
    )
    print(common.machine_info())
    folder = tempfile.mkdtemp(prefix="zfkeras-inference-bench-")
    try:
        common.log_to_stderr("exporting the SavedModel and the LiteRT models")
        common.call(
            export_all,
            dict(folder=folder, size=size, width=width, fc_units=fc_units, int8_samples=samples),
            inline,
        )
        kwargs = dict(folder=folder, size=size, batch_sizes=batch_sizes)
        workers = [
            common.Worker("matmul", common.matmul_worker, {"size": matmul_size}),
            common.Worker("keras", keras_worker, kwargs),
            common.Worker("savedmodel", savedmodel_worker, kwargs),
            common.Worker("savedmodel xla", savedmodel_worker, dict(kwargs, xla=True)),
        ]
        for variant in ("float32", "int8"):
            workers.append(
                common.Worker(
                    f"litert {variant}",
                    litert_worker,
                    dict(kwargs, variant=variant),
                    imports=("ai_edge_litert.interpreter",),
                )
            )
        workers.append(common.Worker("one process", one_process_worker, kwargs))
        session = common.run_session(workers, repeats, min_block, inline, common.log_to_stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ceiling = common.ceiling_gflops(session, matmul_size)
    rows = [("matmul ceiling", "", f"{ceiling:.1f}", "1.00", "", "")]
    separate = ("keras", "savedmodel", "savedmodel xla", "litert float32", "litert int8")
    together = tuple(_ONE_PROCESS + name for name in separate[:3])
    for batch in batch_sizes:
        for prefixes in (separate, together):
            keras_name = f"{prefixes[0]} b{batch}"  # each group's ratios are to its own Keras
            for prefix in prefixes:
                result = session.results[f"{prefix} b{batch}"]
                versus = ""
                if result.name != keras_name:
                    versus = common.median_range(session.ratios(keras_name, result.name))
                rows.append(
                    (
                        result.name,
                        f"{result.rate:.1f}",
                        f"{forward_flops * result.rate / 1e9:.1f}",
                        common.median_range(
                            session.of_ceiling(result.name, forward_flops, matmul_size)
                        ),
                        versus,
                        f"{result.spread:.0%}",
                    )
                )
    print(
        common.ranges_caption(
            repeats, ("'of ceiling'", "'x keras'"), "int8 GFLOP/s counts the same FLOPs"
        )
    )
    print(
        common.table(
            ("measurement", "images/s", "GFLOP/s", "of ceiling", "x keras", "spread"), rows
        )
    )
    print(common.memory_table(session))


if __name__ == "__main__":
    app.run(main)
