"""Architecture comparison (Fig. 6): frequency bands, dead filters, the tool, Table 3 configs."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from zfkeras import data, fileio, runs
from zfkeras.analysis import architecture
from zfkeras.errors import Error
from zfkeras.models import AlexNet, ZFNet

CLASSES = ("a", "b")


def run_script(script, *args, timeout=300):
    return subprocess.run(
        [sys.executable, *script, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


# ---------------------------------------------------------------------------
# Frequency bands.


def cosine_bank(size, frequency, angles=(0, 30, 45, 60, 90, 135), channels=1):
    """Cosine filters of `frequency` cycles/pixel at several orientations and phases."""
    y, x = np.mgrid[0:size, 0:size] - (size - 1) / 2
    filters = []
    for index, angle in enumerate(angles):
        theta = np.radians(angle)
        phase = 0.7 * index
        wave = np.cos(2 * np.pi * frequency * (x * np.cos(theta) + y * np.sin(theta)) + phase)
        filters.append(np.repeat(wave[:, :, None], channels, axis=2))
    return np.stack(filters, axis=-1)


@pytest.mark.parametrize("size", [7, 11])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("frequency,band", [(0.0, 0), (0.04, 0), (0.18, 1), (0.36, 2)])
def test_filters_of_known_frequency_land_in_their_band(size, channels, frequency, band):
    bank = cosine_bank(size, frequency, channels=channels)
    fractions = architecture.band_energy(bank)
    assert fractions.shape == (bank.shape[-1], 3)
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0, rtol=1e-9)
    assert (fractions.argmax(axis=1) == band).all()
    # Most of the energy: a 7x7 support leaks some into the neighbouring bands.
    assert fractions[:, band].min() > 0.5


def test_band_fractions_ignore_scale_and_flag_empty_filters():
    bank = cosine_bank(7, 0.18)
    np.testing.assert_allclose(
        architecture.band_energy(bank * 37.0), architecture.band_energy(bank), rtol=1e-9
    )
    zero = np.zeros((5, 5, 1, 2))
    assert np.isnan(architecture.band_energy(zero)).all()
    # A checkerboard is the highest frequency a grid can hold (0.5, 0.5).
    checker = (np.indices((7, 7)).sum(axis=0) % 2 * 2.0 - 1)[:, :, None, None]
    assert architecture.band_energy(checker)[0, 2] > 0.95
    with pytest.raises(Error, match="band edges"):
        architecture.band_energy(bank, edges=(0.3, 0.1))


def test_radial_spectrum_is_a_distribution_peaking_at_the_frequency():
    centres, power = architecture.radial_spectrum(cosine_bank(11, 0.3), bins=28)
    assert power.sum() == pytest.approx(1.0)
    assert abs(centres[power.argmax()] - 0.3) <= 0.03


def test_filter_rms():
    kernel = np.zeros((3, 3, 2, 3))
    kernel[..., 0] = 2.0
    kernel[0, 0, 0, 1] = 3.0  # one weight of 18
    np.testing.assert_allclose(architecture.filter_rms(kernel), [2.0, 3.0 / np.sqrt(18), 0.0])


# ---------------------------------------------------------------------------
# Dead filters.


def test_dead_and_near_dead_from_activations():
    rng = np.random.default_rng(0)
    maps = np.maximum(rng.normal(size=(4, 5, 5, 6)), 0)
    maps[..., 0] = 0.0  # never fires: dead
    maps[..., 1] *= 0.05  # fires, but weakly: near-dead
    maps[..., 2] = 0.0
    maps[0, 0, 0, 2] = 1e3  # fires once, strongly: alive
    result = architecture.dead_filters(maps, near_dead_ratio=0.1)
    assert result["dead"].tolist() == [True, False, False, False, False, False]
    assert result["near_dead"].tolist() == [False, True, False, False, False, False]
    assert result["fires"][2] == pytest.approx(1 / 100)


def _tiny_run(model, path=""):
    crop = model.input_shape[1]
    preprocessing = data.Preprocessing(resize_size=crop + 8, crop_size=crop, channels=1)
    mean = np.full((crop + 8, crop + 8, 1), 100.0, np.float32)
    return runs.Run(path, model, preprocessing, mean, CLASSES, {"architecture": model.name})


def test_dead_filters_of_constructed_kernels():
    model = ZFNet(2, (48, 48, 1), width=0.25, fc_units=8, init="he", seed=0)
    conv1 = model.get_layer("conv1")
    kernel, bias = (np.array(w) for w in conv1.get_weights())
    bias[:] = 0.0
    bias[0] = -1e6  # no input can reach it: dead
    kernel[..., 1] *= 1e-4  # tiny weights, zero bias: near-dead
    conv1.set_weights([kernel, bias])
    views = np.random.default_rng(1).integers(0, 256, (16, 48, 48, 1)).astype(np.uint8)
    record, per_filter, _, _ = architecture.summarize_first_layer(_tiny_run(model), views)
    assert record["dead"]["count"] == 1 and per_filter["dead"][0]
    assert per_filter["near_dead"][1] and not per_filter["near_dead"][0]
    assert record["near_dead"]["count"] <= 2  # filter 1, and at most one unlucky random one
    assert record["conv1"]["kernel_size"] == [7, 7] and record["conv1"]["strides"] == [2, 2]
    assert record["conv1"]["output_nyquist_cycles_per_pixel"] == 0.25
    assert record["conv1"]["filter_rms_radius"] == 0.1
    assert record["sample_images"] == 16


# ---------------------------------------------------------------------------
# The tool.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two tiny runs (ZFNet, AlexNet) and a folder dataset."""
    root = tmp_path_factory.mktemp("architecture")
    preprocessing = data.Preprocessing(resize_size=72, crop_size=64, channels=1)
    mean = np.full((72, 72, 1), 100.0, np.float32)
    info = data.DatasetInfo("folder:x", len(CLASSES), CLASSES, 1)
    built = {
        "zfnet": ZFNet(2, (64, 64, 1), width=0.25, fc_units=8, init="he", seed=1),
        "alexnet": AlexNet(2, (64, 64, 1), width=0.25, fc_units=8, init="he", seed=2),
    }
    for name, model in built.items():
        os.makedirs(root / name)
        runs.write_run_files(str(root / name), preprocessing, mean, info, {"architecture": name})
        fileio.save_model(model, str(root / name / "model.keras"))
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("test", 6)):
        for label in CLASSES:
            os.makedirs(root / "images" / split / label)
            for i in range(count):
                image = rng.integers(0, 256, (80, 80), dtype=np.uint8)
                Image.fromarray(image).save(root / "images" / split / label / f"{i}.png")
    return root


@pytest.mark.parametrize("shape", [(7, 7, 1), (11, 11, 3)])
def test_white_noise_control_spreads_energy_like_the_frequency_grid(shape):
    # White noise has a flat expected spectrum: each band's expected share is
    # the share of the DFT grid's points that fall in it.
    size = 64
    fy = np.fft.fftfreq(size)
    radius = np.hypot(fy[:, None], fy[None, :])
    grid = [np.mean(radius < 0.125), np.mean((radius >= 0.125) & (radius < 0.25))]
    grid.append(1 - sum(grid))
    got = architecture.white_noise_bands(shape)
    np.testing.assert_allclose(got, grid, atol=0.02)
    assert got[2] > 0.7
    # Seeded: the control is the same number every run.
    np.testing.assert_array_equal(got, architecture.white_noise_bands(shape))


def test_tool_compares_two_models(workdir):
    out = workdir / "out"
    result = run_script(
        [os.path.join(REPO, "tools", "compare_filters.py")],
        f"--checkpoint={workdir / 'alexnet'},{workdir / 'zfnet'}",
        "--labels=AlexNet,ZFNet",
        f"--dataset=folder:{workdir / 'images'}",
        "--count=2",
        "--top=2",
        "--sample_size=8",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr
    assert "AlexNet: conv1 11x11/4" in result.stdout and "ZFNet: conv1 7x7/2" in result.stdout
    assert result.stdout.count("(white-noise filters of this size: ") == 2
    assert "compare_filters: " in result.stderr  # progress
    expected = ["compare_filters.csv", "compare_filters.json", "filters.png", "layer2.png"]
    assert sorted(os.listdir(out)) == expected
    record = json.loads((out / "compare_filters.json").read_text())
    alexnet, zfnet = record["models"]
    assert (
        alexnet["label"] == "AlexNet"
        and alexnet["conv1"]["output_nyquist_cycles_per_pixel"] == 0.125
    )
    assert alexnet["sample_images"] == 8 and len(alexnet["images"]) == 2
    for model in record["models"]:
        assert sum(model["bands"]["mean_fraction"].values()) == pytest.approx(1.0)
        assert sum(model["bands"]["white_noise_mean_fraction"].values()) == pytest.approx(1.0)
        assert 0 <= model["dead"]["fraction"] <= 1
    rows = (out / "compare_filters.csv").read_text().splitlines()
    assert len(rows) == 1 + alexnet["conv1"]["filters"] + zfnet["conv1"]["filters"]

    one = run_script(
        [os.path.join(REPO, "tools", "compare_filters.py")],
        f"--checkpoint={workdir / 'zfnet'}",
        f"--output_dir={out}",
    )
    assert one.returncode == 2
    assert one.stderr.strip().endswith("--checkpoint needs two or more models to compare.")
    assert len(one.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------
# Table 3: the ablation training configs.

_CHECK_CONFIGS = """
import sys
from absl import flags
from zfkeras import quiet
quiet.import_tensorflow()
from zfkeras_tools import train
from zfkeras.train import build_model
for path in sys.argv[1:]:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train", "--flagfile=" + path])
    config = train.config_from_flags()
    model = build_model(config, 10, 1)
    print(path, config.architecture, ",".join(sorted(config.remove)), config.fc_units,
          ",".join(str(w) for w in config.conv_widths), config.filter_rms,
          ",".join(l.name for l in model.layers if l.name[:2] in ("co", "fc")), sep="|")
"""


def _flag_lines(path):
    with open(path) as f:
        return {line.strip() for line in f if line.startswith("--")}


def test_table3_configs_differ_from_the_comparison_zfnet_only_where_ablated():
    folder = os.path.join(REPO, "tools", "configs")
    reference = _flag_lines(os.path.join(folder, "fashion_mnist_zfnet.cfg"))
    paths = sorted(
        glob.glob(os.path.join(folder, "fashion_mnist_ablation_*.cfg"))
        + glob.glob(os.path.join(folder, "fashion_mnist_alexnet*.cfg"))
    )
    assert len(paths) == 15
    allowed = ("--workdir=", "--remove=", "--fc_units=", "--conv_widths=")
    alexnet = ("--architecture=", "--filter_rms=")
    for path in paths:
        lines = _flag_lines(path)
        name = os.path.basename(path)[: -len(".cfg")]
        assert f"--workdir=runs/{name}" in lines
        ok = allowed + (alexnet if "alexnet" in name else ())
        changed = lines ^ reference
        assert all(line.startswith(ok) for line in changed), (name, changed)

    result = run_script(["-c", _CHECK_CONFIGS], *paths)
    assert result.returncode == 0, result.stderr
    built = {}
    for line in result.stdout.strip().splitlines():
        path, arch, remove, fc, widths, rms, layers = line.split("|")
        built[os.path.basename(path)[: -len(".cfg")]] = (arch, remove, fc, widths, rms, layers)
    zf = built["fashion_mnist_ablation_no_conv3_conv4"]
    assert zf[:2] == ("zfnet", "conv3,conv4") and "conv3" not in zf[5] and "conv5" in zf[5]
    assert built["fashion_mnist_ablation_no_fc6_fc7"][5] == "conv1,conv2,conv3,conv4,conv5"
    assert built["fashion_mnist_ablation_fc2048"][2] == "512"
    assert built["fashion_mnist_ablation_fc8192"][2] == "2048"
    assert built["fashion_mnist_ablation_conv512_1024_512"][3] == "512,1024,512"
    assert built["fashion_mnist_ablation_conv512_1024_512_fc8192"][2:4] == ("2048", "512,1024,512")
    assert (
        built["fashion_mnist_alexnet"][0] == "alexnet"
        and built["fashion_mnist_alexnet"][4] == "0.0"
    )
    assert built["fashion_mnist_alexnet2"][0] == "alexnet2"
    assert built["fashion_mnist_alexnet_ablation_no_conv3_conv4_fc6_fc7"][5] == "conv1,conv2,conv5"
