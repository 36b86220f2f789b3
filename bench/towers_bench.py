"""The two-tower AlexNet's grouped convolutions: TensorFlow's kernel against one per group.

    python bench/towers_bench.py                 # AlexNet 224x224, batch 32 (~4 min)
    python bench/towers_bench.py --input_size=56 --width=0.5 --fc_units=1024 --batch_size=128
    python bench/towers_bench.py --smoke         # a tiny model, seconds (used by the tests)

Three worker processes, each timing `train_on_batch` on one in-memory batch
(the compiled step of tools/train.py, 10 classes), interleaved:

- `one tower`: `AlexNet(towers=1)`, no grouped layer;
- `two towers`: `AlexNet(towers=2)` as zfkeras builds it: conv2, conv4 and
  conv5 are `zfkeras.layers.GroupedConv2D`, one convolution per group;
- `two towers, tf grouped`: the same model with those layers as plain
  `keras.layers.Conv2D(groups=2)`, which runs TensorFlow's grouped kernel.

Both two-tower models have the same weights and compute the same function
(tests/test_layers.py checks the values and gradients); the table shows
what each costs per step against the one-tower net.
"""

import common
from absl import app, flags

_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Crop (model input) size.", lower_bound=32)
_WIDTH = flags.DEFINE_float("width", 1.0, "Conv filter multiplier.", lower_bound=0.01)
_FC_UNITS = flags.DEFINE_integer("fc_units", 4096, "Width of fc6 and fc7.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per step.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repetitions.", lower_bound=1)
_MIN_BLOCK = flags.DEFINE_float("min_block_s", 4.0, "Shortest timed block, seconds.", 0.0)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, one repetition, inline (for tests).")

NAMES = {
    ("alexnet", False): "one tower",
    ("alexnet2", False): "two towers",
    ("alexnet2", True): "two towers, tf grouped",
}


def keras_grouped(model):
    """`model` with each GroupedConv2D as a plain Keras Conv2D (same config and weights)."""
    import keras

    from zfkeras import layers

    def clone(layer):
        kind = keras.layers.Conv2D if type(layer) is layers.GroupedConv2D else type(layer)
        return kind.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def step_worker(architecture, tf_grouped, batch, size, width, fc_units):
    import dataclasses

    from zfkeras import layers, train

    config = common.training_config(batch, size, width, fc_units)
    config = dataclasses.replace(config, architecture=architecture, filter_rms=0.0)
    model = train.build_model(config, common.TRAINING_CLASSES, 3)
    model = common.compile_like(keras_grouped(model) if tf_grouped else model, config)
    grouped = sum(type(layer) is layers.GroupedConv2D for layer in model.layers)
    if architecture == "alexnet2" and grouped != (0 if tf_grouped else 3):
        raise RuntimeError(f"{architecture}: {grouped} GroupedConv2D layers")
    return {NAMES[(architecture, tf_grouped)]: common.train_step(model, batch, size)}


def main(argv):
    del argv
    size, width, fc_units, batch = _INPUT_SIZE.value, _WIDTH.value, _FC_UNITS.value, _BATCH.value
    repeats, min_block, inline = _REPEATS.value, _MIN_BLOCK.value, False
    if _SMOKE.value:
        size, width, fc_units, batch, repeats, min_block, inline = 67, 0.125, 16, 2, 1, 0.0, True
    from zfkeras import quiet

    quiet.import_tensorflow()
    print(
        f"AlexNet {size}x{size}x3 width {width}, fc {fc_units}, {common.TRAINING_CLASSES} "
        f"classes, batch {batch}, float32: seconds per training step"
    )
    print(common.machine_info())
    kwargs = dict(batch=batch, size=size, width=width, fc_units=fc_units)
    workers = [
        common.Worker(name, step_worker, dict(kwargs, architecture=arch, tf_grouped=tf_grouped))
        for (arch, tf_grouped), name in NAMES.items()
    ]
    session = common.run_session(workers, repeats, min_block, inline, common.log_to_stderr)
    rows = []
    for name in NAMES.values():
        result = session.results[name]
        rows.append(
            (
                name,
                f"{result.median_s * batch:.3f}",
                f"{result.rate:.1f}",
                common.median_range(session.ratios(name, "one tower")),
                f"{result.spread:.0%}",
            )
        )
    print(common.ranges_caption(repeats, ("'x one tower'",)))
    print(
        common.table(
            ("model", "s per step", "images/s", "x one tower (time)", "spread"),
            rows,
        )
    )
    print(common.memory_table(session))


if __name__ == "__main__":
    app.run(main)
