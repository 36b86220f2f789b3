"""zfkeras.optimizers.SGD: Keras' SGD with a fused momentum update."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from zfkeras import optimizers


def _train(optimizer_class, strategy, weight_decay=None, nesterov=False):
    """Weights and optimizer variables after 2 epochs of a small classifier."""
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(3, kernel_constraint=keras.constraints.MaxNorm(0.5)),
            ]
        )
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay([3], [0.05, 0.005])
        model.compile(
            optimizer=optimizer_class(
                learning_rate=schedule,
                momentum=0.9,
                nesterov=nesterov,
                weight_decay=weight_decay,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = np.arange(64) % 3
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    return [v.numpy() for v in model.weights + model.optimizer.variables]


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
@pytest.mark.parametrize("weight_decay", [None, 5e-4])
def test_fused_update_equals_keras_sgd(strategy, weight_decay, monkeypatch):
    strategy = (
        tf.distribute.get_strategy()
        if strategy == "default"
        else tf.distribute.MirroredStrategy(["/cpu:0"])
    )
    expected = _train(keras.optimizers.SGD, strategy, weight_decay)
    fused_calls = []
    apply = tf.raw_ops.ResourceApplyKerasMomentum

    def counting(**kwargs):
        fused_calls.append(kwargs)
        return apply(**kwargs)

    monkeypatch.setattr(optimizers.tf.raw_ops, "ResourceApplyKerasMomentum", counting)
    got = _train(optimizers.SGD, strategy, weight_decay)
    assert fused_calls  # traced once per weight
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_nesterov_falls_back_to_keras():
    expected = _train(keras.optimizers.SGD, tf.distribute.get_strategy(), nesterov=True)
    got = _train(optimizers.SGD, tf.distribute.get_strategy(), nesterov=True)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_serializes_by_name():
    optimizer = optimizers.SGD(learning_rate=0.02, momentum=0.9, weight_decay=1e-4)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is optimizers.SGD
    assert restored.get_config() == optimizer.get_config()


def test_a_trained_model_loads_compiled_after_importing_the_layers(tmp_path):
    import zfkeras.layers  # noqa: F401  (what a user imports)
    from zfkeras import models

    model = models.ZFNet(num_classes=3, input_shape=(48, 48, 1), width=0.125, fc_units=8)
    model.compile(optimizer=optimizers.SGD(learning_rate=0.01, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer) is optimizers.SGD
    assert loaded.optimizer.momentum == 0.9
