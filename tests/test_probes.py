"""Per-layer probes and transfer (Tables 4-7): the classifier, the features, tools/probe.py."""

import json
import os

import conftest
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from zfkeras import data, fileio, runs
from zfkeras.analysis import probes
from zfkeras.errors import Error
from zfkeras.models import AlexNet, ZFNet

CLASSES = ("horizontal", "vertical", "spots")


def run_tool(*args, timeout=300):
    return conftest.run_tool("probe", *args, timeout=timeout)


def pattern(label, rng, size=56):
    """Stripes across, stripes down, or spots, at a random period and phase, with noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.uniform(5, 9)
    phase = rng.uniform(0, 2 * np.pi)
    if label == 0:
        wave = np.sin(2 * np.pi * y / period + phase)
    elif label == 1:
        wave = np.sin(2 * np.pi * x / period + phase)
    else:
        wave = np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period + phase)
    image = 128 + 90 * wave + rng.normal(0, 20, wave.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# The linear classifier.


@pytest.mark.parametrize("classifier", probes.CLASSIFIERS)
def test_linear_classifier_separates_separable_data(classifier):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (4, 20))
    train_y, test_y = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
    train_x = centres[train_y] + rng.normal(size=(400, 20))
    test_x = centres[test_y] + rng.normal(size=(200, 20))
    train_x[:, 0] = 7.0  # a constant feature must not break the standardisation
    test_x[:, 0] = 7.0
    config = probes.LinearConfig(classifier=classifier, steps=100)
    accuracy = probes.train_linear(train_x, train_y, test_x, test_y, 4, config)
    assert accuracy > 0.95  # chance is 0.25
    # Shuffled labels carry no information: near chance on the test set.
    shuffled = probes.train_linear(train_x, rng.permutation(train_y), test_x, test_y, 4, config)
    assert shuffled < 0.5


def test_sample_per_class():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    chosen = probes.sample_per_class(labels, 2, 3, np.random.default_rng(0))
    assert np.bincount(labels[chosen]).tolist() == [2, 2, 2]
    assert len(set(chosen.tolist())) == 6
    with pytest.raises(Error, match="class 1 has 3 training examples, fewer than 4"):
        probes.sample_per_class(labels, 4, 3, np.random.default_rng(0))


# ---------------------------------------------------------------------------
# Features.


def test_layer_names_follow_the_paper_and_skip_ablated_layers():
    model = ZFNet(3, (48, 48, 1), width=0.25, fc_units=8, remove=("conv3", "fc7"))
    names = [probes.layer_output_name(model, n) for n in range(1, 8)]
    assert names == ["relu1", "relu2", None, "relu4", "relu5", "relu6", None]
    assert probes.top_feature_layer(model) == (
        "relu6",
        "the model has no fc7; layer 7 is its last fc layer (relu6)",
    )
    bare = AlexNet(3, (64, 64, 1), width=0.25, fc_units=8, remove=("fc6", "fc7"))
    assert probes.top_feature_layer(bare)[0] == "flatten"
    with pytest.raises(Error, match="numbered 1-7"):
        probes.layer_output_name(model, 8)


def test_features_are_globally_pooled_rectified_maps():
    model = ZFNet(3, (48, 48, 1), width=0.25, fc_units=8, init="he", seed=2)
    run = runs.Run(
        "", model, data.Preprocessing(56, 48, 1), np.zeros((56, 56, 1), np.float32), CLASSES, {}
    )
    rng = np.random.default_rng(0)
    images = [pattern(i % 3, rng)[..., None] for i in range(5)]
    ds = tf.data.Dataset.from_tensor_slices((np.stack(images), np.arange(5) % 3))
    layers = {1: "relu1", 2: "relu2", 7: "relu7"}
    averaged = probes.extract_features(run, ds, layers, "avg", batch_size=2)
    maxed = probes.extract_features(run, ds, layers, "max", batch_size=3)
    assert averaged.labels.tolist() == [0, 1, 2, 0, 1, 2][:5]
    inputs = run.model_input(np.stack([data.eval_view(i, run.preprocessing) for i in images]))
    maps = probes.feature_model(model, ["relu1", "relu2", "relu7"])(inputs)
    for key, value in zip((1, 2), maps[:2]):
        value = np.asarray(value)
        np.testing.assert_allclose(averaged.by_layer[key], value.mean(axis=(1, 2)), rtol=1e-5)
        np.testing.assert_allclose(maxed.by_layer[key], value.max(axis=(1, 2)), rtol=1e-5)
    # Batches of 2 run conv3-conv5 directly, the 5 images at once by Winograd:
    # equal to float32 rounding, which fc7 carries on.
    np.testing.assert_allclose(averaged.by_layer[7], np.asarray(maps[2]), rtol=1e-4, atol=1e-5)
    assert averaged.by_layer[1].shape == (5, model.get_layer("conv1").filters)


# ---------------------------------------------------------------------------
# The tool, on separable synthetic images.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny random-weight run and a folder dataset of three texture classes."""
    root = tmp_path_factory.mktemp("probes")
    model = ZFNet(len(CLASSES), (48, 48, 1), width=0.25, fc_units=32, init="he", seed=11)
    preprocessing = data.Preprocessing(resize_size=56, crop_size=48, channels=1)
    mean = np.full((56, 56, 1), 128.0, np.float32)
    info = data.DatasetInfo("tiny", len(CLASSES), CLASSES, 1)
    os.makedirs(root / "run")
    runs.write_run_files(str(root / "run"), preprocessing, mean, info)
    fileio.save_model(model, str(root / "run" / "model.keras"))
    rng = np.random.default_rng(5)
    for split, count in (("train", 20), ("test", 12)):
        for label, name in enumerate(CLASSES):
            os.makedirs(root / "data" / split / name)
            for i in range(count):
                image = pattern(label, rng)
                Image.fromarray(image).save(root / "data" / split / name / f"{i}.png")
    return root


def test_probes_beat_chance_on_separable_data(workdir):
    out = workdir / "out"
    result = run_tool(
        f"--checkpoint={workdir / 'run'}",
        f"--dataset=folder:{workdir / 'data'}",
        "--per_class=8",
        "--repeats=2",
        "--steps=150",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr
    assert "probe: layer 7 (relu7" in result.stderr  # progress
    assert sorted(os.listdir(out)) == ["probe.csv", "probe.json", "probe.png"]
    record = json.loads((out / "probe.json").read_text())
    assert record["num_classes"] == 3 and record["chance"] == pytest.approx(1 / 3)
    assert (record["train_examples"], record["test_examples"]) == (60, 36)
    layers = {row["layer"]: row for row in record["layers"]}
    assert sorted(layers) == [1, 2, 3, 4, 5, 6, 7]
    assert layers[1]["name"] == "relu1" and layers[7]["dims"] == 32
    # Random weights, but the classes are separable: every layer is far above chance.
    for row in record["layers"]:
        assert row["accuracy"] > 0.6, row
    transfer = record["transfer"]
    assert transfer["layer"] == "relu7" and transfer["repeats"] == 2
    (row,) = transfer["results"]
    assert row["per_class"] == 8 and len(row["accuracies"]) == 2
    assert row["mean"] == pytest.approx(np.mean(row["accuracies"]))
    assert row["std"] == pytest.approx(np.std(row["accuracies"]))
    assert row["mean"] > 0.6
    lines = (out / "probe.csv").read_text().splitlines()
    assert len(lines) == 1 + 7 + 2

    too_many = run_tool(
        f"--checkpoint={workdir / 'run'}",
        f"--dataset=folder:{workdir / 'data'}",
        "--experiments=transfer",
        "--per_class=50",
        f"--output_dir={out}",
    )
    assert too_many.returncode == 1
    assert too_many.stderr.strip().splitlines()[-1] == (
        "probe: error: class 0 has 20 training examples, fewer than 50 per class; "
        "use a larger training split or fewer per class"
    )
