"""Tests of zfkeras.analysis.topk (Fig. 2 top-9 mining) and tools/mine_top9.py.

The reference is a brute-force NumPy pass: every image's feature maps at
once, each image's per-map maximum and its first row-major position, and
per map a sort by (value descending, image index ascending).
"""

import json
import os
import subprocess
import sys
import textwrap

import conftest
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO
from PIL import Image

from zfkeras import data, deconv, fileio, runs
from zfkeras.analysis import topk
from zfkeras.errors import Error
from zfkeras.models import ZFNet

SIZE, CROP = 52, 48
PRE = data.Preprocessing(resize_size=SIZE, crop_size=CROP, channels=1, input_scale=1 / 64)
LAYERS = ("conv1", "conv2", "conv5", "fc6")
COUNT = 41
DUPLICATES = {17: 5, 30: 5, 33: 12}  # image i is a copy of image j: exact ties


def _images(count=COUNT, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, SIZE, SIZE, 1), dtype=np.uint8)
    # Smooth blobs so that maps have distinct maxima, not just noise.
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    for image in images:
        cy, cx, r = rng.integers(8, SIZE - 8, 2).tolist() + [int(rng.integers(3, 10))]
        image[((y - cy) ** 2 + (x - cx) ** 2) < r * r] = rng.integers(0, 256)
    for copy, original in DUPLICATES.items():
        if copy < count:
            images[copy] = images[original]
    return images


@pytest.fixture(scope="module")
def setup():
    images = _images()
    labels = np.arange(COUNT) % 3
    raw = tf.data.Dataset.from_tensor_slices((images, labels))
    model = ZFNet(3, (CROP, CROP, 1), width=0.25, fc_units=16, init="he", seed=7)
    mean = np.full((SIZE, SIZE, 1), 110.0, np.float32)
    return raw, images, labels, model, mean, deconv.Deconvnet(model)


def _inputs(raw, mean, batch_size):
    batches = topk.model_input_batches(raw, PRE, mean, batch_size)
    parts = list(batches.as_numpy_iterator())
    return batches, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def brute_force_top_k(maps, k):
    """values (C, k), image indices (C, k), positions (C, k, 2) from all maps."""
    count = len(maps)
    if maps.ndim == 2:
        maxima, ys, xs = maps, np.zeros(maps.shape, int), np.zeros(maps.shape, int)
    else:
        _, height, width, channels = maps.shape
        flat = maps.reshape(count, height * width, channels)
        maxima = flat.max(axis=1)
        ys, xs = np.divmod(flat.argmax(axis=1), width)  # NumPy: the first maximum.
    channels = maxima.shape[1]
    values = np.zeros((channels, k), np.float32)
    indices = np.zeros((channels, k), np.int64)
    positions = np.zeros((channels, k, 2), np.int64)
    for c in range(channels):
        order = np.lexsort((np.arange(count), -maxima[:, c]))[:k]
        values[c], indices[c] = maxima[order, c], order
        positions[c] = np.stack([ys[order, c], xs[order, c]], axis=1)
    return values, indices, positions


def test_feature_model_matches_the_deconvnet(setup):
    _, _, _, model, mean, dn = setup
    inputs = np.random.default_rng(1).normal(0, 1, (4, CROP, CROP, 1)).astype(np.float32)
    features = topk.feature_model(model, dn.layer_names)(inputs)
    expected = dn.activations(inputs, dn.layer_names)
    for layer in dn.layer_names:
        np.testing.assert_allclose(features[layer], expected[layer], rtol=1e-5, atol=1e-5)


def test_mined_top_k_equals_brute_force(setup):
    raw, _, _, model, mean, _ = setup
    batches, indices, inputs = _inputs(raw, mean, 6)
    np.testing.assert_array_equal(indices, np.arange(COUNT))
    k = 5
    mined = topk.mine_top_k(model, batches, LAYERS, k)
    assert mined.complete and mined.num_images == COUNT and mined.batches == 7
    # The same forward batches in a graph, so the same float32 maps, reduced in NumPy.
    features = tf.function(topk.feature_model(model, LAYERS))
    maps = {layer: [] for layer in LAYERS}
    for start in range(0, COUNT, 6):
        out = features(inputs[start : start + 6])
        for layer in LAYERS:
            maps[layer].append(np.asarray(out[layer]))
    ties = 0
    for layer in LAYERS:
        values, images, positions = brute_force_top_k(np.concatenate(maps[layer]), k)
        np.testing.assert_array_equal(mined.values[layer], values)
        np.testing.assert_array_equal(mined.image_index[layer], images)
        np.testing.assert_array_equal(mined.positions[layer], positions)
        ties += int(np.isin(images, list(DUPLICATES.values())).sum())
    assert ties > 0  # the duplicated images really compete, so the tie rule is exercised


def test_fewer_images_than_k_are_marked(setup):
    raw, _, _, model, mean, _ = setup
    batches = topk.model_input_batches(raw, PRE, mean, 2, num_images=3)
    mined = topk.mine_top_k(model, batches, ("conv1",), k=5)
    assert mined.num_images == 3
    assert (mined.image_index["conv1"][:, 3:] == -1).all()
    assert np.isneginf(mined.values["conv1"][:, 3:]).all()
    assert sorted(mined.image_index["conv1"][0, :3]) == [0, 1, 2]


def test_model_input_batches_run_without_tf_data_autotuning(setup):
    raw, _, _, _, mean, _ = setup  # an autotuned dataset of the caller's
    assert raw.options().autotune.enabled is not False
    batches = topk.model_input_batches(raw, PRE, mean, 4)
    assert batches.options().autotune.enabled is False


def test_interrupted_pass_resumes_and_complete_state_is_reused(setup, tmp_path):
    raw, _, _, model, mean, _ = setup
    batches = topk.model_input_batches(raw, PRE, mean, 4)  # 11 batches
    expected = topk.mine_top_k(model, batches, LAYERS, 3)
    state = str(tmp_path / "state.npz")
    seen = []

    def stop_at_five(done, total):
        seen.append(done)
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        topk.mine_top_k(
            model, batches, LAYERS, 3, state_path=state, checkpoint_every=2, progress=stop_at_five
        )
    saved = topk.load_top_k(state)
    assert not saved.complete and saved.batches == 4 and saved.num_images == 16
    seen.clear()
    resumed = topk.mine_top_k(
        model,
        batches,
        LAYERS,
        3,
        state_path=state,
        checkpoint_every=2,
        progress=lambda done, total: seen.append(done),
    )
    assert seen == list(range(5, 12))
    assert resumed.complete and resumed.num_images == COUNT
    for layer in LAYERS:
        np.testing.assert_array_equal(resumed.image_index[layer], expected.image_index[layer])
        np.testing.assert_allclose(resumed.values[layer], expected.values[layer], rtol=1e-6)
    seen.clear()
    again = topk.mine_top_k(
        model, batches, LAYERS, 3, state_path=state, progress=lambda done, total: seen.append(done)
    )
    assert seen == [] and again.complete
    # Other settings (k) make the saved state stale: mined afresh.
    fresh = topk.mine_top_k(
        model, batches, LAYERS, 2, state_path=state, progress=lambda done, total: seen.append(done)
    )
    assert len(seen) == 11 and fresh.values["conv1"].shape[1] == 2


def test_fetch_views_returns_the_evaluation_views_in_order(setup):
    raw, images, labels, _, _, _ = setup
    wanted = [9, 2, 9, 40]
    views, got = topk.fetch_views(raw, PRE, wanted, batch_size=3)
    expected = np.stack([data.eval_view(images[i], PRE) for i in wanted])
    np.testing.assert_array_equal(views, expected)
    np.testing.assert_array_equal(got, labels[wanted])
    with pytest.raises(Error, match="not found"):
        topk.fetch_views(raw, PRE, [3, COUNT + 5])


def test_projections_equal_the_deconvnet_for_the_same_requests(setup):
    raw, _, labels, model, mean, dn = setup
    batches, _, _ = _inputs(raw, mean, 8)
    mined = topk.mine_top_k(model, batches, ("conv2", "fc6"), k=4)
    run = runs.Run("memory", model, PRE, mean, ("a", "b", "c"), {})
    for layer, channels in (("conv2", [0, 5, 9]), ("fc6", [1, 2])):
        wanted = np.unique(mined.image_index[layer][channels])
        views, got_labels = topk.fetch_views(raw, PRE, wanted)
        rows = {int(i): r for r, i in enumerate(wanted)}
        winners = topk.project_winners(dn, run, mined, layer, channels, views, got_labels, rows)
        np.testing.assert_allclose(
            winners.projected_values, mined.values[layer][channels], rtol=1e-4, atol=1e-5
        )
        for i, channel in enumerate(channels):
            for j in range(4):
                index = int(mined.image_index[layer][channel, j])
                image = run.model_input(views[[rows[index]]])
                position = mined.positions[layer][channel, j]
                reference = dn.project(image, 0, layer, channel, positions=[position])
                y0, x0, y1, x1 = reference.boxes[0]
                np.testing.assert_array_equal(winners.boxes[i, j], reference.boxes[0])
                np.testing.assert_allclose(
                    winners.projections[i][j],
                    reference.projections[0, y0:y1, x0:x1],
                    rtol=1e-5,
                    atol=1e-6,
                )
                np.testing.assert_array_equal(
                    winners.patches[i][j], views[rows[index], y0:y1, x0:x1]
                )
                assert winners.labels[i, j] == labels[index]


_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from zfkeras import quiet
    tf = quiet.import_tensorflow()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from zfkeras import distribute
    from zfkeras.analysis import topk
    from zfkeras.models import ZFNet
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(23, 48, 48, 1)).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((np.arange(23, dtype=np.int64), inputs)).batch(6)
    layers = ["conv1", "conv5", "fc6"]
    model = ZFNet(3, (48, 48, 1), width=0.25, fc_units=16, init="he", seed=1)
    plain = topk.mine_top_k(model, batches, layers, k=4)
    strategy = distribute.make_strategy("mirrored")
    with strategy.scope():
        mirrored_model = ZFNet(3, (48, 48, 1), width=0.25, fc_units=16, init="he", seed=1)
    mirrored_model.set_weights(model.get_weights())
    mirrored = topk.mine_top_k(mirrored_model, batches, layers, k=4, strategy=strategy)
    out = {"replicas": strategy.num_replicas_in_sync, "num_images": mirrored.num_images}
    for layer in layers:
        out[layer] = [
            bool(np.array_equal(plain.image_index[layer], mirrored.image_index[layer])),
            float(np.abs(plain.values[layer] - mirrored.values[layer]).max()),
            bool(np.array_equal(plain.positions[layer], mirrored.positions[layer])),
        ]
    json.dump(out, sys.stdout)
    """
)


def test_mirrored_strategy_mines_the_same_top_k():
    # Logical CPU devices must be set before any TensorFlow op: a fresh process.
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2 and out["num_images"] == 23  # 23 = uneven per-replica batches
    for layer in ("conv1", "conv5", "fc6"):
        same_images, value_error, same_positions = out[layer]
        assert same_images and same_positions and value_error <= 1e-5


# ---------------------------------------------------------------------------
# The tool, end to end on a tiny run.


def run_tool(*args, timeout=300):
    return conftest.run_tool("mine_top9", *args, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved run (model.keras, run.json, mean.npy) on a folder dataset of PNGs."""
    root = tmp_path_factory.mktemp("top9_tool")
    images = _images(30, seed=2)
    for i, image in enumerate(images):
        folder = root / "data" / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{i:03d}.png")
    dataset = f"folder:{root / 'data'}"
    raw, info = data.load(dataset, "train", channels=1)
    mean = data.compute_mean(raw, PRE)
    run_dir = root / "run"
    runs.write_run_files(str(run_dir), PRE, mean, info, {"architecture": "zfnet"})
    model = ZFNet(3, (CROP, CROP, 1), width=0.25, fc_units=16, init="he", seed=5)
    fileio.save_model(model, str(run_dir / runs.MODEL_FILE))
    return root


def test_tool_mines_projects_and_reuses_its_state(tiny_run):
    out = tiny_run / "out"
    args = [
        f"--checkpoint={tiny_run / 'run'}",
        "--split=train",
        f"--output_dir={out}",
        "--layers=conv1,conv5",
        "--maps=conv5:1,3",
        "--num_maps=2",
        "--batch_size=8",
    ]
    result = run_tool(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mined 27 images" in result.stdout and "mining: 4/4 batches" in result.stderr
    assert "conv5: 64 maps" in result.stdout and "labels shuffled" in result.stdout
    names = sorted(os.listdir(out))
    assert names == ["top9.json", "top9_conv1.png", "top9_conv5.png", "top9_state.npz"]
    record = json.load(open(out / "top9.json"))
    assert [m["map"] for m in record["layers"]["conv5"]["maps"]] == [1, 3]
    assert set(record["classes"]) == {"conv1", "conv5"}
    assert record["classes"]["conv1"]["maps"] == 24
    assert len(record["layers"]["conv1"]["maps"]) == 2
    state = topk.load_top_k(str(out / "top9_state.npz"))
    assert state.complete and state.values["conv1"].shape == (24, 9)  # every map is kept
    for entry in record["layers"]["conv5"]["maps"]:
        activations = [r["activation"] for r in entry["top"]]
        assert len(activations) == 9 and activations == sorted(activations, reverse=True)
        np.testing.assert_allclose(activations, state.values["conv5"][entry["map"]], rtol=1e-6)
    again = run_tool(*args)
    assert again.returncode == 0 and "reused the saved state" in again.stdout
    assert "mining:" not in again.stderr


def test_tool_rejects_an_unknown_layer_in_one_line(tiny_run):
    result = run_tool(
        f"--checkpoint={tiny_run / 'run'}", "--layers=conv9", f"--output_dir={tiny_run / 'bad'}"
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown layer 'conv9'" in lines[0]
    assert "conv1, conv2, conv3, conv4, conv5, fc6, fc7, predictions" in lines[0]
    result = run_tool(f"--checkpoint={tiny_run / 'run'}", "--maps=conv5:x")
    assert result.returncode == 2 and "--maps takes LAYER:c1,c2" in result.stderr


@pytest.mark.parametrize("shape", [(5, 13, 11, 7), (3, 110, 110, 4), (1, 4096, 4096, 1)])
def test_per_image_max_finds_the_first_maximum_among_ties(shape):
    # Quantised values: many positions share each map's maximum; some maps are all zero.
    rng = np.random.default_rng(3)
    maps = np.round(rng.uniform(0, 2, shape)).astype(np.float32)
    maps[0, ..., 0] = 0.0
    maxima, positions = topk._per_image_max(tf.constant(maps))
    flat = maps.reshape(shape[0], -1, shape[-1])
    np.testing.assert_array_equal(maxima, flat.max(axis=1))
    np.testing.assert_array_equal(positions, flat.argmax(axis=1))  # NumPy: the first.


def test_class_summary_counts_each_maps_commonest_class():
    # Layer a: map 0's top 3 are images 0, 1, 2 (labels 1, 1, 1); map 1's are
    # 3, 4, 0 (labels 2, 0, 1); map 2 never fires. Layer b: one map, 1, 1, 2.
    labels = np.array([1, 1, 1, 2, 0, 2])
    top = topk.TopK(
        layers=("a", "b"),
        values={"a": np.array([[3, 2, 1], [5, 4, 1], [0, 0, 0]], np.float32), "b": np.ones((1, 3))},
        image_index={"a": np.array([[0, 1, 2], [3, 4, 0], [5, 4, 3]]), "b": np.array([[0, 1, 5]])},
        positions={},
        num_images=6,
        complete=True,
        batches=1,
        fingerprint={},
    )
    got = topk.class_summary(top, labels)
    assert got["a"]["maps"] == 3 and got["a"]["silent_maps"] == 1
    assert got["a"]["majority_share"] == pytest.approx((1 + 1 / 3) / 2)
    assert got["a"]["one_class_maps"] == 0.5
    assert got["b"]["majority_share"] == pytest.approx(2 / 3) and got["b"]["one_class_maps"] == 0
    # The control permutes the labels: the same statistic of another labelling.
    shuffled = np.random.default_rng(0).permutation(labels)
    share = np.bincount(shuffled[[0, 1, 5]]).max() / 3
    assert got["b"]["shuffled_majority_share"] == pytest.approx(share)


def test_dataset_labels_are_in_dataset_order(setup):
    raw, _, labels, *_ = setup
    np.testing.assert_array_equal(topk.dataset_labels(raw), labels)
    np.testing.assert_array_equal(topk.dataset_labels(raw, 5), labels[:5])
