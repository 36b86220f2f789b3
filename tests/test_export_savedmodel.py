"""The SavedModel export (export/): signatures, parity, preprocessing, bad input, layout.

One tiny trained run is exported once (module fixture); the tests read the
result back with plain TensorFlow, in this process and in a fresh one.
`make_tiny_run` is shared with the LiteRT and client tests.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_tool
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2

from zfkeras import data, deconv, fileio, images, runs
from zfkeras import layers as zlayers
from zfkeras.errors import Error
from zfkeras.models import ZFNet
from zfkeras_export import builtin_pool, exporter, graph, savedmodel, verify
from zfkeras_export import source as source_lib

CLASSES = ("c0_dark", "c1_mid", "c2_bright")  # Folder names sort as the labels.
PRE = data.Preprocessing(resize_size=64, crop_size=56, channels=1, input_scale=1 / 64)


# ---------------------------------------------------------------------------
# A tiny run: ZFNet on three brightness classes, trained to confidence.


def _class_image(rng, label, size=28):
    level = 45 + 80 * label
    image = rng.normal(level, 12, (size, size))
    top, left = rng.integers(0, size // 2, 2)
    image[top : top + size // 3, left : left + size // 3] += rng.choice([-30, 30])
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_folder_dataset(root, per_class=(10, 5), seed=0):
    """folder:ROOT with train/ and test/ class folders of 28x28 grayscale PNGs."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for label, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                Image.fromarray(_class_image(rng, label)).save(os.path.join(folder, f"{i}.png"))
    return f"folder:{root}"


def make_tiny_run(root, epochs=15):
    """A trained run folder for a tiny ZFNet (56x56x1, 3 classes); returns its path."""
    keras.utils.set_random_seed(0)
    dataset = make_folder_dataset(os.path.join(root, "data"))
    train, info = data.load(dataset, "train", channels=1)
    mean = data.compute_mean(train, PRE)
    batches = list(data.eval_batches(train, PRE, mean, batch_size=100))
    inputs = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    model = ZFNet(len(CLASSES), (56, 56, 1), width=0.25, fc_units=32, init="he", seed=0)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(inputs, labels, batch_size=6, epochs=epochs, verbose=0)
    run_dir = os.path.join(root, "run")
    os.makedirs(run_dir)
    runs.write_run_files(run_dir, PRE, mean, info, {"train_split": "train"})
    fileio.save_model(model, os.path.join(run_dir, runs.MODEL_FILE))
    return run_dir


def shared_export(tmp_path_factory):
    """The tiny run exported once per test session by tools/export.py (all formats).

    Returns {"root", "run_dir", "base_dir", "stdout"}; the SavedModel is
    base_dir/tiny/1, the LiteRT files base_dir/tiny_litert/1. Read-only.
    """
    root = tmp_path_factory.getbasetemp() / "zfkeras_export_shared"
    done = root / "done.json"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        run_dir = make_tiny_run(str(root))
        result = run_tool(
            "export",
            f"--source={run_dir}",
            f"--base_dir={root / 'serving'}",
            "--model_name=tiny",
            "--top_k=2",
            "--representative_examples=20",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        record = {"run_dir": run_dir, "base_dir": str(root / "serving"), "stdout": result.stdout}
        done.write_text(json.dumps(record))
    return dict(json.loads(done.read_text()), root=str(root))


# ---------------------------------------------------------------------------
# The builtin-ops switches, against TensorFlow and a NumPy reference.


def numpy_unpool(signal, flat_switches, input_shape):
    """Places signal values at flat per-example switches; coincident ones sum."""
    batch, height, width, channels = input_shape
    out = np.zeros(batch * height * width * channels, np.float64)
    per_example = height * width * channels
    for b in range(batch):
        np.add.at(out, b * per_example + flat_switches[b].ravel() % per_example, signal[b].ravel())
    return out.reshape(input_shape)


def flat_switches(switches, shape, pool_size, strides, padding):
    """Window offsets -> TensorFlow's flat ((b*H + y)*W + x)*C + c indices."""
    batch, height, width, channels = shape
    (out_h, top, _), (out_w, left, _) = builtin_pool.pool_geometry(
        (height, width), pool_size, strides, padding
    )
    b, oy, ox, c = np.meshgrid(
        np.arange(batch), np.arange(out_h), np.arange(out_w), np.arange(channels), indexing="ij"
    )
    y = oy * strides[0] - top + switches // pool_size[1]
    x = ox * strides[1] - left + switches % pool_size[1]
    return ((b * height + y) * width + x) * channels + c


@pytest.mark.parametrize("size,padding", [(13, "valid"), (26, "same"), (5, "valid"), (2, "same")])
def test_argmax_pool_matches_max_pool_with_argmax(size, padding):
    rng = np.random.default_rng(size)
    # Few distinct values (ReLU maps are mostly 0): ties everywhere.
    x = np.maximum(rng.integers(-2, 3, (2, size, size, 3)), 0).astype(np.float32)
    pooled, switches = builtin_pool.argmax_pool(tf.constant(x), (3, 3), (2, 2), padding)
    ref_pooled, ref_switches = tf.nn.max_pool_with_argmax(
        x, 3, 2, padding.upper(), include_batch_in_index=True
    )
    np.testing.assert_array_equal(pooled.numpy(), ref_pooled.numpy())
    np.testing.assert_array_equal(
        flat_switches(switches.numpy(), x.shape, (3, 3), (2, 2), padding), ref_switches.numpy()
    )


def test_unpool_sums_coincident_switches():
    # The maximum on the shared row/column of overlapping 3x3/2 windows.
    x = np.zeros((2, 7, 7, 2), np.float32)
    x[:, 2, 2, :] = 5.0
    x[1, 4, 6, 1] = 7.0
    pooled, switches = builtin_pool.argmax_pool(tf.constant(x), (3, 3), (2, 2), "valid")
    signal = np.random.default_rng(0).normal(size=pooled.shape).astype(np.float32)
    flat = flat_switches(switches.numpy(), x.shape, (3, 3), (2, 2), "valid")
    assert len(np.unique(flat[0, ..., 0])) < flat[0, ..., 0].size  # Shared switches exist.
    unpooled = builtin_pool.unpool(tf.constant(signal), switches, (7, 7), (3, 3), (2, 2), "valid")
    np.testing.assert_allclose(unpooled.numpy(), numpy_unpool(signal, flat, x.shape), atol=1e-6)


# ---------------------------------------------------------------------------
# One export, read back.


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    shared = shared_export(tmp_path_factory)
    path = os.path.join(shared["base_dir"], "tiny", "1")
    with open(os.path.join(path, savedmodel.INFO_FILE)) as f:
        record = json.load(f)
    config = exporter.ExportConfig(
        source=shared["run_dir"],
        base_dir=shared["base_dir"],
        model_name="tiny",
        formats=("savedmodel",),
        top_k=2,
    )
    return {
        "run": runs.load_run(shared["run_dir"]),
        "config": config,
        "path": path,
        "record": record,
        "stdout": shared["stdout"],
        "loaded": tf.saved_model.load(path),
    }


def _encoded_samples():
    return [encoded for _, encoded in verify.sample_images(seed=5)]


def _library_inputs(encoded, pre, mean, folder):
    views = []
    for i, content in enumerate(encoded):
        path = os.path.join(folder, f"image{i}")
        with open(path, "wb") as f:
            f.write(content)
        views.append(data.eval_view(images.read_image(path), pre))
    views = np.stack(views)
    return views, data.subtract_mean(views, pre, mean)


def test_layout_signatures_and_record(exported):
    base = exported["config"].base_dir
    assert sorted(os.listdir(base)) == ["tiny", "tiny_litert"]
    assert sorted(os.listdir(os.path.join(base, "tiny"))) == ["1"]  # No staging left.
    version_dir = exported["path"]
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(version_dir).st_mode & 0o777 == 0o777 & ~umask  # Not mkdtemp's 0700.
    signatures = exported["loaded"].signatures
    assert sorted(signatures) == sorted(
        ["serving_default", "classify_pixels", "classify_inputs"]
        + [f"deconv_conv{i}" for i in range(1, 6)]
    )
    _, spec = signatures["serving_default"].structured_input_signature
    assert spec["images"].dtype == tf.string and spec["images"].shape.as_list() == [None]
    _, spec = signatures["deconv_conv3"].structured_input_signature
    assert sorted(spec) == ["feature_map", "images"]
    assert set(signatures["serving_default"].structured_outputs) == {
        "classes",
        "class_names",
        "probabilities",
        "all_probabilities",
    }
    record = exported["record"]
    assert record["model_name"] == "tiny" and record["version"] == 1
    assert record["class_names"] == list(CLASSES)
    parity = record["parity"]
    assert parity["batch_sizes"] == [1, 8]
    assert max(v for k, v in parity.items() if k.endswith("_max_abs_diff")) <= 1e-5
    assert max(v for k, v in parity.items() if k.startswith("deconv_")) <= 1e-4
    assert set(parity["invalid_requests"]) == {"corrupt", "truncated", "wrong_shape"}
    # The test split went through the SavedModel and matched Keras.
    assert record["verification"]["savedmodel"]["examples"] == 15
    assert record["verification"]["savedmodel"]["max_abs_diff"] <= 1e-5


def test_saved_variables_are_the_serving_layouts(exported):
    # Dense kernels are saved [out, in] only (export/layouts.py), Winograd
    # kernels also transformed (16, in, out); nothing else is added or lost.
    model = exported["run"].model
    saved = tf.train.list_variables(os.path.join(exported["path"], "variables", "variables"))
    shapes = sorted(tuple(shape) for name, shape in saved if "VARIABLE_VALUE" in name)
    expected = []
    for layer in model.layers:
        for weight in layer.weights:
            shape = tuple(weight.shape)
            if isinstance(layer, keras.layers.Dense) and weight is layer.kernel:
                shape = shape[::-1]
            expected.append(shape)
        if isinstance(layer, zlayers.WinogradConv2D):
            expected.append((16, *layer.kernel.shape[2:]))
    assert shapes == sorted(expected)
    fc6 = model.get_layer("fc6").kernel.shape
    assert fc6[0] != fc6[1] and tuple(fc6) not in shapes


def test_the_tool_prints_paths_and_the_verification(exported):
    out = exported["stdout"]
    assert f"SavedModel: {exported['path']}" in out
    assert "fresh-process parity at batch sizes [1, 8]" in out
    assert "verification on test (15 examples" in out
    for artifact in ("savedmodel", "float32", "float16", "dynamic_range", "int8"):
        assert f"\n  {artifact} " in out


def test_fresh_process_reload_equals_keras_at_two_batch_sizes(exported, tmp_path):
    run = exported["run"]
    encoded = _encoded_samples()
    views, inputs = _library_inputs(encoded, run.preprocessing, run.mean, str(tmp_path))
    np.save(tmp_path / "inputs.npy", inputs)
    np.save(tmp_path / "encoded.npy", np.array(encoded, dtype=object), allow_pickle=True)
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import tensorflow as tf
        path, folder = sys.argv[1], sys.argv[2]
        loaded = tf.saved_model.load(path)
        inputs = np.load(folder + "/inputs.npy")
        encoded = list(np.load(folder + "/encoded.npy", allow_pickle=True))
        out = {}
        for batch in (1, 5):
            for name, key, values in (
                ("classify_inputs", "inputs", inputs), ("serving_default", "images", encoded)
            ):
                parts = [
                    loaded.signatures[name](**{key: tf.constant(values[i : i + batch])})
                    for i in range(0, len(values), batch)
                ]
                out[f"{name}_{batch}"] = np.concatenate(
                    [p["all_probabilities"].numpy() for p in parts]
                )
        assert not [m for m in sys.modules if m.startswith("zfkeras")]
        np.savez(folder + "/out.npz", **out)
        """
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", script, exported["path"], str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = run.model.predict(inputs, verbose=0)
    out = np.load(tmp_path / "out.npz")
    assert len(out.files) == 4
    for key in out.files:
        np.testing.assert_allclose(out[key], expected, atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize("channels, border", [(1, 0.0), (3, 0.0), (1, 0.1)])
def test_in_graph_preprocessing_equals_the_library(channels, border, tmp_path):
    pre = data.Preprocessing(
        resize_size=61, crop_size=56, channels=channels, input_scale=0.5, border=border
    )
    mean = np.random.default_rng(1).uniform(0, 255, (61, 61, channels)).astype(np.float32)
    model = ZFNet(3, (56, 56, channels), width=0.25, fc_units=8, seed=0)
    source = source_lib.Source(
        "m", model, pre, mean, CLASSES, ("conv1", "conv2", "conv3", "conv4", "conv5"), {}
    )
    g = graph.ServingGraph(source)
    encoded = _encoded_samples()
    views, inputs = _library_inputs(encoded, pre, mean, str(tmp_path))
    got_views, got_inputs = tf.function(g.preprocess_images)(tf.constant(encoded))
    np.testing.assert_array_equal(got_views.numpy(), views)
    np.testing.assert_array_equal(got_inputs.numpy(), inputs)
    pixels = np.random.default_rng(2).integers(0, 256, (3, 45, 70, channels), dtype=np.uint8)
    got_views, got_inputs = tf.function(g.preprocess_pixels)(tf.constant(pixels))
    expected = np.stack([data.eval_view(p, pre) for p in pixels])
    np.testing.assert_array_equal(got_views.numpy(), expected)
    np.testing.assert_array_equal(got_inputs.numpy(), data.subtract_mean(expected, pre, mean))


def test_serving_default_and_pixels_in_the_saved_model(exported, tmp_path):
    run = exported["run"]
    signatures = exported["loaded"].signatures
    encoded = _encoded_samples()
    views, inputs = _library_inputs(encoded, run.preprocessing, run.mean, str(tmp_path))
    expected = run.model.predict(inputs, verbose=0)
    out = signatures["serving_default"](images=tf.constant(encoded))
    np.testing.assert_allclose(out["all_probabilities"].numpy(), expected, atol=1e-5)
    best = expected.argmax(axis=1)
    np.testing.assert_array_equal(out["classes"].numpy()[:, 0], best)
    names = out["class_names"].numpy().astype(str)
    np.testing.assert_array_equal(names[:, 0], np.array(CLASSES)[best])
    np.testing.assert_allclose(out["probabilities"].numpy()[:, 0], expected.max(axis=1), atol=1e-5)
    assert out["classes"].shape == (len(encoded), 2)  # top_k=2
    pixels = np.stack([images.read_image(tmp_path / "image0")] * 2)  # gray.png, 30x44x1
    out = signatures["classify_pixels"](pixels=tf.constant(pixels))
    np.testing.assert_allclose(out["all_probabilities"].numpy(), expected[[0, 0]], atol=1e-5)


def test_deconv_signatures_equal_the_library(exported, tmp_path):
    run = exported["run"]
    encoded = _encoded_samples()[:4]
    views, inputs = _library_inputs(encoded, run.preprocessing, run.mean, str(tmp_path))
    dn = deconv.Deconvnet(run.model)
    activations = dn.activations(inputs)
    for layer in ("conv1", "conv2", "conv5"):
        maps = deconv.strongest_channels(activations[layer], 1)[:, 0].astype(np.int32)
        out = exported["loaded"].signatures[f"deconv_{layer}"](
            images=tf.constant(encoded), feature_map=tf.constant(maps)
        )
        ref = dn.project(inputs, np.arange(len(inputs)), layer, maps)
        scale = np.abs(ref.projections).max()
        assert scale > 0
        np.testing.assert_allclose(out["projections"].numpy(), ref.projections, atol=1e-5 * scale)
        np.testing.assert_array_equal(out["positions"].numpy(), ref.positions)
        np.testing.assert_array_equal(out["boxes"].numpy(), ref.boxes)
        np.testing.assert_allclose(out["activations"].numpy(), ref.values, rtol=1e-5)
        np.testing.assert_array_equal(out["views"].numpy(), views)
        # Behaviour: nothing outside the unit's receptive field.
        for projection, (y0, x0, y1, x1) in zip(out["projections"].numpy(), ref.boxes):
            outside = projection.copy()
            outside[y0:y1, x0:x1] = 0
            assert not outside.any()


def test_corrupt_bytes_fail_that_request_only(exported):
    serve = exported["loaded"].signatures["serving_default"]
    good = _encoded_samples()[0]
    for bad in (b"not an image at all", good[: len(good) // 3], b""):
        with pytest.raises(tf.errors.InvalidArgumentError):
            serve(images=tf.constant([good, bad]))
    assert serve(images=tf.constant([good]))["classes"].shape == (1, 2)  # Still serving.


def test_tensor_signatures_refuse_wrong_shapes_and_dtypes(exported):
    signatures = exported["loaded"].signatures
    classify = signatures["classify_inputs"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"float32 \(batch, 56, 56, 1\)"):
        classify(inputs=tf.zeros([2, 50, 56, 1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"float32 \(batch, 56, 56, 1\)"):
        classify(inputs=tf.zeros([2, 56, 56, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="float"):
        classify(inputs=tf.zeros([2, 56, 56, 1], tf.float64))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"uint8 \(batch, height, width, 1\)"):
        signatures["classify_pixels"](pixels=tf.zeros([1, 30, 30, 3], tf.uint8))
    image = _encoded_samples()[0]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"feature_map must be in \[0, 24\)"):
        signatures["deconv_conv1"](images=tf.constant([image]), feature_map=tf.constant([24]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one feature_map per image"):
        signatures["deconv_conv1"](images=tf.constant([image]), feature_map=tf.constant([1, 2]))


def test_empty_batches(exported):
    signatures = exported["loaded"].signatures
    out = signatures["serving_default"](images=tf.constant([], tf.string))
    assert out["classes"].shape == (0, 2) and out["all_probabilities"].shape == (0, 3)
    out = signatures["deconv_conv2"](
        images=tf.constant([], tf.string), feature_map=tf.constant([], tf.int32)
    )
    assert out["projections"].shape == (0, 56, 56, 1)


# ---------------------------------------------------------------------------
# Versions, failures, refusals.


def test_versions_are_never_overwritten_without_overwrite(exported, tmp_path):
    config = exported["config"]
    with pytest.raises(Error, match="version 1 exists; pass --overwrite"):
        exporter.export(exporter.ExportConfig(**{**config.__dict__, "version": 1}))
    version, paths = exporter._destinations(config, "tiny")
    assert version == 2 and paths["savedmodel"].endswith(os.path.join("tiny", "2"))
    # Overwriting swaps the folders: the old version is never half-replaced.
    final, staging = tmp_path / "7", tmp_path / ".7.tmp"
    final.mkdir()
    (final / "old").write_text("old")
    staging.mkdir()
    (staging / "new").write_text("new")
    with pytest.raises(Error, match="not overwritten"):
        exporter._move_into_place(str(staging), str(final), overwrite=False)
    exporter._move_into_place(str(staging), str(final), overwrite=True)
    assert sorted(os.listdir(final)) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["7"]


def test_a_failed_check_installs_nothing(exported, monkeypatch, tmp_path):
    def write(serving_graph, path):
        with open(os.path.join(path, "saved_model.pb"), "wb") as f:
            f.write(b"unchecked")

    def fail(*args, **kwargs):
        raise Error("parity failed on purpose")

    monkeypatch.setattr(savedmodel, "write_savedmodel", write)
    monkeypatch.setattr(verify, "check_savedmodel", fail)
    base = tmp_path / "serving"
    config = exporter.ExportConfig(
        source=exported["config"].source,
        base_dir=str(base),
        model_name="m",
        formats=("savedmodel",),
    )
    with pytest.raises(Error, match="on purpose"):
        exporter.export(config)
    assert os.listdir(base / "m") == []  # Neither the version nor the staging folder.


def test_foreign_models_and_runs_without_mean_are_refused(exported, tmp_path):
    odd = keras.Sequential(
        [
            keras.Input((32, 32, 1)),
            keras.layers.Conv2D(2, 3, name="c"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    odd.save(tmp_path / "odd.keras")
    config = dict(base_dir=str(tmp_path / "serving"), formats=("savedmodel",))
    with pytest.raises(Error, match=r"odd.keras: not a zfkeras model \(no layer 'conv1'"):
        exporter.export(exporter.ExportConfig(source=str(tmp_path / "odd.keras"), **config))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in (runs.RUN_FILE, runs.MODEL_FILE):
        os.link(os.path.join(exported["config"].source, name), run_dir / name)
    with pytest.raises(Error, match=r"run has no mean image \(mean.npy\)") as e:
        exporter.export(exporter.ExportConfig(source=str(run_dir), **config))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "serving").exists()


def _saved_ops(path):
    """(op types in the SavedModel's graph and functions, whether a function is XLA-compiled)."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    ops = {node.op for node in graph.node}
    compiled = False
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
        compiled |= function.attr["_XlaMustCompile"].b
    return ops, compiled


def test_savedmodel_xla_runs_the_xla_normalisation_and_matches_keras(exported, tmp_path):
    ops, compiled = _saved_ops(exported["path"])
    assert "LRN" not in ops and not compiled  # the default: portable ops, no XLA
    assert any(op.startswith("BatchMatMul") for op in ops)  # Winograd's products
    assert exported["record"]["savedmodel_ops"] == "portable"
    config = exporter.ExportConfig(
        source=exported["config"].source,
        base_dir=str(tmp_path),
        model_name="fast",
        formats=("savedmodel",),
        top_k=2,
        savedmodel_xla=True,
    )
    summary = exporter.export(config)
    path = summary["paths"]["savedmodel"]
    ops, compiled = _saved_ops(path)
    assert "LRN" not in ops and compiled
    with open(os.path.join(path, savedmodel.INFO_FILE)) as f:
        record = json.load(f)
    assert record["savedmodel_ops"] == "xla"
    # Checked like the default export: fresh-process parity and the test split.
    assert max(v for k, v in record["parity"].items() if k.endswith("_max_abs_diff")) <= 1e-5
    assert record["verification"]["savedmodel"]["max_abs_diff"] <= 1e-5
    assert any("--xla_cpu_compilation_enabled" in note for note in summary["notes"])
    with pytest.raises(Error, match="savedmodel_xla needs the savedmodel format"):
        exporter.ExportConfig(source="x", base_dir="y", formats=("int8",), savedmodel_xla=True)
