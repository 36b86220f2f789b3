"""The exports' forward pass with serving weight layouts (export/layouts.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from zfkeras import layers as zlayers
from zfkeras.models import ZFNet
from zfkeras_export import layouts


def _tiny_zfnet():
    # conv3-conv5 are WinogradConv2D; fc6, fc7 and the head are Dense.
    model = ZFNet(3, (56, 56, 3), width=0.25, fc_units=8, seed=0, init="he")
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(getattr(layer, "bias", None), keras.Variable):  # zeros at first
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape).astype(np.float32))
    return model


def _captured(forward, shape):
    spec = tf.TensorSpec(shape, tf.float32)
    function = tf.function(forward).get_concrete_function(spec)
    return {v.ref() for v in function.variables}


@pytest.mark.parametrize("ops", zlayers.OP_SETS)
def test_serving_forward_equals_the_model_at_small_and_large_batches(ops):
    model = _tiny_zfnet()
    x = np.random.default_rng(0).normal(0, 50, (6, 56, 56, 3)).astype(np.float32)
    expected = model(x, training=False).numpy()  # Keras: the XLA op set
    assert np.abs(expected - expected.mean(axis=1, keepdims=True)).max() > 1e-3
    forward = layouts.ServingForward(model)
    assert forward.replays
    forward.use_ops(ops)
    run = tf.function(forward, input_signature=[tf.TensorSpec((None, 56, 56, 3), tf.float32)])
    # Winograd from 4 images, the direct convolution below (one trace).
    np.testing.assert_allclose(run(x).numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(run(x[:1]).numpy(), expected[:1], rtol=0, atol=1e-6)


def test_the_graph_reads_the_serving_copies_not_the_kernels_they_replace():
    model = _tiny_zfnet()
    forward = layouts.ServingForward(model)
    captured = _captured(forward, (8, 56, 56, 3))
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if isinstance(layer, keras.layers.Dense):
            assert kernel.value.ref() not in captured, layer.name
            assert layer.bias.value.ref() in captured, layer.name
        elif isinstance(layer, zlayers.WinogradConv2D):
            assert kernel.value.ref() not in captured, layer.name  # 8 images: Winograd only
        elif kernel is not None:
            assert kernel.value.ref() in captured, layer.name
    copies = {
        v.ref() for v in (*forward._dense_kernels.values(), *forward._winograd_kernels.values())
    }
    assert len(copies) == 6 and copies <= captured
    dense = model.get_layer("fc6")
    np.testing.assert_array_equal(forward._dense_kernels["fc6"].numpy(), dense.kernel.numpy().T)


def test_a_model_that_is_not_one_chain_runs_as_it_is():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, activation="relu", name="a")(inputs)
    outputs = keras.layers.Dense(3, name="b")(keras.layers.Concatenate()([inputs, hidden]))
    model = keras.Model(inputs, outputs)
    forward = layouts.ServingForward(model)
    assert not forward.replays
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_array_equal(forward(x).numpy(), model(x).numpy())
