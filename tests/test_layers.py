"""NumPy-reference tests of the custom layers in zfkeras.layers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from zfkeras import layers as zlayers

# ---------------------------------------------------------------------------
# NumPy references.


def contrast_norm_reference(a, depth_radius, bias, alpha, beta):
    """b_c = a_c / (bias + alpha * sum_{|c'-c| <= r} a_c'^2) ^ beta."""
    squares = a.astype(np.float64) ** 2
    channels = a.shape[-1]
    out = np.empty_like(a, dtype=np.float64)
    for c in range(channels):
        low, high = max(0, c - depth_radius), min(channels, c + depth_radius + 1)
        out[..., c] = a[..., c] / (bias + alpha * squares[..., low:high].sum(-1)) ** beta
    return out


def pool_reference(x, pool_size, strides, padding):
    """Max pooling with switches ((b*H + y)*W + x)*C + c, first maximum on ties."""
    batch, height, width, channels = x.shape
    (kh, kw), (sh, sw) = pool_size, strides
    if padding == "valid":
        out_h, out_w, top, left = (height - kh) // sh + 1, (width - kw) // sw + 1, 0, 0
    else:
        out_h, out_w = -(-height // sh), -(-width // sw)
        top = max((out_h - 1) * sh + kh - height, 0) // 2
        left = max((out_w - 1) * sw + kw - width, 0) // 2
    pooled = np.zeros((batch, out_h, out_w, channels), x.dtype)
    switches = np.zeros(pooled.shape, np.int64)
    for b, i, j, c in np.ndindex(pooled.shape):
        best, where = -np.inf, -1
        for dy in range(kh):
            for dx in range(kw):
                y, xx = i * sh - top + dy, j * sw - left + dx
                if 0 <= y < height and 0 <= xx < width and x[b, y, xx, c] > best:
                    best, where = x[b, y, xx, c], ((b * height + y) * width + xx) * channels + c
        pooled[b, i, j, c], switches[b, i, j, c] = best, where
    return pooled, switches


def unpool_reference(values, switches, output_size):
    """Adds each value at its switch (position within its own example)."""
    batch, _, _, channels = values.shape
    per_example = output_size[0] * output_size[1] * channels
    out = np.zeros(batch * per_example, np.float64)
    local = switches % per_example + np.arange(batch)[:, None, None, None] * per_example
    np.add.at(out, local.ravel(), values.ravel())
    return out.reshape(batch, *output_size, channels)


# ---------------------------------------------------------------------------
# ContrastNorm and FilterRMSConstraint.


# Channels in groups of 8 (the portable op set's band convolution) with windows
# that reach one or two neighbouring groups, or only their own; and channel
# counts that are not a multiple of 8.
@pytest.mark.parametrize("ops", zlayers.OP_SETS)
@pytest.mark.parametrize(
    "channels, depth_radius",
    [(7, 2), (3, 2), (3, 4), (5, 0), (24, 2), (32, 9), (16, 0), (16, 20)],
)
def test_contrast_norm_matches_reference(channels, depth_radius, ops):
    a = np.random.default_rng(0).normal(0, 10, (2, 4, 5, channels)).astype(np.float32)
    layer = zlayers.ContrastNorm(depth_radius=depth_radius, bias=2.0, alpha=1e-2, beta=0.75)
    layer.ops = ops
    expected = contrast_norm_reference(a, depth_radius, 2.0, 1e-2, 0.75)
    assert np.abs(expected - a).max() > 0.1  # the normalisation does something
    np.testing.assert_allclose(layer(a).numpy(), expected, rtol=1e-5, atol=1e-6)
    clone = zlayers.ContrastNorm.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.ops == zlayers.XLA  # an export setting, not saved


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("beta", [0.75, 0.5])
@pytest.mark.parametrize("ops", [zlayers.XLA, zlayers.PORTABLE])
def test_contrast_norm_gradient_equals_tensorflows_lrn_gradient(training, beta, ops):
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(0, 10, (2, 6, 5, 11)).astype(np.float32))
    upstream = tf.constant(rng.normal(0, 1, (2, 6, 5, 11)).astype(np.float32))
    layer = zlayers.ContrastNorm(depth_radius=2, bias=2.0, alpha=1e-2, beta=beta)
    layer.ops = ops
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = layer(x, training=training)  # the same computation in both modes
        theirs = tf.nn.local_response_normalization(
            x, depth_radius=2, bias=2.0, alpha=1e-2, beta=beta
        )
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)
    expected = tape.gradient(theirs, x, output_gradients=upstream).numpy()
    got = tape.gradient(ours, x, output_gradients=upstream).numpy()
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_contrast_norm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth_radius"):
        zlayers.ContrastNorm(depth_radius=-1)
    with pytest.raises(ValueError, match="bias"):
        zlayers.ContrastNorm(bias=0.0)


@pytest.mark.parametrize("shape", [(3, 3, 2, 5), (4, 6)])
def test_filter_rms_constraint_matches_reference(shape):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, shape).astype(np.float32)
    w[..., 0] *= 0.01  # a filter well inside the radius stays unchanged
    constrained = zlayers.FilterRMSConstraint(0.1)(tf.constant(w)).numpy()
    axes = tuple(range(len(shape) - 1))
    rms = np.sqrt((w.astype(np.float64) ** 2).mean(axis=axes))
    expected = w * np.minimum(1.0, 0.1 / rms)
    np.testing.assert_allclose(constrained, expected, rtol=1e-5)
    np.testing.assert_array_equal(constrained[..., 0], w[..., 0])
    np.testing.assert_allclose(np.sqrt((constrained**2).mean(axis=axes))[1:], 0.1, rtol=1e-5)
    assert zlayers.FilterRMSConstraint(**{"max_rms": 0.1}).get_config() == {"max_rms": 0.1}
    with pytest.raises(ValueError, match="max_rms"):
        zlayers.FilterRMSConstraint(0.0)


# ---------------------------------------------------------------------------
# Switches and unpooling.

POOLS = [
    # (input H, W, pool_size, strides, padding): overlapping, odd and even sizes.
    (7, 7, (3, 3), (2, 2), "valid"),
    (8, 8, (3, 3), (2, 2), "same"),
    (9, 6, (3, 3), (2, 2), "same"),
    (7, 5, (2, 2), (2, 2), "same"),
    (6, 7, (2, 2), (2, 2), "valid"),
    (11, 8, (3, 2), (2, 1), "same"),
]


def _maps(shape, seed, ties=False):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    if ties:
        # ReLU-like maps: many equal zeros, plus equal values side by side.
        x = np.round(np.maximum(x, 0.0), 1)
        x[:, :3, :3] = 0.0
    return x


@pytest.mark.parametrize("height, width, pool_size, strides, padding", POOLS)
@pytest.mark.parametrize("ties", [False, True])
def test_switches_match_reference(height, width, pool_size, strides, padding, ties):
    x = _maps((3, height, width, 4), seed=height * width, ties=ties)
    layer = zlayers.MaxPoolWithArgmax(pool_size, strides, padding)
    pooled, switches = layer(x)
    expected_pooled, expected_switches = pool_reference(x, pool_size, strides, padding)
    assert switches.dtype == tf.int64
    np.testing.assert_array_equal(pooled.numpy(), expected_pooled)
    np.testing.assert_array_equal(switches.numpy(), expected_switches)
    # Same values as Keras' own max pooling, and the symbolic shapes agree.
    keras_pooled = keras.layers.MaxPooling2D(pool_size, strides, padding)(x)
    np.testing.assert_array_equal(pooled.numpy(), keras_pooled.numpy())
    symbolic = layer(keras.Input((height, width, 4)))
    assert tuple(symbolic[0].shape[1:]) == expected_pooled.shape[1:]
    assert symbolic[1].dtype == "int64"


def test_max_pool_with_argmax_config_round_trips():
    layer = zlayers.MaxPoolWithArgmax((3, 2), (2, 1), "same", name="p")
    clone = zlayers.MaxPoolWithArgmax.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.pool_size == (3, 2) and clone.strides == (2, 1) and clone.padding == "same"
    with pytest.raises(ValueError, match="padding"):
        zlayers.MaxPoolWithArgmax(padding="full")


@pytest.mark.parametrize("height, width, pool_size, strides, padding", POOLS)
def test_unpool_matches_reference_and_max_pool_gradient(height, width, pool_size, strides, padding):
    x = _maps((3, height, width, 4), seed=7, ties=True)
    _, switches = zlayers.MaxPoolWithArgmax(pool_size, strides, padding)(x)
    values = np.random.default_rng(8).normal(size=switches.shape).astype(np.float32)
    unpooled = zlayers.MaxUnpool((height, width))([values, switches]).numpy()
    expected = unpool_reference(values, switches.numpy(), (height, width))
    np.testing.assert_allclose(unpooled, expected, rtol=1e-6, atol=1e-6)
    # The unpooling is the max-pool gradient (overlaps summed alike).
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        pooled = tf.nn.max_pool2d(x, pool_size, strides, padding.upper())
    gradient = tape.gradient(pooled, x, output_gradients=tf.constant(values))
    np.testing.assert_allclose(unpooled, gradient.numpy(), rtol=1e-6, atol=1e-6)


def test_unpool_sums_coincident_switches():
    # One large value at (2, 2) is the maximum of four overlapping 3x3/2 windows.
    x = np.zeros((2, 5, 5, 1), np.float32)
    x[:, 2, 2, 0] = 9.0
    x[1, 0, 0, 0] = 10.0  # the second example also has its own maximum in a corner
    _, switches = zlayers.MaxPoolWithArgmax(3, 2, "valid")(x)
    assert len(np.unique(switches.numpy()[0])) == 1
    values = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 2, 2, 1).repeat(2, axis=0)
    unpooled = zlayers.MaxUnpool((5, 5))([values, switches]).numpy()
    assert unpooled[0, 2, 2, 0] == 10.0 and np.count_nonzero(unpooled[0]) == 1
    assert unpooled[1, 0, 0, 0] == 1.0 and unpooled[1, 2, 2, 0] == 9.0


def test_unpool_accepts_switches_from_another_batch():
    x = _maps((4, 9, 9, 3), seed=9)
    _, switches = zlayers.MaxPoolWithArgmax(3, 2, "same")(x)
    values = np.random.default_rng(10).normal(size=switches.shape).astype(np.float32)
    order = np.array([3, 1, 1])  # rows gathered out of order, one twice
    gathered = tf.gather(switches, order)
    unpooled = zlayers.MaxUnpool((9, 9))([values[order], gathered]).numpy()
    single = [
        zlayers.MaxUnpool((9, 9))([values[i : i + 1], switches[i : i + 1]]).numpy()[0]
        for i in order
    ]
    np.testing.assert_allclose(unpooled, np.stack(single), rtol=1e-6)
    clone = zlayers.MaxUnpool.from_config(zlayers.MaxUnpool((9, 9), name="u").get_config())
    assert clone.output_size == (9, 9)


# ---------------------------------------------------------------------------
# TiedConv2DTranspose.


def _conv(input_shape, filters, kernel_size, strides, padding, groups=1, seed=0):
    conv = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        groups=groups,
        kernel_initializer=keras.initializers.RandomNormal(seed=seed),
        bias_initializer=keras.initializers.RandomNormal(seed=seed + 1),
    )
    conv.build((None, *input_shape))
    return conv


@pytest.mark.parametrize(
    "input_shape, filters, kernel_size, strides, padding, groups",
    [
        ((13, 11, 3), 4, 5, 2, "valid", 1),
        ((12, 12, 2), 3, 3, 2, "same", 1),
        ((9, 10, 4), 6, 3, 1, "same", 2),
        ((15, 15, 4), 4, (7, 5), (2, 3), "valid", 2),
    ],
)
def test_tied_transpose_is_the_input_gradient(
    input_shape, filters, kernel_size, strides, padding, groups
):
    conv = _conv(input_shape, filters, kernel_size, strides, padding, groups)
    tied = zlayers.TiedConv2DTranspose(conv, input_shape[:2])
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(2, *input_shape)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = conv(x)
    signal = rng.normal(size=y.shape).astype(np.float32)
    gradient = tape.gradient(y, x, output_gradients=tf.constant(signal)).numpy()
    projected = tied(signal).numpy()
    assert projected.shape == (2, *input_shape)  # exactly the forward input size
    np.testing.assert_allclose(projected, gradient, rtol=1e-5, atol=1e-5)


def test_tied_transpose_shares_the_forward_kernel():
    conv = _conv((8, 8, 2), 3, 3, 2, "valid", seed=5)
    tied = zlayers.TiedConv2DTranspose(conv, (8, 8))
    signal = np.random.default_rng(3).normal(size=(1, 3, 3, 3)).astype(np.float32)
    before = tied(signal).numpy()
    assert tied.kernel is conv.kernel
    assert not any(w is not conv.kernel and w is not conv.bias for w in tied.weights)
    conv.kernel.assign(conv.kernel * -3.0)
    np.testing.assert_allclose(tied(signal).numpy(), -3.0 * before, rtol=1e-5, atol=1e-6)
    # No bias: a zero signal projects to exactly zero.
    assert not tied(np.zeros_like(signal)).numpy().any()


def test_tied_transpose_config_round_trips():
    conv = _conv((8, 8, 2), 3, 3, 2, "valid", seed=6)
    tied = zlayers.TiedConv2DTranspose(conv, (8, 8), name="t")
    config = tied.get_config()
    clone = zlayers.TiedConv2DTranspose.from_config(config)
    assert clone.output_size == (8, 8) and clone.filters == 2
    assert clone.forward_layer.kernel.shape == conv.kernel.shape


def test_tied_transpose_rejects_bad_forward_layers():
    with pytest.raises(ValueError, match="Conv2D"):
        zlayers.TiedConv2DTranspose(keras.layers.Dense(3), (4, 4))
    with pytest.raises(ValueError, match="built"):
        zlayers.TiedConv2DTranspose(keras.layers.Conv2D(3, 3), (4, 4))
    dilated = keras.layers.Conv2D(3, 3, dilation_rate=2)
    dilated.build((None, 9, 9, 1))
    with pytest.raises(ValueError, match="dilated"):
        zlayers.TiedConv2DTranspose(dilated, (9, 9))


# ---------------------------------------------------------------------------
# GroupedConv2D.


def assert_conv_equals_keras_conv(ours, x, args):
    """`ours` gives keras.layers.Conv2D(**args)'s outputs and gradients on x."""
    keras_conv = keras.layers.Conv2D(**args)
    ours.build(x.shape)
    keras_conv.build(x.shape)
    keras_conv.set_weights(ours.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_ours, y_keras = ours(x), keras_conv(x)
        loss_ours = tf.reduce_sum(y_ours * tf.sin(y_ours))
        loss_keras = tf.reduce_sum(y_keras * tf.sin(y_keras))
    np.testing.assert_allclose(y_ours, y_keras, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        tape.gradient(loss_ours, [x, ours.kernel, ours.bias]),
        tape.gradient(loss_keras, [x, keras_conv.kernel, keras_conv.bias]),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "groups,strides,padding", [(2, 1, "same"), (4, 2, "valid"), (1, 1, "same")]
)
def test_grouped_conv_equals_keras_grouped_conv(groups, strides, padding):
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 9, 9, 8)), tf.float32)
    args = dict(filters=12, kernel_size=3, strides=strides, padding=padding, groups=groups)
    ours = zlayers.GroupedConv2D(**args)
    assert_conv_equals_keras_conv(ours, x, args)
    assert ours.kernel.shape == (3, 3, 8 // groups, 12)


def test_grouped_conv_round_trips_in_a_saved_model(tmp_path):
    inputs = keras.Input((8, 8, 4))
    outputs = zlayers.GroupedConv2D(6, 3, groups=2, name="conv2")(inputs)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("conv2")) is zlayers.GroupedConv2D
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


# ---------------------------------------------------------------------------
# WinogradConv2D.


def _graph_op_types(model, shape):
    spec = tf.TensorSpec(shape, tf.float32)
    graph = tf.function(lambda x: model(x)).get_concrete_function(spec).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        types |= {node.op for node in function.node_def}
        if function.attr.get("_XlaMustCompile") and function.attr["_XlaMustCompile"].b:
            types.add("<XLA>")
    return types


# Odd and even maps (the last tile half outside), a 1x1 map, one channel.
@pytest.mark.parametrize(
    "size, channels_in, filters", [(13, 5, 7), (6, 3, 4), (1, 2, 3), (7, 1, 1)]
)
@pytest.mark.parametrize("ops", [zlayers.XLA, zlayers.PORTABLE])
def test_winograd_conv_equals_keras_conv(size, channels_in, filters, ops):
    rng = np.random.default_rng(size)
    x = tf.constant(rng.normal(size=(4, size, size + 1, channels_in)), tf.float32)
    args = dict(filters=filters, kernel_size=3, padding="same", bias_initializer="random_normal")
    ours = zlayers.WinogradConv2D(**args)
    ours.ops = ops
    assert ours.uses_winograd(x)
    assert_conv_equals_keras_conv(ours, x, args)


@pytest.mark.parametrize("ops", [zlayers.XLA, zlayers.PORTABLE])
def test_winograd_conv_takes_any_batch_size_in_one_trace(ops):
    # Batches below 4 run the direct convolution, chosen when the graph runs.
    inputs = keras.Input((5, 5, 3))
    model = keras.Model(inputs, zlayers.WinogradConv2D(4, 3, padding="same")(inputs))
    zlayers.use_ops(model, ops)
    reference = keras.Model(inputs, keras.layers.Conv2D(4, 3, padding="same")(inputs))
    reference.set_weights(model.get_weights())

    @tf.function(input_signature=[tf.TensorSpec((None, 5, 5, 3))])
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
            loss = tf.reduce_sum(y * y)
        return y, tape.gradient(loss, [x, *model.trainable_variables])

    assert ("<XLA>" in _graph_op_types(model, (None, 5, 5, 3))) == (ops == zlayers.XLA)
    for batch in (1, 3, 4, 6):
        x = tf.constant(np.random.default_rng(batch).normal(size=(batch, 5, 5, 3)), tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            expected = reference(x)
            loss = tf.reduce_sum(expected * expected)
        grads = tape.gradient(loss, [x, *reference.trainable_variables])
        y, ours = run(x)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        for a, b in zip(ours, grads):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "args",
    [
        dict(kernel_size=3, padding="valid"),
        dict(kernel_size=3, strides=2, padding="same"),
        dict(kernel_size=5, padding="same"),
        dict(kernel_size=3, padding="same", dilation_rate=2),
    ],
)
def test_winograd_conv_falls_back_to_the_direct_convolution(args):
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 9, 9, 3)), tf.float32)
    ours, keras_conv = zlayers.WinogradConv2D(4, **args), keras.layers.Conv2D(4, **args)
    ours.build(x.shape)
    keras_conv.build(x.shape)
    keras_conv.set_weights(ours.get_weights())
    assert not ours.uses_winograd(x)
    np.testing.assert_array_equal(ours(x), keras_conv(x))


def test_use_ops_picks_what_traced_graphs_run(tmp_path):
    inputs = keras.Input((6, 6, 3))
    x = zlayers.WinogradConv2D(8, 3, padding="same", name="conv3")(inputs)
    model = keras.Model(inputs, zlayers.ContrastNorm(name="norm")(x))
    shape = (4, 6, 6, 3)

    def batched_matmul(types):
        return any(t.startswith("BatchMatMul") for t in types)

    types = _graph_op_types(model, shape)  # the default: XLA
    assert "<XLA>" in types and batched_matmul(types)
    assert not {"Conv2D", "LRN"} & types
    small = _graph_op_types(model, (2, 6, 6, 3))  # below 4 images: direct
    assert "Conv2D" in small and not batched_matmul(small)
    zlayers.use_ops(model, zlayers.PORTABLE)
    portable = _graph_op_types(model, shape)
    assert "<XLA>" not in portable and batched_matmul(portable)
    assert "LRN" not in portable  # a band-matrix 1x1 convolution instead
    zlayers.use_ops(model, zlayers.BUILTIN)
    builtin = _graph_op_types(model, shape)
    assert "<XLA>" not in builtin and not batched_matmul(builtin)
    assert {"Conv2D", "LRN"} <= builtin
    with pytest.raises(ValueError, match="ops"):
        zlayers.use_ops(model, "fast")
    # Saved and loaded: the class and the default (XLA) come back.
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("conv3")) is zlayers.WinogradConv2D
    assert loaded.get_layer("conv3").ops == loaded.get_layer("norm").ops == zlayers.XLA
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-5)
