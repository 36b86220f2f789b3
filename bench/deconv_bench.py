"""Benchmark of the batched deconvnet: projections per second and cost vs a forward pass.

    python bench/deconv_bench.py                 # ZFNet at 224x224, conv5, batch 1 and 32
    python bench/deconv_bench.py --smoke         # a tiny model, seconds (used by the tests)

For each batch size B it times, on B random images, one forward pass of the
model (a compiled `model(x)`) and `Deconvnet.project` of one strongest-unit
projection per image (its own forward pass included), and prints
projections per second and the cost of one projection in forward passes. It
also times B maps of a single image, which share one forward pass.
"""

import os
import time

import numpy as np
from absl import app, flags

from zfkeras import quiet

_ARCHITECTURE = flags.DEFINE_enum(
    "architecture", "zfnet", ["zfnet", "alexnet", "alexnet2"], "Model to time."
)
_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Input height and width.", lower_bound=32)
_WIDTH = flags.DEFINE_float("width", 1.0, "Conv filter multiplier.", lower_bound=0.01)
_FC_UNITS = flags.DEFINE_integer("fc_units", 4096, "Width of fc6 and fc7.", lower_bound=1)
_LAYER = flags.DEFINE_string("layer", "conv5", "Layer whose maps are projected.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (best is kept).", lower_bound=1)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model and one repeat, for tests.")


def _best_times(functions, repeats):
    """Best wall time of each function; interleaved so machine load hits all alike."""
    for function in functions:
        function()  # Warm-up: tracing and allocation.
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def main(argv):
    del argv
    tf = quiet.import_tensorflow()
    from zfkeras import deconv, models

    size, width, fc_units, repeats = (
        _INPUT_SIZE.value,
        _WIDTH.value,
        _FC_UNITS.value,
        _REPEATS.value,
    )
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
    if _SMOKE.value:
        size, width, fc_units, repeats, batch_sizes = 64, 0.25, 64, 1, [1, 4]
    model = models.build(
        _ARCHITECTURE.value,
        num_classes=1000,
        input_shape=(size, size, 3),
        width=width,
        fc_units=fc_units,
        init="he",
        seed=0,
    )
    dn = deconv.Deconvnet(model)
    layer = _LAYER.value
    channels = dn.num_channels(layer)
    forward = tf.function(lambda x: model(x, training=False))
    print(
        f"{_ARCHITECTURE.value} {size}x{size} width {width} ({model.count_params():,} params), "
        f"projecting {layer} ({channels} maps), {os.cpu_count()} CPUs"
    )
    rng = np.random.default_rng(0)
    for batch in batch_sizes:
        images = rng.normal(0.0, 50.0, (batch, size, size, 3)).astype(np.float32)
        tensor = tf.constant(images)
        rows = np.arange(batch)
        maps = rows % channels
        forward_s, project_s, shared_s = _best_times(
            [
                lambda t=tensor: forward(t).numpy(),
                lambda x=images, r=rows, c=maps: dn.project(x, r, layer, c),
                lambda x=images[:1], c=maps: dn.project(x, 0, layer, c),
            ],
            repeats,
        )
        print(
            f"batch {batch:3d}: forward {1e3 * forward_s / batch:8.2f} ms/image | "
            f"{batch / project_s:8.1f} projections/s (one per image), "
            f"{project_s / forward_s:5.2f}x a forward pass | "
            f"{batch / shared_s:8.1f} projections/s ({batch} maps of one image)"
        )


if __name__ == "__main__":
    app.run(main)
