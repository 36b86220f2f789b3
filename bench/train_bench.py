"""Training throughput: the real input pipeline against the bare step, and the FLOP rate.

    python bench/train_bench.py --data_dir=/tmp/tfds    # ZFNet 224x224, batch 32 and 128 (~7 min)
    python bench/train_bench.py --smoke                  # a tiny model, seconds (used by the tests)

One interleaved session per batch size B, each with three worker processes:

- `matmul`: the machine ceiling (a 4096^3 float32 matmul through TensorFlow).
- `bare bB`: `model.train_on_batch` on one in-memory batch of random
  images (the compiled train step alone).
- `keras sgd bB`: the same with Keras' own SGD instead of zfkeras'
  fused-momentum SGD (`zfkeras.optimizers.SGD`), to show what fusing saves.
- `pipeline bB`: `model.fit` on tools/train.py's own training stream
  (`zfkeras.train.train_stream`: `--dataset`, by default Fashion-MNIST from
  its TFDS records (28x28 grey, converted to 3 channels), the
  paper's preprocessing at 256/224 with random crops and flips, shuffle
  buffer 10,000). Each timed block is one `fit` epoch of `--pipeline_steps`
  batches; its first batch is not timed (batches prefetched while the
  worker waited its turn would be free), and the worker waits
  `--settle_s` after each block so its prefetching does not overlap the
  next measurement. Checkpoint and TensorBoard callbacks are not run.

Both use the model and compile settings of tools/train.py (ZFNet, 10
classes, SGD momentum 0.9, sparse cross-entropy, accuracy and top-5
metrics, float32). A step is counted as 3x the forward FLOPs minus the first
layer's input gradient (bench/flops.py).
"""

import os
import threading
import time

import common
import flops
from absl import app, flags

_DATASET = flags.DEFINE_string(
    "dataset", "fashion_mnist", "Training data: fashion_mnist, folder:PATH or a TFDS name."
)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS folder (default ~/tensorflow_datasets).")
_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Crop (model input) size.", lower_bound=32)
_WIDTH = flags.DEFINE_float("width", 1.0, "Conv filter multiplier.", lower_bound=0.01)
_FC_UNITS = flags.DEFINE_integer("fc_units", 4096, "Width of fc6 and fc7.", lower_bound=1)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["32", "128"], "Batch sizes (one session each).")
_PIPELINE_STEPS = flags.DEFINE_list(
    "pipeline_steps", ["6", "3"], "Batches per timed pipeline block, per batch size."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repetitions.", lower_bound=1)
_MIN_BLOCK = flags.DEFINE_float("min_block_s", 4.0, "Shortest timed block, seconds.", 0.0)
_SETTLE = flags.DEFINE_float("settle_s", 2.0, "Pause after each pipeline block.", 0.0)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, one repetition, inline (for tests).")


def bare_worker(batch, size, width, fc_units, keras_sgd=False):
    config = common.training_config(batch, size, width, fc_units)
    model = common.compiled_training_model(config, keras_sgd=keras_sgd)
    name = f"{'keras sgd' if keras_sgd else 'bare'} b{batch}"
    return {name: common.train_step(model, batch, size)}


def _training_stream(config):
    """tools/train.py's training batches (and batches per epoch)."""
    from zfkeras import checkpoint, data, train

    preprocessing = data.Preprocessing(config.resize_size, config.crop_size, 3, 1.0)
    raw, _ = data.load(config.dataset, "train", data_dir=config.data_dir or None)
    mean = data.compute_mean(raw.take(1000), preprocessing)
    steps = train.steps_per_epoch(config)
    return train.train_stream(config, preprocessing, mean, steps, checkpoint.Position())


class _Gate:
    """Runs `fit` in a thread, one epoch (one timed block) per `block()` call."""

    def __init__(self, model, dataset, steps, batch):
        import keras

        self.steps, self.batch = steps, batch
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._stop, self._error, self._marks = False, None, []
        gate = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                gate._go.acquire()
                if gate._stop:
                    raise _Stopped()
                gate._marks = []

            def on_train_batch_end(self, index, logs=None):
                gate._marks.append(time.perf_counter())

            def on_epoch_end(self, epoch, logs=None):
                gate._done.release()

        def fit():
            try:
                model.fit(
                    dataset,
                    epochs=10**6,
                    steps_per_epoch=steps,
                    callbacks=[Callback()],
                    verbose=0,
                )
            except _Stopped:
                pass
            except BaseException as e:  # Reported by the next block().
                gate._error = e
                gate._done.release()

        self._thread = threading.Thread(target=fit, daemon=True)
        self._thread.start()

    def block(self):
        """One epoch; (seconds, images) from the end of its first batch to its end."""
        self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise self._error
        marks = self._marks
        if os.environ.get("BENCH_DEBUG"):
            steps = [f"{b - a:.2f}" for a, b in zip(marks, marks[1:])]
            common.log_to_stderr(f"pipeline step times: {' '.join(steps)}")
        return marks[-1] - marks[0], (len(marks) - 1) * self.batch

    def close(self):
        self._stop = True
        self._go.release()
        self._thread.join(60)


class _Stopped(Exception):
    pass


def pipeline_worker(batch, size, width, fc_units, dataset, data_dir, steps, settle_s):
    config = common.training_config(batch, size, width, fc_units, dataset, data_dir)
    model = common.compiled_training_model(config)
    gate = _Gate(model, _training_stream(config), steps, batch)
    return {f"pipeline b{batch}": common.Work(gate.block, settle_s=settle_s, close=gate.close)}


def main(argv):
    del argv
    size, width, fc_units = _INPUT_SIZE.value, _WIDTH.value, _FC_UNITS.value
    repeats, min_block, inline = _REPEATS.value, _MIN_BLOCK.value, False
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
    pipeline_steps = [int(s) for s in _PIPELINE_STEPS.value]
    if len(pipeline_steps) != len(batch_sizes):
        raise app.UsageError("--pipeline_steps needs one value per batch size")
    matmul_size, settle = common.MATMUL_SIZE, _SETTLE.value
    if _SMOKE.value:
        size, width, fc_units, repeats, min_block, inline = 48, 0.125, 16, 1, 0.0, True
        batch_sizes, pipeline_steps, matmul_size, settle = [4], [3], 256, 0.0
    from zfkeras import quiet

    quiet.import_tensorflow()
    model = common.compiled_training_model(
        common.training_config(batch_sizes[0], size, width, fc_units)
    )
    forward_flops = sum(f for _, f in flops.forward_flops(model))
    step_flops = flops.training_flops(model)
    print(
        f"zfnet {size}x{size}x3 width {width}, {common.TRAINING_CLASSES} classes "
        f"({model.count_params():,} params), float32; forward {forward_flops / 1e9:.3f} "
        f"GFLOP/image, training step {step_flops / 1e9:.3f} GFLOP/image (computed with "
        f"Winograd: {flops.computed_flops(model)[1] / 1e9:.3f})"
    )
    print(common.machine_info())
    rows, memory = [], []
    for batch, steps in zip(batch_sizes, pipeline_steps):
        kwargs = dict(batch=batch, size=size, width=width, fc_units=fc_units)
        workers = [
            common.Worker("matmul", common.matmul_worker, {"size": matmul_size}),
            common.Worker(f"bare b{batch}", bare_worker, kwargs),
            common.Worker(f"keras sgd b{batch}", bare_worker, dict(kwargs, keras_sgd=True)),
            common.Worker(
                f"pipeline b{batch}",
                pipeline_worker,
                dict(
                    kwargs,
                    dataset=_DATASET.value,
                    data_dir=_DATA_DIR.value,
                    steps=steps,
                    settle_s=settle,
                ),
            ),
        ]
        session = common.run_session(workers, repeats, min_block, inline, common.log_to_stderr)
        ceiling = common.ceiling_gflops(session, matmul_size)
        bare, pipeline = session.results[f"bare b{batch}"], session.results[f"pipeline b{batch}"]
        keras_sgd = session.results[f"keras sgd b{batch}"]
        rows.append((f"matmul ceiling (b{batch} session)", "", f"{ceiling:.1f}", "1.00", "", ""))
        for result in (bare, keras_sgd, pipeline):
            versus = session.ratios(bare.name, result.name) if result is not bare else None
            rows.append(
                (
                    result.name,
                    f"{result.rate:.1f}",
                    f"{step_flops * result.rate / 1e9:.1f}",
                    common.median_range(session.of_ceiling(result.name, step_flops, matmul_size)),
                    "" if versus is None else common.median_range(versus),
                    f"{result.spread:.0%}",
                )
            )
        memory.append(common.memory_table(session))
    print(common.ranges_caption(repeats, ("'of ceiling'", "'x bare step'")))
    print(
        common.table(
            ("measurement", "images/s", "GFLOP/s", "of ceiling", "x bare step", "spread"), rows
        )
    )
    for text in memory:
        print(text)


if __name__ == "__main__":
    app.run(main)
