"""Where a ZFNet training step spends its time: each layer's forward and backward pass.

    python bench/layer_profile.py --batch_size=32        # ZFNet 224x224 (~2 min)
    python bench/layer_profile.py --smoke                # a tiny model (used by the tests)

Every layer runs alone (a compiled function per layer) on random inputs of
its own input shape: `forward` is the layer in training mode, `backward` is
the gradients of its input (not for the first layer: nothing needs the
image's gradient) and of its weights for a random upstream gradient, minus
the forward time. `sgd update` applies SGD with momentum (the training
optimizer) to all weights, `filter constraint` the filter renormalisation.
`train step` is `train_on_batch` of the whole compiled model; the sum of the
parts shows how much is overhead between them. Rows marked "(before)" time
what this project replaced (TensorFlow's LRN op and its gradient; Keras'
SGD) next to the current code, outside the sum; the "both" ones are forward
+ backward. All interleaved, medians of `--repeats`.
"""

import time

import common
import flops
import numpy as np
from absl import app, flags

_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Input height and width.", lower_bound=32)
_WIDTH = flags.DEFINE_float("width", 1.0, "Conv filter multiplier.", lower_bound=0.01)
_FC_UNITS = flags.DEFINE_integer("fc_units", 4096, "Width of fc6 and fc7.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved repetitions.", lower_bound=1)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, one repetition (for tests).")


def _median_times(functions, repeats):
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _first(function):
    import tensorflow as tf

    def first(*args):
        return tf.nest.map_structure(lambda t: tf.reshape(t, [-1])[0], function(*args))

    return first


def _numpy(values):
    import tensorflow as tf

    return tf.nest.map_structure(lambda t: t.numpy(), values)


def main(argv):
    del argv
    size, width, fc_units, batch = _INPUT_SIZE.value, _WIDTH.value, _FC_UNITS.value, _BATCH.value
    repeats = _REPEATS.value
    if _SMOKE.value:
        size, width, fc_units, batch, repeats = 48, 0.125, 16, 2, 1
    from zfkeras import quiet

    tf = quiet.import_tensorflow()
    import keras

    from zfkeras import layers as zlayers

    model = common.compiled_training_model(common.training_config(batch, size, width, fc_units))
    rng = np.random.default_rng(0)
    functions, flop_counts = {}, {}
    first = True
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        x = tf.constant(rng.normal(size=(batch, *layer.input.shape[1:])).astype(np.float32))
        dy = tf.constant(rng.normal(size=(batch, *layer.output.shape[1:])).astype(np.float32))

        def forward(layer=layer, x=x):
            return layer(x, training=True)

        def both(layer=layer, x=x, dy=dy, wrt_input=not first):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            sources = ([x] if wrt_input else []) + list(layer.trainable_weights)
            # y too: a linear layer's gradients do not need its output, and
            # without it TensorFlow would prune the forward pass from "both".
            return (tape.gradient(y, sources, output_gradients=dy), y) if sources else y

        # Each function returns one element of each output: copying whole
        # outputs to NumPy would cost more than many layers.
        forward_fn, both_fn = tf.function(_first(forward)), tf.function(_first(both))
        functions[f"{layer.name} forward"] = lambda f=forward_fn: _numpy(f())
        functions[f"{layer.name} both"] = lambda f=both_fn: _numpy(f())
        if type(layer) in (*zlayers.CONV_TYPES, keras.layers.Dense):
            flop_counts[layer.name] = flops.layer_flops(layer) * batch
            first = False

    # What this project replaced, for before/after rows outside the sum:
    # TensorFlow's LRN op (and its gradient, LRNGrad) and Keras' SGD.
    before = {}
    for layer in model.layers:
        if isinstance(layer, zlayers.ContrastNorm):
            x = tf.constant(rng.normal(size=(batch, *layer.input.shape[1:])).astype(np.float32))
            dy = tf.constant(rng.normal(size=(batch, *layer.output.shape[1:])).astype(np.float32))
            settings = dict(
                depth_radius=layer.depth_radius, bias=layer.bias, alpha=layer.alpha, beta=layer.beta
            )

            def lrn_forward(x=x, settings=settings):
                return tf.nn.local_response_normalization(x, **settings)

            def lrn_both(x=x, dy=dy, settings=settings):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = tf.nn.local_response_normalization(x, **settings)
                return tape.gradient(y, x, output_gradients=dy), y

            for kind, function in (("forward", lrn_forward), ("both", lrn_both)):
                name = f"{layer.name} {kind} with the LRN op (before)"
                before[name] = (f"{layer.name} {kind}", kind)
                functions[name] = lambda f=tf.function(_first(function)): _numpy(f())

    weights = model.trainable_weights
    gradients = [tf.random.normal(w.shape, stddev=1e-6) for w in weights]
    keras_sgd = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    keras_sgd.build(weights)

    def updater(optimizer):
        @tf.function
        def update():
            optimizer.apply(gradients, weights)
            return weights[0][0, 0, 0, 0]

        return update

    update = updater(model.optimizer)
    functions["sgd update with Keras' SGD (before)"] = lambda f=updater(keras_sgd): f().numpy()
    before["sgd update with Keras' SGD (before)"] = ("sgd update", "both")

    constraints = [
        (w, layer.kernel_constraint)
        for layer in model.layers
        if getattr(layer, "kernel_constraint", None) is not None
        for w in [layer.kernel]
    ]

    @tf.function
    def constrain():
        for w, constraint in constraints:
            w.assign(constraint(w))
        return constraints[0][0][0, 0, 0, 0] if constraints else 0.0

    images = tf.random.stateless_normal([batch, size, size, 3], seed=[0, 0]) * 50.0
    labels = tf.zeros([batch], tf.int64)
    functions["sgd update"] = lambda: update().numpy()
    functions["filter constraint"] = lambda: constrain().numpy()
    functions["train step"] = lambda: model.train_on_batch(images, labels)
    times = _median_times(functions, repeats)

    rows, total = [], 0.0
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        forward_s = times[f"{layer.name} forward"]
        backward_s = max(times[f"{layer.name} both"] - forward_s, 0.0)
        total += forward_s + backward_s
        gflops = ""
        if layer.name in flop_counts:
            step_flops = flop_counts[layer.name] * (2 if layer.name == "conv1" else 3)
            gflops = f"{step_flops / (forward_s + backward_s) / 1e9:.1f}"
        rows.append((layer.name, f"{1e3 * forward_s:.1f}", f"{1e3 * backward_s:.1f}", gflops))
    for name in ("sgd update", "filter constraint"):
        total += times[name]
        rows.append((name, "", f"{1e3 * times[name]:.1f}", ""))
    rows.append(("**sum of the parts**", "", f"{1e3 * total:.1f}", ""))
    for name, (now, kind) in before.items():
        cell = f"{1e3 * times[name]:.1f} (now {1e3 * times[now]:.1f})"
        rows.append((name, cell, "", "") if kind == "forward" else (name, "", cell, ""))
    step_flops = flops.training_flops(model) * batch
    step_s = times["train step"]
    rows.append(("**train step**", "", f"{1e3 * step_s:.1f}", f"{step_flops / step_s / 1e9:.1f}"))
    print(f"zfnet {size}x{size}x3 width {width}, batch {batch}; median of {repeats}")
    print(common.machine_info())
    print(common.table(("layer", "forward ms", "backward ms", "GFLOP/s"), rows))


if __name__ == "__main__":
    app.run(main)
