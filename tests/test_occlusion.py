"""Tests of zfkeras.analysis.occlusion (Fig. 7) and tools/occlusion.py."""

import csv
import dataclasses
import json
import os

import conftest
import keras
import numpy as np
import pytest
from PIL import Image

from zfkeras import data, fileio, runs
from zfkeras.analysis import occlusion, topk
from zfkeras.errors import Error
from zfkeras.models import ZFNet

CROP = 48
SQUARE = (slice(8, 20), slice(26, 38))  # where the object of class 1 sits


@pytest.fixture(scope="module")
def model():
    return ZFNet(3, (CROP, CROP, 1), width=0.25, fc_units=16, init="he", seed=2)


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(0).normal(0, 1, (3, CROP, CROP, 1)).astype(np.float32)


def test_positions_and_map_shapes_follow_size_and_stride(model, inputs):
    tops, lefts = occlusion.occluder_positions(48, 40, 12, 5)
    np.testing.assert_array_equal(tops, [0, 5, 10, 15, 20, 25, 30, 35])
    np.testing.assert_array_equal(lefts, [0, 5, 10, 15, 20, 25])
    for size, stride, count in ((12, 5, 8), (16, 4, 9), (20, 7, 5), (48, 1, 1)):
        maps = occlusion.occlusion_maps(model, inputs[:2], [0, 1], size, stride, "conv5")
        assert len(maps.tops) == len(maps.lefts) == count == (CROP - size) // stride + 1
        for name in ("activation", "p_true", "predicted", "p_predicted"):
            assert getattr(maps, name).shape == (2, count, count)
    with pytest.raises(Error, match="bigger than"):
        occlusion.occluder_positions(48, 48, 49, 4)


def test_occluding_with_the_image_itself_gives_flat_maps(model, inputs):
    labels = [0, 2, 1]
    maps = occlusion.occlusion_maps(
        model, inputs, labels, 12, 4, "conv4", occluder=inputs, batch_size=7
    )
    for n in range(3):
        np.testing.assert_allclose(maps.activation[n], maps.unoccluded_activation[n], rtol=1e-5)
        np.testing.assert_allclose(maps.p_true[n], maps.unoccluded_p_true[n], rtol=1e-5)
        assert (maps.predicted[n] == maps.unoccluded_predicted[n]).all()


def test_each_position_is_the_model_on_that_occluded_copy(model, inputs):
    labels = np.array([1, 0, 2])
    maps = occlusion.occlusion_maps(model, inputs, labels, 10, 6, "conv5", batch_size=5)
    features = topk.feature_model(model, ["conv5"])
    # Default map: the one with the largest activation on the unoccluded image.
    peaks = np.asarray(features(inputs)["conv5"]).max(axis=(1, 2))
    np.testing.assert_array_equal(maps.channels, peaks.argmax(axis=1))
    for n, i, j in ((0, 0, 0), (1, 3, 5), (2, 6, 2)):
        top, left = maps.tops[i], maps.lefts[j]
        copy = inputs[n].copy()
        copy[top : top + 10, left : left + 10] = 0.0  # the mean, in input space
        fmap = np.asarray(features(copy[None])["conv5"])[0, ..., maps.channels[n]]
        probabilities = np.asarray(model(copy[None]))[0]
        np.testing.assert_allclose(maps.activation[n, i, j], fmap.sum(), rtol=1e-5)
        np.testing.assert_allclose(maps.p_true[n, i, j], probabilities[labels[n]], rtol=1e-5)
        assert maps.predicted[n, i, j] == probabilities.argmax()


def test_occluding_the_object_lowers_the_true_class_probability():
    # A tiny model learns "class 1 = a bright square at a fixed place".
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.5, (256, CROP, CROP, 1)).astype(np.float32)
    y = np.arange(256) % 2
    x[y == 1, SQUARE[0], SQUARE[1]] += 2.0
    detector = ZFNet(2, (CROP, CROP, 1), width=0.25, fc_units=32, init="he", seed=0, dropout=0)
    detector.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    detector.fit(x, y, batch_size=32, epochs=4, verbose=0)
    test = rng.normal(0, 0.5, (3, CROP, CROP, 1)).astype(np.float32)
    test[:, SQUARE[0], SQUARE[1]] += 2.0
    maps = occlusion.occlusion_maps(detector, test, [1, 1, 1], 12, 4, "conv5")
    assert (maps.unoccluded_p_true > 0.9).all()
    tops, lefts = maps.tops[:, None], maps.lefts[None, :]
    overlap_rows = np.clip(np.minimum(tops + 12, 20) - np.maximum(tops, 8), 0, None)
    overlap_cols = np.clip(np.minimum(lefts + 12, 38) - np.maximum(lefts, 26), 0, None)
    covered = overlap_rows * overlap_cols / 144.0
    for n in range(3):
        assert maps.p_true[n][covered >= 0.75].max() < 0.5  # object hidden: class lost
        assert maps.p_true[n][covered == 0].min() > 0.9  # object visible: class kept
        assert (maps.predicted[n][covered >= 0.75] == 0).all()


# ---------------------------------------------------------------------------
# The experiment and the tool on a tiny saved run.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("occlusion")
    rng = np.random.default_rng(1)
    for i in range(30):
        folder = root / "data" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (52, 52), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)).save(root / "photo.png")
    pre = data.Preprocessing(resize_size=52, crop_size=CROP, channels=1, input_scale=1 / 64)
    raw, info = data.load(f"folder:{root / 'data'}", "train", channels=1)
    run_dir = root / "run"
    runs.write_run_files(str(run_dir), pre, data.compute_mean(raw, pre), info)
    model = ZFNet(3, (CROP, CROP, 1), width=0.25, fc_units=16, init="he", seed=4)
    fileio.save_model(model, str(run_dir / runs.MODEL_FILE))
    return root


def test_image_files_take_class_names_or_indices(tiny_run, tmp_path):
    photo = str(tiny_run / "photo.png")
    config = occlusion.OcclusionConfig(
        checkpoint=str(tiny_run / "run"),
        output_dir=str(tmp_path),
        images=(photo, photo),
        labels=("class2", "1"),
        size=16,
        stride=8,
    )
    result = occlusion.run_occlusion(config)
    assert [r["class_name"] for r in result["images"]] == ["class2", "class1"]
    record = json.load(open(result["json"]))
    assert record["tops"] == [0, 8, 16, 24, 32] and record["images"][0]["label_given"]
    bad = dataclasses.replace(config, labels=("class7", "1"))
    with pytest.raises(Error, match="unknown class 'class7'; give an index 0-2 or one of"):
        occlusion.run_occlusion(bad)
    with pytest.raises(Error, match="stride 16 must be smaller than the occluder size 16"):
        occlusion.run_occlusion(dataclasses.replace(config, stride=16))


def run_tool(*args, timeout=300):
    return conftest.run_tool("occlusion", *args, timeout=timeout)


def test_tool_end_to_end(tiny_run):
    out = tiny_run / "out"
    result = run_tool(
        f"--checkpoint={tiny_run / 'run'}",
        "--split=train",
        "--indices=4,0",
        "--size=12",
        "--stride=6",
        "--layer=conv4",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "occluding: 2/2 batches" in result.stderr
    assert result.stdout.startswith("train[4] (class")
    assert sorted(os.listdir(out)) == ["occlusion.csv", "occlusion.json", "occlusion.png"]
    record = json.load(open(out / "occlusion.json"))
    assert record["layer"] == "conv4" and record["size"] == 12 and record["stride"] == 6
    assert [r["image"] for r in record["images"]] == ["train[4]", "train[0]"]
    assert np.asarray(record["images"][0]["p_true"]).shape == (7, 7)
    rows = list(csv.reader(open(out / "occlusion.csv")))
    assert rows[0] == ["image", "top", "left", "activation", "p_true", "predicted", "p_predicted"]
    assert len(rows) == 1 + 2 * 49
    first = record["images"][0]
    assert float(rows[1][4]) == pytest.approx(first["p_true"][0][0], rel=1e-5)
    bad = run_tool(f"--checkpoint={tiny_run / 'run'}", "--layer=fc6", f"--output_dir={out}")
    assert bad.returncode == 1
    (line,) = bad.stderr.strip().splitlines()
    assert "unknown or non-conv layer 'fc6'; valid: conv1, conv2, conv3, conv4, conv5" in line
