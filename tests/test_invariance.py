"""Invariance (Fig. 5): the transforms, the distances, and tools/invariance.py end to end."""

import json
import os

import conftest
import numpy as np
import pytest
from PIL import Image

from zfkeras import data, fileio, runs
from zfkeras.analysis import invariance
from zfkeras.errors import Error
from zfkeras.models import ZFNet

CLASSES = ("stripes", "dots", "plain")


def run_tool(*args, timeout=300):
    return conftest.run_tool("invariance", *args, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny run folder (model, mean, run.json) and three image files."""
    root = tmp_path_factory.mktemp("invariance")
    model = ZFNet(len(CLASSES), (48, 48, 1), width=0.25, fc_units=16, init="he", seed=5)
    preprocessing = data.Preprocessing(resize_size=56, crop_size=48, channels=1)
    mean = np.full((56, 56, 1), 90.0, np.float32)
    info = data.DatasetInfo("tiny", len(CLASSES), CLASSES, 1)
    os.makedirs(root / "run")
    runs.write_run_files(str(root / "run"), preprocessing, mean, info)
    fileio.save_model(model, str(root / "run" / "model.keras"))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:60, 0:80]
    Image.fromarray(((x // 4) % 2 * 200 + 20).astype(np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)).save(root / "b.png")
    Image.fromarray(np.where(np.hypot(x - 40, y - 30) < 15, 250, 10).astype(np.uint8)).save(
        root / "c.png"
    )
    return root


# ---------------------------------------------------------------------------
# Transforms against NumPy references.


def _apply(view, kind, value, fill="black", mean=None):
    matrix = invariance.transform_matrix(kind, value, view.shape[:2])
    return invariance.transform_views(view[None], matrix[None], fill, mean)[0]


def test_identity_transforms_are_exact():
    view = np.random.default_rng(1).integers(0, 256, (9, 11, 2)).astype(np.float32)
    for kind, value in (("translation", 0.0), ("scale", 1.0), ("rotation", 0.0)):
        np.testing.assert_array_equal(_apply(view, kind, value), view)


def test_translation_moves_the_content_down():
    view = np.random.default_rng(2).integers(0, 256, (10, 8, 1)).astype(np.float32)
    down = _apply(view, "translation", 3)
    np.testing.assert_array_equal(down[3:], view[:-3])
    np.testing.assert_array_equal(down[:3], 0)
    up = _apply(view, "translation", -2)
    np.testing.assert_array_equal(up[:-2], view[2:])


def test_rotation_is_counterclockwise_about_the_centre():
    view = np.random.default_rng(3).integers(0, 256, (9, 9, 1)).astype(np.float32)
    np.testing.assert_allclose(_apply(view, "rotation", 90), np.rot90(view, 1), atol=1e-3)
    np.testing.assert_allclose(_apply(view, "rotation", 180), view[::-1, ::-1], atol=1e-3)
    np.testing.assert_allclose(_apply(view, "rotation", 360), view, atol=1e-3)


def test_scale_zooms_about_the_centre():
    view = np.zeros((9, 9, 1), np.float32)
    view[3:6, 3:6] = 200.0  # a 3x3 square at the centre
    zoomed = _apply(view, "scale", 3.0)
    # Pixel centres 3 apart map 1 apart: the square now covers the middle 7-9 pixels.
    assert zoomed[4, 4, 0] == 200.0
    assert zoomed[1, 4, 0] == 200.0 and zoomed[7, 4, 0] == 200.0
    assert zoomed[4, 1, 0] == 200.0 and zoomed[4, 7, 0] == 200.0
    shrunk = _apply(view, "scale", 0.5)
    assert shrunk[4, 4, 0] == 200.0 and shrunk[2, 4, 0] == 0.0


def test_mean_fill_puts_the_mean_where_the_image_left():
    view = np.full((8, 8, 1), 200.0, np.float32)
    mean = np.arange(64, dtype=np.float32).reshape(8, 8, 1)
    moved = _apply(view, "translation", 3, fill="mean", mean=mean)
    np.testing.assert_array_equal(moved[:3], mean[:3])
    np.testing.assert_array_equal(moved[3:], 200.0)
    # Half a pixel: the edge row blends the image and the mean equally.
    half = _apply(view, "translation", 0.5, fill="mean", mean=mean)
    np.testing.assert_allclose(half[0], 0.5 * 200.0 + 0.5 * mean[0], rtol=1e-6)
    nearest = _apply(view * np.arange(8)[:, None, None], "translation", 2, fill="nearest")
    np.testing.assert_array_equal(nearest[:2], 0.0)  # the top row is 0 x 200


def test_unknown_transform_or_fill_is_an_error():
    with pytest.raises(Error, match="unknown transform"):
        invariance.transform_matrix("shear", 1.0, (4, 4))
    with pytest.raises(Error, match="unknown fill"):
        invariance.transform_views(np.zeros((1, 4, 4, 1)), np.zeros((1, 8)), "blue")


# ---------------------------------------------------------------------------
# The experiment.


@pytest.fixture(scope="module")
def result(workdir):
    run = runs.load_run(str(workdir / "run"))
    paths = [str(workdir / n) for n in ("a.png", "b.png", "c.png")]
    examples = invariance.load_examples(run, paths, labels=("stripes", "1", ""))
    sweeps = invariance.Sweeps(
        translations=(-0.2, 0.0, 0.1), scales=(1.0, 1.5), rotations=(0.0, 45.0, 360.0)
    )
    return run, invariance.measure_invariance(run, examples, sweeps, batch_size=4)


def test_load_examples_reads_labels_by_name_or_id(workdir):
    run = runs.load_run(str(workdir / "run"))
    examples = invariance.load_examples(run, [str(workdir / "a.png")], labels=("plain",))
    assert examples.views.shape == (1, 56, 56, 1) and examples.views.dtype == np.uint8
    assert examples.labels.tolist() == [2]
    with pytest.raises(Error, match="unknown class 'cat'"):
        invariance.load_examples(run, [str(workdir / "a.png")], labels=("cat",))


def test_distance_is_zero_at_the_identity(result):
    _, res = result
    # (identity column, transformed columns) of each sweep; rotation 360 is checked below.
    columns = {"translation": (1, [0, 2]), "scale": (0, [1]), "rotation": (0, [1])}
    for kind, (identity, moved) in columns.items():
        for layer in ("layer1", "layer7"):
            distances = res.distances[kind][layer]
            # Zero up to float rounding, against distances that are clearly not.
            assert distances[:, moved].min() > 0
            assert distances[:, identity].max() <= 1e-5 * distances[:, moved].max()
    # A full turn brings the image back (up to resampling round-off).
    turn = res.distances["rotation"]["layer1"]
    assert turn[:, 2].max() < 1e-3 * turn[:, 1].min()


def test_curves_have_one_value_per_image_and_parameter(result):
    run, res = result
    assert res.layers == {"layer1": "relu1", "layer7": "relu7"} and res.note == ""
    assert res.parameters["translation"] == pytest.approx([-9.6, 0.0, 4.8])  # of the 48 crop
    for kind in invariance.TRANSFORMS:
        count = len(res.parameters[kind])
        assert res.distances[kind]["layer1"].shape == (3, count)
        probabilities = res.probabilities[kind]
        assert probabilities.shape == (3, count)
        assert ((probabilities >= 0) & (probabilities <= 1)).all()
        assert res.examples[kind].shape == (3, count, 48, 48, 1)
    # The unlabelled image's true class is the prediction on the original.
    assert res.label_source == ("given", "given", "predicted")
    assert res.labels[:2].tolist() == [0, 1]
    probs = run.model.predict(
        run.model_input(data.center_crop(res.examples["scale"][:, 0], 48)), verbose=0
    )
    assert res.labels[2] == probs[2].argmax()
    np.testing.assert_allclose(res.probabilities["scale"][:, 0], probs[[0, 1, 2], res.labels], 1e-4)


def test_a_model_without_fc7_uses_its_last_fc_layer():
    model = ZFNet(3, (48, 48, 1), width=0.25, fc_units=8, remove=("fc7",))
    layers, note = invariance.invariance_layers(model)
    assert layers == {"layer1": "relu1", "layer7": "relu6"}
    assert "no fc7" in note


# ---------------------------------------------------------------------------
# The tool.


def test_tool_writes_the_panel_json_and_csv(workdir):
    out = workdir / "out"
    result = run_tool(
        f"--checkpoint={workdir / 'run'}",
        f"--images={workdir / 'a.png'},{workdir / 'c.png'}",
        "--labels=stripes,plain",
        "--translations=-0.1:0.1:3",
        "--scales=1,1.4",
        "--rotations=0:90:3",
        "--fill=reflect",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr
    assert "rotation:" in result.stdout and "written:" in result.stdout
    assert "invariance: " in result.stderr  # progress
    assert sorted(os.listdir(out)) == ["invariance.csv", "invariance.json", "invariance.png"]
    record = json.loads((out / "invariance.json").read_text())
    assert record["fill"] == "reflect" and record["label_names"] == ["stripes", "plain"]
    assert record["sweeps"]["rotation"]["parameters"] == [0.0, 45.0, 90.0]
    assert max(record["sweeps"]["rotation"]["layer1_distance"][0][:1]) < 1e-3
    lines = (out / "invariance.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * (3 + 2 + 3)
    with Image.open(out / "invariance.png") as image:
        assert image.size[0] > 800

    bad = run_tool(f"--checkpoint={workdir / 'run'}", f"--images={workdir / 'nope.png'}")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"invariance: error: {workdir / 'nope.png'}: no such file"
    ]
    flags = run_tool(f"--checkpoint={workdir / 'run'}", "--scales=0:1:3")
    assert flags.returncode == 2 and "--scales must be > 0" in flags.stderr
