"""Correspondence (Table 1): the sign-change measure, boxes, and tools/correspondence.py."""

import json
import os

import conftest
import numpy as np
import pytest
from PIL import Image

from zfkeras import data, fileio, runs
from zfkeras.analysis import correspondence
from zfkeras.errors import Error
from zfkeras.models import ZFNet

CLASSES = ("x", "y", "z")


def run_tool(*args, timeout=300):
    return conftest.run_tool("correspondence", *args, timeout=timeout)


# ---------------------------------------------------------------------------
# The measure, checked by hand.


def test_hamming_of_signs_by_hand():
    eps = np.array([[1.0, -2.0, 0.0, 3.0], [1.0, 2.0, 0.0, -1.0], [-1.0, 2.0, 0.0, -1.0]])
    # signs: [+ - 0 +], [+ + 0 -], [- + 0 -]: H(0,1) = 2, H(0,2) = 3, H(1,2) = 1 of D = 4.
    expected = np.array([[0, 2, 3], [2, 0, 1], [3, 1, 0]]) / 4
    np.testing.assert_array_equal(correspondence.sign_changes(eps), expected)
    result = correspondence.delta(eps)
    assert result["mean"] == pytest.approx(0.5)
    assert result["std"] == pytest.approx(np.std([0.5, 0.75, 0.25]))
    assert result["hamming_sum"] == 2 * (2 + 3 + 1)  # the paper's sum over i != j
    # Only signs count, and zero is its own sign.
    scaled = eps * np.array([[5.0], [0.1], [2.0]])
    assert correspondence.delta(scaled)["mean"] == result["mean"]
    assert correspondence.delta(np.array([[0.0, 1.0], [1e-9, 1.0]]))["mean"] == 0.5


def test_identical_changes_give_zero_and_one_image_is_an_error():
    eps = np.tile(np.random.default_rng(0).normal(size=(1, 50)), (4, 1))
    assert correspondence.delta(eps)["mean"] == 0.0
    with pytest.raises(Error, match="at least two images"):
        correspondence.delta(eps[:1])


# ---------------------------------------------------------------------------
# Boxes.


@pytest.mark.parametrize("border", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(100, 80), (60, 130), (56, 56)])
def test_boxes_follow_the_models_resize_and_crops(shape, border):
    preprocessing = data.Preprocessing(resize_size=56, crop_size=48, channels=1, border=border)
    height, width = shape
    box = (int(width * 0.4), int(height * 0.3), int(width * 0.7), int(height * 0.55))
    image = np.zeros((height, width, 1), np.uint8)
    image[box[1] : box[3], box[0] : box[2]] = 255
    crop = data.eval_view(image, preprocessing)[..., 0]
    ys, xs = np.nonzero(crop > 127)
    y0, x0, y1, x1 = correspondence.box_in_crop(box, shape, preprocessing)
    # The mapped box holds the (blurred) square and is at most a pixel wider per side.
    assert y0 <= ys.min() and ys.max() < y1 and x0 <= xs.min() and xs.max() < x1
    assert ys.min() - y0 <= 1 and y1 - 1 - ys.max() <= 1
    assert xs.min() - x0 <= 1 and x1 - 1 - xs.max() <= 1


def test_occlusion_and_random_boxes():
    inputs = np.ones((2, 6, 6, 1), np.float32)
    out = correspondence.occlude(inputs, [(1, 2, 3, 5), (0, 0, 6, 1)])
    assert out[0, 1:3, 2:5].sum() == 0 and out[0].sum() == 36 - 6
    assert out[1, :, 0].sum() == 0 and out[1].sum() == 30
    assert inputs.sum() == 72  # not modified in place
    rng = np.random.default_rng(0)
    boxes = np.array([(0, 0, 3, 2), (10, 10, 20, 30)])
    for _ in range(50):
        moved = correspondence.random_boxes(boxes, 32, rng)
        np.testing.assert_array_equal(moved[:, 2] - moved[:, 0], [3, 10])
        np.testing.assert_array_equal(moved[:, 3] - moved[:, 1], [2, 20])
        assert moved.min() >= 0 and moved[:, 2:].max() <= 32


def test_parts_files_are_checked(tmp_path):
    good = {"a.png": {"eye": [1, 2, 5, 6]}, "sub/b.png": {"eye": [0, 0, 3.5, 4]}}
    (tmp_path / "parts.json").write_text(json.dumps(good))
    entries = correspondence.read_parts(str(tmp_path / "parts.json"))
    assert entries == [
        (str(tmp_path / "a.png"), {"eye": (1.0, 2.0, 5.0, 6.0)}),
        (str(tmp_path / "sub/b.png"), {"eye": (0.0, 0.0, 3.5, 4.0)}),
    ]
    cases = {
        "same parts": {"a.png": {"eye": [0, 0, 2, 2]}, "b.png": {"nose": [0, 0, 2, 2]}},
        "x1 > x0": {"a.png": {"eye": [3, 0, 2, 2]}},
        "object of parts": {"a.png": [0, 0, 2, 2]},
        "a parts file is a JSON object": [1, 2],
    }
    for message, content in cases.items():
        (tmp_path / "bad.json").write_text(json.dumps(content))
        with pytest.raises(Error, match=message):
            correspondence.read_parts(str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(Error, match="unreadable parts file"):
        correspondence.read_parts(str(tmp_path / "broken.json"))


# ---------------------------------------------------------------------------
# The experiment and the tool.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny run, five 'faces' with two parts each and a parts file."""
    root = tmp_path_factory.mktemp("correspondence")
    model = ZFNet(len(CLASSES), (48, 48, 1), width=0.25, fc_units=16, init="he", seed=7)
    preprocessing = data.Preprocessing(resize_size=56, crop_size=48, channels=1)
    mean = np.full((56, 56, 1), 80.0, np.float32)
    info = data.DatasetInfo("tiny", len(CLASSES), CLASSES, 1)
    os.makedirs(root / "run")
    runs.write_run_files(str(root / "run"), preprocessing, mean, info)
    fileio.save_model(model, str(root / "run" / "model.keras"))
    rng = np.random.default_rng(3)
    parts = {}
    for i in range(5):
        face = rng.integers(0, 60, (64, 64), dtype=np.uint8)
        eye = (18 + i, 20, 26 + i, 28)  # x0, y0, x1, y1
        nose = (28, 34 + i % 2, 36, 44 + i % 2)
        for x0, y0, x1, y1 in (eye, nose):
            face[y0:y1, x0:x1] = 230
        Image.fromarray(face).save(root / f"face{i}.png")
        parts[f"face{i}.png"] = {"eye": list(eye), "nose": list(nose)}
    (root / "parts.json").write_text(json.dumps(parts))
    return root


def test_identical_images_give_zero(workdir):
    run = runs.load_run(str(workdir / "run"))
    crop = data.eval_view(
        np.asarray(Image.open(workdir / "face0.png"))[..., None], run.preprocessing
    )
    crops = np.repeat(crop[None], 4, axis=0)
    boxes = {"eye": [(10, 12, 20, 22)] * 4, "corner": [(0, 0, 8, 8)] * 4}
    result = correspondence.measure_correspondence(run, crops, boxes, repeats=3, seed=1)
    assert result["layers"] == {"layer5": "pool5", "layer7": "relu7"}
    for entry in result["parts"]:
        for layer in ("layer5", "layer7"):
            assert entry[layer] == {"mean": 0.0, "std": 0.0, "hamming_sum": 0}
    # Random occluders land in different places in each image: not zero.
    assert result["parts"][0]["random"]["layer5"]["mean"] > 0
    assert len(result["parts"][0]["random"]["boxes"]) == 3


def test_tool_writes_table_figure_and_numbers(workdir):
    out = workdir / "out"
    result = run_tool(
        f"--checkpoint={workdir / 'run'}",
        f"--parts_file={workdir / 'parts.json'}",
        "--repeats=3",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].split()[:3] == ["part", "layer", "5"]
    assert "correspondence: eye:" in result.stderr  # progress
    expected = ["correspondence.csv", "correspondence.json", "correspondence.png"]
    assert sorted(os.listdir(out)) == expected
    record = json.loads((out / "correspondence.json").read_text())
    assert [e["part"] for e in record["parts"]] == ["eye", "nose"]
    for entry in record["parts"]:
        for layer in ("layer5", "layer7"):
            assert 0 <= entry[layer]["mean"] <= 1
            assert 0 <= entry["random"][layer]["mean"] <= 1
        assert len(entry["boxes"]) == 5
    assert len((out / "correspondence.csv").read_text().splitlines()) == 1 + 2 * 2 * 2

    (workdir / "outside.json").write_text(
        json.dumps({"face0.png": {"eye": [0, 0, 2, 2]}, "face1.png": {"eye": [1, 1, 3, 3]}})
    )
    bad = run_tool(
        f"--checkpoint={workdir / 'run'}",
        f"--parts_file={workdir / 'outside.json'}",
        f"--output_dir={out}",
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        f"correspondence: error: {workdir / 'face0.png'}: part 'eye' [0.0, 0.0, 2.0, 2.0] "
        "lies outside the model's centre crop"
    ]
