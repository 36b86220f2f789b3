"""Structure of ZFNet and AlexNet against the papers, and .keras round trips."""

import keras
import numpy as np
import pytest

from zfkeras import layers as zlayers
from zfkeras import models

# Zeiler & Fergus Fig. 3 (224x224x3, 1000 classes).
ZFNET_SHAPES = {
    "conv1": (110, 110, 96),
    "pool1": (55, 55, 96),
    "norm1": (55, 55, 96),
    "conv2": (26, 26, 256),
    "pool2": (13, 13, 256),
    "conv3": (13, 13, 384),
    "conv4": (13, 13, 384),
    "conv5": (13, 13, 256),
    "pool5": (6, 6, 256),
    "fc6": (4096,),
    "fc7": (4096,),
    "predictions": (1000,),
}
# Weights + biases per layer, counted by hand from Fig. 3.
ZFNET_PARAMS = (
    (7 * 7 * 3 * 96 + 96)
    + (5 * 5 * 96 * 256 + 256)
    + (3 * 3 * 256 * 384 + 384)
    + (3 * 3 * 384 * 384 + 384)
    + (3 * 3 * 384 * 256 + 256)
    + (6 * 6 * 256 * 4096 + 4096)
    + (4096 * 4096 + 4096)
    + (4096 * 1000 + 1000)
)
# Krizhevsky et al. 2012: the two-tower net's well-known 60,965,224 parameters.
ALEXNET2_PARAMS = 60_965_224
NAMES = (
    "images pad1 conv1 relu1 pool1 norm1 conv2 relu2 pool2 norm2 conv3 relu3 conv4 relu4 "
    "conv5 relu5 pool5 flatten fc6 relu6 drop6 fc7 relu7 drop7 predictions"
).split()


def test_zfnet_matches_fig3():
    model = models.ZFNet()
    assert [layer.name for layer in model.layers] == NAMES
    for name, shape in ZFNET_SHAPES.items():
        assert tuple(model.get_layer(name).output.shape[1:]) == shape, name
    assert ZFNET_PARAMS == 62_357_608
    assert model.count_params() == ZFNET_PARAMS


def test_alexnet_two_towers():
    model = models.AlexNet(towers=2)
    assert model.count_params() == ALEXNET2_PARAMS
    assert model.get_layer("conv2").groups == 2
    assert model.get_layer("conv3").groups == 1
    assert model.get_layer("conv4").groups == 2
    assert tuple(model.get_layer("conv1").output.shape[1:]) == (55, 55, 96)
    assert tuple(model.get_layer("pool5").output.shape[1:]) == (6, 6, 256)
    names = [layer.name for layer in model.layers]
    assert names.index("norm1") < names.index("pool1")


def test_alexnet_single_tower_is_dense():
    model = models.AlexNet(towers=1)
    assert all(model.get_layer(f"conv{i}").groups == 1 for i in range(1, 6))
    assert model.count_params() > ALEXNET2_PARAMS


@pytest.mark.parametrize(
    "kwargs, missing",
    [
        (dict(remove=("conv3", "conv4")), {"conv3", "conv4", "relu3", "relu4"}),
        (dict(remove=("fc6", "fc7")), {"fc6", "fc7", "drop6", "drop7"}),
        (dict(remove=("fc7",)), {"fc7", "relu7", "drop7"}),
    ],
)
def test_ablations_remove_layers(kwargs, missing):
    model = models.ZFNet(10, (64, 64, 1), width=0.25, fc_units=32, **kwargs)
    names = {layer.name for layer in model.layers}
    assert not names & missing
    assert "predictions" in names


def test_widths_and_fc_units():
    model = models.ZFNet(10, (64, 64, 3), width=0.5, fc_units=2048, conv_widths=(512, 1024, 512))
    assert model.get_layer("conv1").filters == 48
    assert model.get_layer("conv4").filters == 512
    assert model.get_layer("fc6").units == 2048
    assert model.output_shape == (None, 10)


def test_grayscale_small_input():
    model = models.ZFNet(10, (56, 56, 1), width=0.25, fc_units=64)
    out = model(np.zeros((2, 56, 56, 1), np.float32))
    assert out.shape == (2, 10)
    np.testing.assert_allclose(np.sum(out, axis=1), 1.0, rtol=1e-5)


def test_paper_initialisation():
    model = models.ZFNet(10, (64, 64, 3), width=0.5, fc_units=256, seed=1)
    kernel = model.get_layer("conv2").kernel.numpy()
    assert abs(kernel.std() - 0.01) < 0.001
    assert abs(kernel.mean()) < 0.001
    assert np.all(model.get_layer("conv2").bias.numpy() == 0)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(input_shape=(16, 16, 3)), "too small"),
        (dict(input_shape=(64, 64, 2)), "input_shape"),
        (dict(remove=("conv1",)), "remove"),
        (dict(dropout=1.0), "dropout"),
        (dict(width=0), "width"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        models.ZFNet(**kwargs)


def test_unknown_architecture_lists_valid():
    with pytest.raises(ValueError, match="zfnet, alexnet, alexnet2"):
        models.build("vgg")


def test_filter_renormalisation_is_a_switchable_constraint():
    on = models.ZFNet(10, (64, 64, 1), width=0.25, fc_units=32)
    off = models.ZFNet(10, (64, 64, 1), width=0.25, fc_units=32, filter_rms=None)
    assert isinstance(on.get_layer("conv1").kernel_constraint, zlayers.FilterRMSConstraint)
    assert off.get_layer("conv1").kernel_constraint is None


@pytest.mark.parametrize("architecture", ["zfnet", "alexnet2"])
def test_keras_round_trip(tmp_path, architecture):
    size = 64 if architecture == "zfnet" else 96
    model = models.build(
        architecture,
        num_classes=5,
        input_shape=(size, size, 3),
        width=0.25,
        fc_units=32,
        init="he",
        seed=3,
    )
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).normal(0, 50, (3, size, size, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-6)
    assert isinstance(loaded.get_layer("norm1"), zlayers.ContrastNorm)
    constraint = loaded.get_layer("conv1").kernel_constraint
    if architecture == "zfnet":
        assert isinstance(constraint, zlayers.FilterRMSConstraint)
        assert constraint.max_rms == 0.1
    assert loaded.get_layer("conv2").groups == model.get_layer("conv2").groups
