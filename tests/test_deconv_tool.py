"""tools/deconv.py end to end, run as a user runs it, on a tiny saved run."""

import json
import os
import re
import subprocess
import sys

import conftest
import keras
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from zfkeras import data, deconv, fileio, images, runs
from zfkeras.models import ZFNet

CLASSES = tuple(f"class{i}" for i in range(5))


def run_tool(*args, timeout=300):
    return conftest.run_tool("deconv", *args, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run folder (model.keras, mean.npy, run.json) and a few image files."""
    root = tmp_path_factory.mktemp("deconv_tool")
    run_dir = root / "run"
    model = ZFNet(len(CLASSES), (64, 64, 1), width=0.25, fc_units=16, init="he", seed=3)
    preprocessing = data.Preprocessing(resize_size=72, crop_size=64, channels=1)
    mean = np.full((72, 72, 1), 100.0, np.float32)
    info = data.DatasetInfo("tiny", len(CLASSES), CLASSES, 1)
    os.makedirs(run_dir)
    runs.write_run_files(str(run_dir), preprocessing, mean, info)
    fileio.save_model(model, str(run_dir / "model.keras"))
    # A model lacking conv3, and one the deconvnet cannot take.
    short = ZFNet(5, (64, 64, 1), width=0.25, fc_units=16, remove=("conv3",), seed=4)
    short.save(str(root / "no_conv3.keras"))
    odd = keras.Sequential(
        [keras.Input((32, 32, 1)), keras.layers.Conv2D(2, 3), keras.layers.AveragePooling2D(2)]
    )
    odd.save(str(root / "avgpool.keras"))
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:90, 0:120]
    photo = np.stack([(x * 2) % 256, (y * 3) % 256, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(root / "photo.png")
    os.makedirs(root / "other")
    Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8)).save(root / "other/photo.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(root / "rgba.png")
    data_bytes = open(root / "other/photo.jpg", "rb").read()
    (root / "cut.jpg").write_bytes(data_bytes[: len(data_bytes) // 2])
    return root


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_projects_several_images_in_one_run(workdir):
    out = workdir / "out"
    photo, gray = str(workdir / "photo.png"), str(workdir / "other/photo.jpg")
    result = run_tool(
        f"--image={photo},{gray}",
        f"--image={workdir / 'rgba.png'}",
        f"--checkpoint={workdir / 'run'}",
        "--layers=conv1,conv5,fc6",
        "--top=3",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr
    # Same file names from different folders do not collide; nothing else is left.
    assert _files(out) == [
        "photo_2_deconv.json",
        "photo_2_deconv.png",
        "photo_deconv.json",
        "photo_deconv.png",
        "rgba_deconv.json",
        "rgba_deconv.png",
    ]
    assert len(result.stdout.strip().splitlines()) == 3
    # The numbers are the library's on the run's own preprocessing.
    run = runs.load_run(str(workdir / "run"))
    dn = deconv.Deconvnet(run.model)
    for path, stem in ((photo, "photo"), (gray, "photo_2")):
        record = json.loads((out / f"{stem}_deconv.json").read_text())
        assert record["image"] == path and record["figure"] == f"{stem}_deconv.png"
        view = data.eval_view(images.read_image(path), run.preprocessing)
        inputs = data.subtract_mean(view[None], run.preprocessing, run.mean)
        activations = dn.activations(inputs, ["conv1", "conv5", "fc6"])
        probabilities = run.model.predict(inputs, verbose=0)[0]
        assert record["prediction"]["name"] == CLASSES[int(np.argmax(probabilities))]
        for layer in ("conv1", "conv5", "fc6"):
            entries = record["layers"][layer]
            expected = deconv.strongest_channels(activations[layer], 3)[0]
            assert [e["channel"] for e in entries] == list(expected)
            for entry in entries:
                if layer == "fc6":
                    value = activations[layer][0, entry["channel"]]
                    assert entry["box"] == [0, 0, 64, 64]
                else:
                    y, x = entry["position"]
                    value = activations[layer][0, y, x, entry["channel"]]
                    assert value == activations[layer][0, ..., entry["channel"]].max()
                    assert tuple(entry["box"]) == dn.receptive_field(layer, y, x)
                assert entry["activation"] == pytest.approx(float(value), rel=1e-4)
        with Image.open(out / f"{stem}_deconv.png") as figure:
            assert figure.format == "PNG" and figure.size[0] > 300


def test_explicit_channels_whole_maps_and_a_bare_model_file(workdir):
    out = workdir / "out_channels"
    result = run_tool(
        f"--image={workdir / 'photo.png'}",
        f"--checkpoint={workdir / 'run' / 'model.keras'}",
        "--layers=conv2,conv4",
        "--channels=2,5",
        "--mode=map",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "photo_deconv.json").read_text())
    assert record["mode"] == "map"
    assert list(record["layers"]) == ["conv2", "conv4"]
    for entries in record["layers"].values():
        assert [e["channel"] for e in entries] == [2, 5]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image={root}/photo.png,{root}/cut.jpg"], r"cut.jpg: truncated JPEG image"),
        (
            ["--image={root}/photo.png", "--layers=conv1,conv9"],
            r"unknown layer 'conv9'; valid: conv1, conv2, conv3, conv4, conv5, fc6, fc7, "
            r"predictions",
        ),
        (
            ["--image={root}/photo.png", "--channels=3,24"],
            r"channel 24 out of range for conv1 \(24 maps: 0-23\)",
        ),
        (
            ["--image={root}/photo.png", "--checkpoint={root}/no_conv3.keras", "--layers=conv3"],
            r"no_conv3.keras: unknown layer 'conv3'; valid: conv1, conv2, conv4, conv5,",
        ),
        (
            ["--image={root}/photo.png", "--checkpoint={root}/avgpool.keras"],
            r"avgpool.keras: layer .* \(AveragePooling2D\) is not supported",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(workdir, args, message):
    out = workdir / "out_bad"
    args = [a.format(root=workdir) for a in args]
    if not any(a.startswith("--checkpoint") for a in args):
        args.append(f"--checkpoint={workdir / 'run'}")
    result = run_tool(*args, f"--output_dir={out}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("deconv: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not os.path.exists(out)
    assert result.stdout == ""


def test_benchmark_smoke_run():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "deconv_bench.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("batch")]
    assert len(lines) == 2 and all("projections/s" in line for line in lines)
    assert all(re.search(r"\d+\.\d+x a forward pass", line) for line in lines)
