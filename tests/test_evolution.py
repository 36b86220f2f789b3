"""Tests of zfkeras.analysis.evolution (Fig. 4) and tools/evolution.py."""

import glob
import json
import os

import conftest
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from zfkeras import data, deconv, fileio, runs
from zfkeras.analysis import evolution, topk
from zfkeras.errors import Error
from zfkeras.models import ZFNet

SIZE, CROP = 52, 48
PRE = data.Preprocessing(resize_size=SIZE, crop_size=CROP, channels=1, input_scale=1 / 64)
SEEDS = {1: 11, 2: 12, None: 13}  # snapshot epoch (None: final model) -> weights seed


def _model(seed):
    return ZFNet(3, (CROP, CROP, 1), width=0.25, fc_units=16, init="he", seed=seed)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with snapshots of epochs 1 and 2 and a final model (epoch 3)."""
    root = tmp_path_factory.mktemp("evolution")
    rng = np.random.default_rng(0)
    for i in range(30):
        folder = root / "data" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    raw, info = data.load(f"folder:{root / 'data'}", "train", channels=1)
    mean = data.compute_mean(raw, PRE)
    run_dir = root / "run"
    runs.write_run_files(str(run_dir), PRE, mean, info, {"architecture": "zfnet"})
    for epoch, seed in SEEDS.items():
        path = runs.snapshot_path(str(run_dir), epoch) if epoch else str(run_dir / "model.keras")
        fileio.save_model(_model(seed), path)
    fileio.write_json(str(run_dir / "eval.json"), {"history": {"loss": [3.0, 2.0, 1.0]}})
    return root, raw, mean


def test_each_column_uses_its_snapshots_weights(tiny_run, tmp_path):
    root, raw, mean = tiny_run
    config = evolution.EvolutionConfig(
        checkpoint=str(root / "run"),
        output_dir=str(tmp_path / "out"),
        split="train",
        layers=("conv1", "conv5"),
        maps=(("conv1", (0, 4)), ("conv5", (2,))),
        batch_size=10,
    )
    result = evolution.run_evolution(config)
    assert result["columns"] == ["epoch 1", "epoch 2", "epoch 3 (final)"]
    assert os.path.isfile(result["figure"])
    record = json.load(open(result["json"]))
    assert record["num_images"] == 27
    inputs = np.concatenate(
        [b[1] for b in topk.model_input_batches(raw, PRE, mean, 27).as_numpy_iterator()]
    )
    for column, seed in enumerate(SEEDS.values()):
        # Brute force: the strongest activation over all images and positions.
        features = topk.feature_model(_model(seed), ["conv1", "conv5"])(inputs)
        for layer, channel in (("conv1", 0), ("conv1", 4), ("conv5", 2)):
            entry = record["layers"][layer][str(channel)][column]
            maps = np.asarray(features[layer])[..., channel]
            image, y, x = np.unravel_index(maps.argmax(), maps.shape)
            assert entry["image_index"] == image and entry["position"] == [y, x]
            np.testing.assert_allclose(entry["activation"], maps.max(), rtol=1e-5)
    values = [e["activation"] for e in record["layers"]["conv5"]["2"]]
    assert len(set(values)) == 3  # three different sets of weights


def test_missing_snapshot_and_bare_model_are_one_line_errors(tiny_run, tmp_path):
    root, _, _ = tiny_run
    bad = evolution.EvolutionConfig(str(root / "run"), str(tmp_path), epochs=(1, 7))
    with pytest.raises(Error, match=r"no snapshot for epoch 7 \(snapshots: 1, 2\)"):
        evolution.run_evolution(bad)
    bare = evolution.EvolutionConfig(str(root / "run" / "model.keras"), str(tmp_path))
    with pytest.raises(Error, match="needs a training work dir"):
        evolution.run_evolution(bare)


def test_strongest_in_batch_projects_the_argmax():
    model = _model(5)
    dn = deconv.Deconvnet(model)
    inputs = np.random.default_rng(3).normal(0, 1, (5, CROP, CROP, 1)).astype(np.float32)
    result = evolution.strongest_in_batch(dn, inputs, "conv2", [1, 6])
    maps = dn.activations(inputs, ["conv2"])["conv2"]
    for row, channel in enumerate([1, 6]):
        image, y, x = np.unravel_index(maps[..., channel].argmax(), maps.shape[:3])
        assert result.image_index[row] == image and list(result.positions[row]) == [y, x]
        reference = dn.project(inputs, image, "conv2", channel, positions=[[y, x]])
        np.testing.assert_allclose(result.projections[row], reference.projections[0], atol=1e-6)


def _logged_images(log_dir):
    """{(tag, step): uint8 image} from the feature_evolution event files."""
    images = {}
    for path in glob.glob(os.path.join(log_dir, "feature_evolution", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                encoded = tf.make_ndarray(value.tensor)[2]  # width, height, PNG
                images[(value.tag, event.step)] = tf.io.decode_png(encoded).numpy()
    return images


def test_callback_logs_projections_with_the_current_weights(tmp_path):
    model = _model(6)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (16, CROP, CROP, 1)).astype(np.float32)
    y = np.arange(16) % 3
    callback = evolution.EvolutionCallback(
        layers=("conv1", "conv5"),
        channels={"conv1": [0, 3], "conv5": [1]},
        images=x[:6],
        log_dir=str(tmp_path),
    )
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    logged = _logged_images(str(tmp_path))
    assert sorted(logged) == [
        ("feature_evolution/conv1", 1),
        ("feature_evolution/conv1", 2),
        ("feature_evolution/conv5", 1),
        ("feature_evolution/conv5", 2),
    ]
    # The deconvnet shares the model's variables: epoch 2's images are what
    # the trained weights give now, and differ from epoch 1's.
    for layer, strip in callback.strips().items():
        image = logged[(f"feature_evolution/{layer}", 2)]
        assert image.shape[:2] == strip.shape[:2]
        np.testing.assert_allclose(image[..., :3] / 255.0, strip, atol=1.5 / 255)
        assert not np.array_equal(image, logged[(f"feature_evolution/{layer}", 1)])


def test_callback_rejects_bad_layers_before_training(tmp_path):
    model = _model(6)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = np.zeros((4, CROP, CROP, 1), np.float32)
    callback = evolution.EvolutionCallback(["conv9"], [0], x, str(tmp_path))
    with pytest.raises(Error, match="unknown layer 'conv9'"):
        model.fit(x, np.zeros(4), epochs=1, verbose=0, callbacks=[callback])


def run_tool(*args, timeout=300):
    return conftest.run_tool("evolution", *args, timeout=timeout)


def test_tool_end_to_end(tiny_run):
    root, _, _ = tiny_run
    out = root / "tool_out"
    result = run_tool(
        f"--checkpoint={root / 'run'}",
        "--split=train",
        "--layers=conv1,conv2",
        "--num_maps=2",
        "--epochs=2",
        "--num_images=20",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "columns: epoch 2, epoch 3 (final)" in result.stdout
    assert "epoch 2: 1/1 batches" in result.stderr
    assert sorted(os.listdir(out)) == ["evolution.json", "evolution.png"]
    record = json.load(open(out / "evolution.json"))
    assert record["num_images"] == 20 and record["epochs"] == [2, None]
    assert [len(v) for v in record["layers"]["conv2"].values()] == [2, 2]
    bad = run_tool(f"--checkpoint={root / 'run'}", "--epochs=9", f"--output_dir={out}")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"evolution: error: {root / 'run'}: no snapshot for epoch 9 (snapshots: 1, 2)"
    ]
