"""Exact per-layer FLOPs of a Keras ZFNet / AlexNet, forward, training step and projection.

    python bench/flops.py                      # ZFNet at 224x224x3, per layer
    python bench/flops.py --architecture=alexnet2 --input_size=227

Convention: one multiply-add is 2 FLOPs, counted in Conv2D and Dense layers
only (bias adds, ReLU, pooling and contrast normalisation are elementwise
and below 1 % of the total; they are not counted). A Conv2D with output
h x w x F, kernel k_h x k_w and C / groups input channels per filter does
2 * h * w * F * k_h * k_w * C / groups; a Dense layer 2 * inputs * units.

A training step is the forward pass, the weight gradients (as many FLOPs as
the forward pass of each layer) and the input gradients of every layer but
the first (nothing needs the gradient of the image): 3 * forward - first
layer. A deconvnet projection of one unit is the forward pass up to its
layer plus the transposed convolutions of its receptive-field windows, as
`zfkeras.deconv.Deconvnet.project` computes them.

Every rate in the benchmarks counts these FLOPs, a direct convolution's.
zfkeras runs conv3-conv5 by Winograd F(2x2, 3x3) (`WinogradConv2D`), whose
matrix products do fewer: 2 * 16 * ceil(h/2) * ceil(w/2) * C * F per layer
instead of 2 * 9 * h * w * C * F (0.52x on 13x13 maps), plus elementwise
tile transforms, for batches of 4 or more. `computed_flops` counts what is
computed that way, and the scripts print it next to the counted FLOPs.
"""

from absl import app, flags


def _weighted(model):
    import keras

    from zfkeras import layers

    return [
        layer for layer in model.layers if type(layer) in (*layers.CONV_TYPES, keras.layers.Dense)
    ]


def layer_flops(layer):
    """Forward FLOPs of one Conv2D or Dense layer for one example."""
    import keras

    if isinstance(layer, keras.layers.Conv2D):
        height, width, filters = layer.output.shape[1:]
        k_h, k_w = layer.kernel_size
        per_filter = k_h * k_w * layer.input.shape[-1] // layer.groups
        return 2 * height * width * filters * per_filter
    if isinstance(layer, keras.layers.Dense):
        return 2 * layer.input.shape[-1] * layer.units
    raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}) has no counted FLOPs")


def computed_layer_flops(layer):
    """`layer_flops`, but a Winograd layer's batched-product FLOPs instead."""
    from zfkeras import layers

    if type(layer) is layers.WinogradConv2D and layer.uses_winograd(layer.input):
        height, width, filters = layer.output.shape[1:]
        tiles = -(-height // 2) * -(-width // 2)
        return 2 * 16 * tiles * layer.input.shape[-1] * filters
    return layer_flops(layer)


def computed_flops(model):
    """(forward, training step) FLOPs per example as zfkeras computes them."""
    rows = [computed_layer_flops(layer) for layer in _weighted(model)]
    return sum(rows), 3 * sum(rows) - rows[0]


def forward_flops(model, up_to=None):
    """[(layer name, forward FLOPs per example)] for Conv2D and Dense layers.

    Args:
        model: a built functional Keras model.
        up_to: stop after this layer (default: the whole model).
    """
    rows = []
    for layer in _weighted(model):
        rows.append((layer.name, layer_flops(layer)))
        if layer.name == up_to:
            break
    return rows


def training_flops(model):
    """FLOPs of one training step per example: forward + weight and input gradients."""
    rows = forward_flops(model)
    total = sum(f for _, f in rows)
    return 3 * total - rows[0][1]


def projection_flops(model, layer_name):
    """FLOPs of projecting one unit of `layer_name` (forward to it + windowed transposes).

    Mirrors `zfkeras.deconv`'s windows: a transposed convolution of an h x w
    window is (h - 1) * s + k wide below; once that exceeds the map, the step
    (and every step below) runs on the whole map.
    """
    import keras

    forward = sum(f for _, f in forward_flops(model, up_to=layer_name))
    chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names = [layer.name for layer in chain]
    window, whole = (1, 1), False
    backward = 0
    for layer in reversed(chain[: names.index(layer_name) + 1]):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.MaxPooling2D)):
            if isinstance(layer, keras.layers.Conv2D):
                kernel, strides = layer.kernel_size, layer.strides
            else:
                kernel, strides = layer.pool_size, layer.strides
            below = [(window[a] - 1) * strides[a] + kernel[a] for a in range(2)]
            size_in = layer.input.shape[1:3]
            if whole or below[0] > size_in[0] or below[1] > size_in[1]:
                whole = True
                window = tuple(layer.output.shape[1:3])
            if isinstance(layer, keras.layers.Conv2D):
                per_filter = kernel[0] * kernel[1] * layer.input.shape[-1] // layer.groups
                backward += 2 * window[0] * window[1] * layer.filters * per_filter
            window = tuple(size_in) if whole else tuple(below)
    return forward + backward


def main(argv):
    del argv
    import common

    from zfkeras import quiet

    quiet.import_tensorflow()
    from zfkeras import models

    options = flags.FLAGS
    size, architecture = options.input_size, options.architecture
    model = models.build(architecture, num_classes=1000, input_shape=(size, size, options.channels))
    rows = forward_flops(model)
    total = sum(f for _, f in rows)
    table_rows = [(name, f"{f / 1e6:,.1f}", f"{100 * f / total:.1f} %") for name, f in rows]
    table_rows.append(("**forward**", f"{total / 1e6:,.1f}", "100 %"))
    table_rows.append(("**training step**", f"{training_flops(model) / 1e6:,.1f}", ""))
    computed_forward, computed_step = computed_flops(model)
    table_rows.append(("forward as computed (Winograd)", f"{computed_forward / 1e6:,.1f}", ""))
    table_rows.append(("training step as computed", f"{computed_step / 1e6:,.1f}", ""))
    for layer in ("conv1", "conv5"):
        table_rows.append(
            (f"projection of one {layer} unit", f"{projection_flops(model, layer) / 1e6:,.1f}", "")
        )
    print(f"{architecture} {size}x{size}x{options.channels}, per image")
    print(common.table(("layer", "MFLOP", "share of forward"), table_rows))


if __name__ == "__main__":
    # Defined here: the other benchmarks import this module and have their own flags.
    flags.DEFINE_enum("architecture", "zfnet", ["zfnet", "alexnet", "alexnet2"], "Model.")
    flags.DEFINE_integer("input_size", 224, "Input height and width.", lower_bound=32)
    flags.DEFINE_integer("channels", 3, "Input channels.", lower_bound=1, upper_bound=3)
    app.run(main)
