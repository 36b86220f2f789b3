"""Tests of zfkeras.deconv against the gradient formulation of the deconvnet.

The reference (`gradient_projection`) rebuilds each model's forward pass from
its own layers under a GradientTape, with each ReLU's backward replaced by
ReLU of the incoming gradient and ContrastNorm's backward by the identity;
max pooling, convolutions, padding, flatten and dense layers keep their
ordinary TensorFlow gradients (the max-pool gradient routes to the argmax).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from zfkeras import deconv
from zfkeras import layers as zlayers
from zfkeras.errors import Error
from zfkeras.models import AlexNet, ZFNet

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


# ---------------------------------------------------------------------------
# The reference: gradients with a rectifying backward.


@tf.custom_gradient
def _rectifying_relu(x):
    return tf.nn.relu(x), tf.nn.relu


def _identity_backward(layer, x):
    @tf.custom_gradient
    def forward(x):
        return layer(x), lambda dy: dy

    return forward(x)


def _forward_to(model, images, target):
    """Replays `model` on `images` up to the output of layer `target`.

    Returns the output of `target`, or the pre-softmax scores if `target` is a
    softmax Dense; the deconvnet's backward rules are in the graph.
    """
    h = images
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        activation = getattr(getattr(layer, "activation", None), "__name__", None)
        if isinstance(layer, keras.layers.Conv2D):
            h = layer.convolution_op(h, layer.kernel) + layer.bias
            if activation == "relu":
                h = _rectifying_relu(h)
        elif isinstance(layer, keras.layers.Dense):
            h = tf.matmul(h, layer.kernel) + layer.bias
            if activation == "relu":
                h = _rectifying_relu(h)
        elif isinstance(layer, keras.layers.ReLU):
            h = _rectifying_relu(h)
        elif isinstance(layer, zlayers.ContrastNorm):
            h = _identity_backward(layer, h)
        else:
            h = layer(h, training=False)
        if layer.name == target:
            return h
    raise AssertionError(f"no layer {target}")


def gradient_projection(model, images, target, seeds):
    """d/d images of sum(seeds * output of `target`), deconvnet backward rules."""
    images = tf.constant(images, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(images)
        output = _forward_to(model, images, target)
        objective = tf.reduce_sum(tf.constant(seeds, tf.float32) * output)
    return tape.gradient(objective, images).numpy()


def unit_seeds(maps, channels, positions=None, rectified=True, whole_map=False):
    """Seeds for (R, h, w, C) maps: the strongest (or given) unit of each channel."""
    seeds = np.zeros_like(maps)
    rows = np.arange(len(maps))
    if maps.ndim == 2:
        seeds[rows, channels] = maps[rows, channels] if rectified else 1.0
        return seeds
    chosen = maps[rows, :, :, channels]
    if whole_map:
        seeds[rows, :, :, channels] = chosen
        return seeds
    if positions is None:
        flat = chosen.reshape(len(maps), -1).argmax(axis=1)
        positions = np.stack(np.divmod(flat, maps.shape[2]), axis=1)
    ys, xs = positions[:, 0], positions[:, 1]
    seeds[rows, ys, xs, channels] = chosen[rows, ys, xs] if rectified else 1.0
    return seeds


def assert_projection_close(actual, expected):
    scale = np.abs(expected).max()
    assert scale > 1e-6, "the reference projection is all zero: a useless comparison"
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------------------
# Fixtures: tiny models with He weights so activations are well above noise.


def _images(shape, count, seed=0):
    return np.random.default_rng(seed).normal(0.0, 1.0, (count, *shape)).astype(np.float32)


@pytest.fixture(scope="module")
def zfnet():
    return ZFNet(10, (64, 64, 1), width=0.25, fc_units=32, init="he", seed=1)


@pytest.fixture(scope="module")
def zfnet_deconv(zfnet):
    return deconv.Deconvnet(zfnet)


MODELS = {
    "zfnet": lambda: ZFNet(10, (64, 64, 1), width=0.25, fc_units=32, init="he", seed=1),
    "alexnet": lambda: AlexNet(
        10, (67, 67, 3), towers=1, width=0.25, fc_units=32, init="he", seed=2
    ),
    "alexnet2": lambda: AlexNet(
        10, (64, 64, 3), towers=2, width=0.25, fc_units=32, init="he", seed=3
    ),
}
# The layer whose output is each visualizable layer's feature map, in the
# reference's own terms (ours are built with ReLU layers after conv and fc).
FEATURE_OUTPUT = {f"conv{i}": f"relu{i}" for i in range(1, 6)}
FEATURE_OUTPUT.update(fc6="relu6", fc7="relu7", predictions="predictions")


def _strong_requests(dn, images, layers, per_layer=2):
    """Requests for the strongest maps of each image: (rows, layers, channels)."""
    activations = dn.activations(images, layers)
    rows, names, channels = [], [], []
    for layer in layers:
        top = deconv.strongest_channels(activations[layer], per_layer)
        for image in range(len(images)):
            for channel in top[image]:
                rows.append(image)
                names.append(layer)
                channels.append(int(channel))
    return np.array(rows), names, np.array(channels), activations


@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_every_conv_layer_equals_the_gradient_formulation(architecture):
    model = MODELS[architecture]()
    dn = deconv.Deconvnet(model)
    assert dn.conv_layer_names == CONV_LAYERS
    images = _images(model.input_shape[1:], 2, seed=4)
    rows, names, channels, activations = _strong_requests(dn, images, CONV_LAYERS)
    # All requests (both images, all layers, several maps) in one call.
    result = dn.project(images, rows, names, channels)
    assert result.projections.shape == (len(rows), *images.shape[1:])
    for layer in CONV_LAYERS:
        where = np.flatnonzero([n == layer for n in names])
        maps = activations[layer][rows[where]]
        assert (result.values[where] > 1e-3).all(), f"{layer}: weak activations"
        np.testing.assert_allclose(
            result.values[where], maps.max(axis=(1, 2))[np.arange(len(where)), channels[where]]
        )
        seeds = unit_seeds(maps, channels[where])
        expected = gradient_projection(model, images[rows[where]], FEATURE_OUTPUT[layer], seeds)
        assert_projection_close(result.projections[where], expected)


def test_fc_and_class_score_projections(zfnet, zfnet_deconv):
    images = _images((64, 64, 1), 2, seed=5)
    layers = ("fc6", "fc7", "predictions")
    rows, names, channels, activations = _strong_requests(zfnet_deconv, images, layers, 3)
    result = zfnet_deconv.project(images, rows, names, channels)
    for layer in layers:
        where = np.flatnonzero([n == layer for n in names])
        units = activations[layer][rows[where]]
        rectified = layer != "predictions"
        seeds = unit_seeds(units, channels[where], rectified=rectified)
        expected = gradient_projection(zfnet, images[rows[where]], FEATURE_OUTPUT[layer], seeds)
        assert_projection_close(result.projections[where], expected)
        np.testing.assert_allclose(
            result.values[where], units[np.arange(len(where)), channels[where]]
        )
        np.testing.assert_array_equal(result.boxes[where], [[0, 0, 64, 64]] * len(where))
    # The class scores are the model's logits: their softmax is the output.
    probabilities = zfnet.predict(images, verbose=0)
    np.testing.assert_allclose(
        tf.nn.softmax(activations["predictions"]).numpy(), probabilities, rtol=1e-5, atol=1e-6
    )


def test_whole_map_and_explicit_positions(zfnet, zfnet_deconv):
    images = _images((64, 64, 1), 2, seed=6)
    rows, names, channels, activations = _strong_requests(zfnet_deconv, images, ("conv2",), 2)
    maps = activations["conv2"][rows]
    # Whole maps.
    result = zfnet_deconv.project(images, rows, "conv2", channels, mode="map")
    seeds = unit_seeds(maps, channels, whole_map=True)
    expected = gradient_projection(zfnet, images[rows], "relu2", seeds)
    assert_projection_close(result.projections, expected)
    # Explicit positions: pick an active unit that is not the map's maximum.
    positions = []
    for r, c in enumerate(channels):
        active = np.argwhere(maps[r, :, :, c] > 0)
        positions.append(active[len(active) // 2])
    positions = np.array(positions)
    result = zfnet_deconv.project(images, rows, "conv2", channels, positions=positions)
    np.testing.assert_array_equal(result.positions, positions)
    seeds = unit_seeds(maps, channels, positions=positions)
    expected = gradient_projection(zfnet, images[rows], "relu2", seeds)
    assert_projection_close(result.projections, expected)


def test_batched_requests_equal_single_requests(zfnet_deconv):
    images = _images((64, 64, 1), 3, seed=7)
    rows = np.array([2, 0, 2, 1, 0])
    names = ["conv5", "conv1", "conv1", "conv3", "conv5"]
    channels = np.array([1, 2, 3, 4, 1])
    batched = zfnet_deconv.project(images, rows, names, channels, batch_size=2)
    for r in range(len(rows)):
        single = zfnet_deconv.project(images[rows[r] : rows[r] + 1], 0, names[r], channels[r])
        # Batch size changes oneDNN's summation order: float32 tolerance.
        scale = np.abs(single.projections).max()
        np.testing.assert_allclose(
            batched.projections[r], single.projections[0], rtol=1e-4, atol=1e-5 * scale
        )
        assert batched.values[r] == pytest.approx(single.values[0], rel=1e-5)


# ---------------------------------------------------------------------------
# Geometry.


def test_receptive_fields_match_the_architecture(zfnet_deconv):
    dn = zfnet_deconv
    # conv1 7x7/2 after 1 pixel of padding: unit y sees rows 2y-1 .. 2y+5.
    assert dn.receptive_field("conv1", 0, 0) == (0, 0, 6, 6)
    assert dn.receptive_field("conv1", 10, 3) == (19, 5, 26, 12)
    # pool1 3x3/2 (no padding before), conv2 5x5/2: rows 8y-1 .. 8y+25.
    assert dn.receptive_field("conv2", 2, 0) == (15, 0, 42, 26)
    # pool2 3x3/2 and conv3 3x3/1 'same': rows 16y-17 .. 16y+57.
    assert dn.receptive_field("conv3", 0, 0) == (0, 0, 58, 58)
    assert dn.receptive_field("conv3", 1, 1) == (0, 0, 64, 64)
    assert dn.receptive_field("fc6", 0, 0) == (0, 0, 64, 64)
    y0, x0, y1, x1 = dn.receptive_field("conv1", np.array([0, 10]), np.array([0, 3]))
    np.testing.assert_array_equal(y0, [0, 19])


def test_projection_is_zero_outside_the_receptive_field(zfnet_deconv):
    images = _images((64, 64, 1), 2, seed=8)
    rows, names, channels, _ = _strong_requests(zfnet_deconv, images, CONV_LAYERS[:3], 3)
    result = zfnet_deconv.project(images, rows, names, channels)
    for r, (y0, x0, y1, x1) in enumerate(result.boxes):
        projection = np.abs(result.projections[r]).sum(axis=-1)
        inside = np.zeros(projection.shape, bool)
        inside[y0:y1, x0:x1] = True
        assert (y1 - y0) * (x1 - x0) < 64 * 64 or names[r] == "conv3"
        assert projection[~inside].max(initial=0.0) == 0.0, (names[r], r)
        assert projection[inside].max() > 0.0
        np.testing.assert_array_equal(
            result.boxes[r], zfnet_deconv.receptive_field(names[r], *result.positions[r])
        )


def test_first_layer_receptive_field_is_tight():
    # With positive weights and inputs every pixel of a conv1 unit's field
    # contributes, so the projection's support is exactly the box.
    model = keras.Sequential(
        [
            keras.Input((20, 21, 1)),
            keras.layers.ZeroPadding2D(((1, 2), (0, 1))),
            keras.layers.Conv2D(
                2, (3, 4), strides=(2, 3), activation="relu", kernel_initializer="ones", name="c1"
            ),
            keras.layers.MaxPooling2D(3, 2, padding="same"),
            keras.layers.Conv2D(2, 3, padding="same", kernel_initializer="ones", name="c2"),
        ]
    )
    dn = deconv.Deconvnet(model)
    images = np.random.default_rng(0).uniform(0.5, 1.0, (1, 20, 21, 1)).astype(np.float32)
    positions = np.array([[0, 0], [4, 3], [10, 6]])
    result = dn.project(images, 0, "c1", 0, positions=positions)
    for r, (y0, x0, y1, x1) in enumerate(result.boxes):
        support = np.argwhere(result.projections[r, ..., 0] != 0)
        np.testing.assert_array_equal(support.min(0), [y0, x0])
        np.testing.assert_array_equal(support.max(0) + 1, [y1, x1])
    # Unit y covers padded rows [2y, 2y+2], i.e. image rows [2y-1, 2y+1].
    np.testing.assert_array_equal(result.boxes[1:], [[7, 9, 10, 13], [19, 18, 20, 21]])


def test_map_mode_box_covers_the_positive_units(zfnet_deconv):
    images = _images((64, 64, 1), 1, seed=9)
    activation = zfnet_deconv.activations(images, ["conv1"])["conv1"][0]
    channel = int(deconv.strongest_channels(activation[None], 1)[0, 0])
    result = zfnet_deconv.project(images, 0, "conv1", channel, mode="map")
    active = np.argwhere(activation[:, :, channel] > 0)
    low = zfnet_deconv.receptive_field("conv1", *active.min(0))
    high = zfnet_deconv.receptive_field("conv1", *active.max(0))
    np.testing.assert_array_equal(result.boxes[0], [low[0], low[1], high[2], high[3]])
    assert result.values[0] == pytest.approx(activation[:, :, channel].max())


# ---------------------------------------------------------------------------
# Tied weights.


def _requests(dn, images):
    rows, names, channels, _ = _strong_requests(dn, images, ("conv1", "conv3", "fc6"), 1)
    return rows, names, channels


def test_tied_weights_follow_a_training_step():
    model = ZFNet(10, (64, 64, 1), width=0.25, fc_units=32, init="he", seed=11)
    dn = deconv.Deconvnet(model)
    images = _images((64, 64, 1), 2, seed=10)
    rows, names, channels = _requests(dn, images)
    before = dn.project(images, rows, names, channels).projections
    kernel = model.get_layer("conv1").kernel
    assert dn.deconv_model("conv3").get_layer("deconv_conv1").kernel is kernel
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    model.fit(images, np.array([1, 2]), batch_size=2, epochs=1, verbose=0)
    after = dn.project(images, rows, names, channels).projections
    fresh = deconv.Deconvnet(model).project(images, rows, names, channels).projections
    assert np.abs(after - before).max() > 1e-3 * np.abs(before).max()
    np.testing.assert_allclose(after, fresh, rtol=1e-5, atol=1e-6 * np.abs(fresh).max())


def test_tied_weights_survive_a_keras_round_trip(tmp_path, zfnet, zfnet_deconv):
    images = _images((64, 64, 1), 2, seed=12)
    rows, names, channels = _requests(zfnet_deconv, images)
    expected = zfnet_deconv.project(images, rows, names, channels).projections
    path = str(tmp_path / "zfnet.keras")
    zfnet.save(path)
    loaded = keras.saving.load_model(path)
    dn = deconv.Deconvnet(loaded)
    np.testing.assert_allclose(dn.project(images, rows, names, channels).projections, expected)
    # The rebuilt deconvnet is tied to the loaded model's variables.
    conv1 = loaded.get_layer("conv1")
    assert dn.deconv_model("conv3").get_layer("deconv_conv1").kernel is conv1.kernel
    conv1.kernel.assign(conv1.kernel * 2.0)
    where = np.flatnonzero([n == "conv1" for n in names])
    doubled = dn.project(images, rows[where], "conv1", channels[where]).projections
    # conv1's map doubles and so does its transposed filter: x4.
    np.testing.assert_allclose(doubled, 4.0 * expected[where], rtol=1e-5, atol=1e-6)


def test_deconv_model_round_trip_keeps_the_tie(tmp_path, zfnet_deconv):
    model = zfnet_deconv.deconv_model("conv2")
    images = _images((64, 64, 1), 2, seed=13)
    probe = zfnet_deconv.probe(images, training=False)
    signal = probe["activations"]["conv2"].numpy()
    inputs = [signal, probe["switches"][0].numpy()]
    expected = model(inputs).numpy()
    path = str(tmp_path / "deconv_conv2.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(inputs).numpy(), expected, rtol=1e-5, atol=1e-6)
    tied = loaded.get_layer("deconv_conv1")
    assert any(tied.kernel is w for w in loaded.weights)
    # The projection is linear in conv1's kernel (its last step): doubling the
    # loaded forward kernel doubles the loaded deconv model's output.
    tied.forward_layer.kernel.assign(tied.forward_layer.kernel * 2.0)
    np.testing.assert_allclose(loaded(inputs).numpy(), 2.0 * expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Other Keras CNNs.


@pytest.fixture(scope="module")
def vgg16():
    return keras.applications.VGG16(
        weights=None, input_shape=(32, 32, 3), include_top=True, classes=10
    )


def test_vgg16_equals_the_gradient_formulation(vgg16):
    dn = deconv.Deconvnet(vgg16)
    assert dn.layer_names[0] == "block1_conv1" and dn.layer_names[-3:] == (
        "fc1",
        "fc2",
        "predictions",
    )
    images = _images((32, 32, 3), 2, seed=14) * 50.0
    layers = ("block1_conv1", "block3_conv2", "block5_conv3", "fc2", "predictions")
    rows, names, channels, activations = _strong_requests(dn, images, layers, 1)
    result = dn.project(images, rows, names, channels)
    for layer in layers:
        where = np.flatnonzero([n == layer for n in names])
        rectified = layer != "predictions"
        seeds = unit_seeds(activations[layer][rows[where]], channels[where], rectified=rectified)
        expected = gradient_projection(vgg16, images[rows[where]], layer, seeds)
        assert_projection_close(result.projections[where], expected)


def test_vgg16_without_top():
    model = keras.applications.VGG16(weights=None, input_shape=(32, 32, 3), include_top=False)
    dn = deconv.Deconvnet(model)
    assert dn.layer_names == dn.conv_layer_names and len(dn.layer_names) == 13
    images = _images((32, 32, 3), 1, seed=15) * 50.0
    rows, names, channels, _ = _strong_requests(dn, images, ("block4_conv1",), 1)
    result = dn.project(images, rows, names, channels)
    assert np.abs(result.projections).max() > 0


def test_batch_normalization_is_its_channel_scale():
    model = keras.Sequential(
        [
            keras.Input((12, 12, 2)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(name="relu"),
            keras.layers.MaxPooling2D(2, name="pool"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(3, name="scores"),
            keras.layers.Activation("softmax", name="softmax"),
        ]
    )
    rng = np.random.default_rng(16)
    bn = model.get_layer("bn")
    bn.gamma.assign(rng.uniform(0.5, 2.0, 4))
    bn.beta.assign(rng.uniform(-0.5, 0.5, 4))
    bn.moving_mean.assign(rng.uniform(-0.5, 0.5, 4))
    bn.moving_variance.assign(rng.uniform(0.2, 3.0, 4))
    dn = deconv.Deconvnet(model)
    assert dn.layer_names == ("conv", "scores")
    images = rng.normal(size=(2, 12, 12, 2)).astype(np.float32)
    rows, names, channels, activations = _strong_requests(dn, images, ("conv", "scores"), 2)
    result = dn.project(images, rows, names, channels)
    for layer, output, rectified in (("conv", "relu", True), ("scores", "scores", False)):
        where = np.flatnonzero([n == layer for n in names])
        maps = activations[layer][rows[where]]
        seeds = unit_seeds(maps, channels[where], rectified=rectified)
        expected = gradient_projection(model, images[rows[where]], output, seeds)
        assert_projection_close(result.projections[where], expected)


# ---------------------------------------------------------------------------
# Errors.


def test_unsupported_layers_are_named():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(2, 3, name="conv"),
            keras.layers.AveragePooling2D(2, name="avg"),
        ]
    )
    with pytest.raises(Error, match=r"avg \(AveragePooling2D\) is not supported"):
        deconv.Deconvnet(model)
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, activation="tanh", name="c")]
    )
    with pytest.raises(Error, match="layer c .*'tanh'"):
        deconv.Deconvnet(model)


def test_non_chain_models_are_rejected():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(2, 3, padding="same", name="a")(inputs)
    outputs = keras.layers.Add(name="skip")([x, inputs])
    with pytest.raises(Error, match="not a linear chain"):
        deconv.Deconvnet(keras.Model(inputs, outputs))


def test_bad_requests_raise_one_line_errors(zfnet_deconv):
    images = _images((64, 64, 1), 1)
    with pytest.raises(Error, match="unknown layer 'conv9'; valid: conv1, conv2, .*predictions"):
        zfnet_deconv.project(images, 0, "conv9", 0)
    with pytest.raises(Error, match=r"channel 24 out of range for conv1 \(24 maps: 0-23\)"):
        zfnet_deconv.project(images, 0, "conv1", 24)
    with pytest.raises(Error, match="image_index out of range"):
        zfnet_deconv.project(images, 1, "conv1", 0)
    with pytest.raises(Error, match="positions out of range"):
        zfnet_deconv.project(images, 0, "conv1", 0, positions=[[30, 0]])
    with pytest.raises(Error, match=r"images must be \(N, 64, 64, 1\)"):
        zfnet_deconv.project(images[:, :32], 0, "conv1", 0)
    with pytest.raises(Error, match="unknown mode"):
        zfnet_deconv.project(images, 0, "conv1", 0, mode="mean")


def test_strongest_channels():
    maps = np.zeros((2, 3, 3, 4), np.float32)
    maps[0, 1, 1] = [0.5, 3.0, 1.0, 2.0]
    maps[1, 0, 2] = [4.0, 0.0, 0.0, 1.0]
    np.testing.assert_array_equal(deconv.strongest_channels(maps, 2), [[1, 3], [0, 3]])
    np.testing.assert_array_equal(deconv.strongest_channels(maps[:, 1, 1], 9).shape, (2, 4))
