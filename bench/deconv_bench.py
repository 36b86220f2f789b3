"""Deconvnet projections per second, and their cost in forward passes.

    python bench/deconv_bench.py                 # ZFNet 224x224, conv5, batch 1 and 32 (~2 min)
    python bench/deconv_bench.py --smoke         # a tiny model, seconds (used by the tests)

For each batch size B, on B random images (float32 model inputs), one
worker process times, interleaved with the matmul ceiling:

- `forward bB`: the Keras model's forward pass (a compiled `model(x)`).
- `one per image bB`: `Deconvnet.project` of the strongest unit of one map
  per image (B images, B projections, its own forward pass included).
- `maps of one image bB`: B maps of a single image (one forward pass, B
  projections).
- `switches, whole maps bB` (B > 1): the Keras-model form of the same
  projections, `probe_model` (max_pool_with_argmax switches) +
  `deconv_model` (unpooling at the switches, whole maps at every layer): the
  implementation `project` used before it moved to receptive-field windows.

Costs are times per projection over times per forward pass of one image at
the same batch size. FLOPs are counted exactly (bench/flops.py): a
projection is the forward pass to the layer plus the transposed
convolutions of its receptive-field windows.
"""

import common
import flops
import numpy as np
from absl import app, flags

_ARCHITECTURE = flags.DEFINE_enum(
    "architecture", "zfnet", ["zfnet", "alexnet", "alexnet2"], "Model to time."
)
_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Input height and width.", lower_bound=32)
_WIDTH = flags.DEFINE_float("width", 1.0, "Conv filter multiplier.", lower_bound=0.01)
_FC_UNITS = flags.DEFINE_integer("fc_units", 4096, "Width of fc6 and fc7.", lower_bound=1)
_LAYER = flags.DEFINE_string("layer", "conv5", "Layer whose maps are projected.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repetitions.", lower_bound=1)
_MIN_BLOCK = flags.DEFINE_float("min_block_s", 1.0, "Shortest timed block, seconds.", 0.0)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, one repetition, inline (for tests).")


def _build(architecture, size, width, fc_units):
    from zfkeras import models

    return models.build(
        architecture,
        num_classes=1000,
        input_shape=(size, size, 3),
        width=width,
        fc_units=fc_units,
        init="he",
        seed=0,
    )


def _switch_path(dn, layer):
    """Projections of the strongest unit per request through the Keras models."""
    import tensorflow as tf

    probe, deconv_model = dn.probe_model(layer), dn.deconv_model(layer)
    channels_total = dn.num_channels(layer)

    @tf.function(reduce_retracing=True)
    def project(images, channels):
        outputs = probe(images, training=False)
        maps = tf.gather(outputs["activations"][layer], channels, axis=3, batch_dims=1)
        flat = tf.reshape(maps, [tf.shape(maps)[0], -1])
        unit = tf.one_hot(tf.argmax(flat, axis=1), tf.shape(flat)[1], dtype=flat.dtype)
        seed = tf.reshape(flat * unit, tf.shape(maps))
        mask = tf.one_hot(channels, channels_total, dtype=seed.dtype)
        signal = seed[..., None] * mask[:, None, None, :]
        return deconv_model([signal, *outputs["switches"]], training=False)

    return project


def deconv_worker(architecture, size, width, fc_units, layer, batch_sizes):
    import tensorflow as tf

    from zfkeras import deconv

    model = _build(architecture, size, width, fc_units)
    dn = deconv.Deconvnet(model)
    channels = dn.num_channels(layer)
    forward = tf.function(lambda x: model(x, training=False))
    switch_path = _switch_path(dn, layer)
    rng = np.random.default_rng(0)
    works = {}
    for batch in batch_sizes:
        images = rng.normal(0.0, 50.0, (batch, size, size, 3)).astype(np.float32)
        tensor = tf.constant(images)
        rows = np.arange(batch)
        maps = rows % channels

        def run_forward(t=tensor, b=batch):
            forward(t).numpy()
            return b

        def one_per_image(x=images, r=rows, c=maps, b=batch):
            dn.project(x, r, layer, c, batch_size=b)
            return b

        def of_one_image(x=images[:1], c=maps, b=batch):
            dn.project(x, np.zeros(b, np.int64), layer, c, batch_size=b)
            return b

        def switches(t=tensor, c=tf.constant(maps, tf.int32), b=batch):
            switch_path(t, c).numpy()
            return b

        works[f"forward b{batch}"] = run_forward
        works[f"one per image b{batch}"] = one_per_image
        if batch > 1:
            works[f"maps of one image b{batch}"] = of_one_image
            works[f"switches, whole maps b{batch}"] = switches
    return works


def main(argv):
    del argv
    size, width, fc_units = _INPUT_SIZE.value, _WIDTH.value, _FC_UNITS.value
    repeats, min_block, inline = _REPEATS.value, _MIN_BLOCK.value, False
    batch_sizes = [int(b) for b in _BATCH_SIZES.value]
    matmul_size = common.MATMUL_SIZE
    if _SMOKE.value:
        size, width, fc_units, repeats, min_block, inline = 64, 0.125, 32, 1, 0.0, True
        batch_sizes, matmul_size = [1, 4], 256
    layer = _LAYER.value
    from zfkeras import quiet

    quiet.import_tensorflow()
    model = _build(_ARCHITECTURE.value, size, width, fc_units)
    forward_flops = sum(f for _, f in flops.forward_flops(model))
    projection_flops = flops.projection_flops(model, layer)
    to_layer = sum(f for _, f in flops.forward_flops(model, up_to=layer))
    print(
        f"{_ARCHITECTURE.value} {size}x{size}x3 width {width} ({model.count_params():,} params), "
        f"float32, projecting {layer}; forward {forward_flops / 1e9:.3f} GFLOP/image, one "
        f"projection {projection_flops / 1e9:.3f} GFLOP ({to_layer / 1e9:.3f} of it the "
        f"forward pass to {layer})"
    )
    print(common.machine_info())
    workers = [
        common.Worker("matmul", common.matmul_worker, {"size": matmul_size}),
        common.Worker(
            "deconv",
            deconv_worker,
            dict(
                architecture=_ARCHITECTURE.value,
                size=size,
                width=width,
                fc_units=fc_units,
                layer=layer,
                batch_sizes=batch_sizes,
            ),
        ),
    ]
    session = common.run_session(workers, repeats, min_block, inline, common.log_to_stderr)
    ceiling = common.ceiling_gflops(session, matmul_size)
    results = session.results
    rows = [("matmul ceiling", "", f"{ceiling:.1f}", "1.00", "", "")]
    for batch in batch_sizes:
        forward_name = f"forward b{batch}"
        flop_of = {
            forward_name: forward_flops,
            f"one per image b{batch}": projection_flops,
            f"maps of one image b{batch}": projection_flops - to_layer * (batch - 1) / batch,
            f"switches, whole maps b{batch}": None,
        }
        for name, per_item in flop_of.items():
            if name not in results:
                continue
            result = results[name]
            cost = ""
            if name != forward_name:
                cost = common.median_range(session.ratios(name, forward_name))
            gflops = "" if per_item is None else f"{per_item * result.rate / 1e9:.1f}"
            fraction = ""
            if per_item is not None:
                fraction = common.median_range(session.of_ceiling(name, per_item, matmul_size))
            unit = "images/s" if name == forward_name else "projections/s"
            rows.append(
                (name, f"{result.rate:.1f} {unit}", gflops, fraction, cost, f"{result.spread:.0%}")
            )
    print(
        common.ranges_caption(
            repeats,
            ("'of ceiling'", "cost"),
            "cost = time per projection / time per forward pass of one image at the same "
            "batch size",
        )
    )
    print(
        common.table(
            (
                "measurement",
                "throughput",
                "GFLOP/s",
                "of ceiling",
                "cost (forward passes)",
                "spread",
            ),
            rows,
        )
    )
    print(common.memory_table(session))
    for batch in batch_sizes:
        single = results[f"one per image b{batch}"]
        shared = results.get(f"maps of one image b{batch}", single)
        print(
            f"batch {batch:3d}: {single.rate:8.1f} projections/s (one per image), "
            f"{session.ratio(single.name, f'forward b{batch}'):5.2f}x a forward pass | "
            f"{shared.rate:8.1f} projections/s ({batch} maps of one image), "
            f"{session.ratio(shared.name, f'forward b{batch}'):5.2f}x a forward pass each"
        )


if __name__ == "__main__":
    app.run(main)
