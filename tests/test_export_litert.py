"""The LiteRT models (export/litert.py) under the ai-edge-litert interpreter.

Uses the session's shared export of a tiny trained run (see
test_export_savedmodel.shared_export): float32, float16, dynamic-range and
int8 models, checked for builtin ops only, against the SavedModel and the
library's deconvnet, and the int8 bars on small synthetic data.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from test_export_savedmodel import shared_export

from zfkeras import data, deconv, runs
from zfkeras.errors import Error
from zfkeras.models import AlexNet
from zfkeras_export import builtin_pool, exporter, graph, litert, verify
from zfkeras_export import source as source_lib

VARIANTS = ("float32", "float16", "dynamic_range", "int8")


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    shared = shared_export(tmp_path_factory)
    folder = os.path.join(shared["base_dir"], "tiny_litert", "1")
    run = runs.load_run(shared["run_dir"])
    test, _ = data.load(run.meta["dataset"], "test", channels=1)
    batches = list(data.eval_batches(test, run.preprocessing, run.mean, batch_size=100))
    inputs = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    loaded = tf.saved_model.load(os.path.join(shared["base_dir"], "tiny", "1"))
    reference = loaded.signatures["classify_inputs"](inputs=tf.constant(inputs))
    return {
        "folder": folder,
        "run": run,
        "inputs": inputs,
        "labels": labels,
        "savedmodel_probabilities": reference["all_probabilities"].numpy(),
        "shared": shared,
    }


def _probabilities(path, inputs):
    """Runs a classifier .tflite with the plain ai-edge-litert API (the numerical reference
    for `litert.Runner`): quantizes int8 inputs, dequantizes outputs."""
    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    detail = runner.get_input_details()["inputs"]
    scale, zero = detail["quantization"]
    x = inputs
    if detail["dtype"] == np.int8:
        x = np.clip(np.round(inputs / scale + zero), -128, 127).astype(np.int8)
    out = runner(inputs=x)["probabilities"]
    scale, zero = runner.get_output_details()["probabilities"]["quantization"]
    return (out.astype(np.float32) - zero) * scale if out.dtype == np.int8 else out


def test_files_signatures_and_builtin_ops_only(lite):
    folder = lite["folder"]
    assert sorted(os.listdir(folder)) == sorted(
        [f"model_{v}.tflite" for v in VARIANTS]
        + ["labels.txt", "mean.npy", "preprocessing.json", "verification.json"]
    )
    for variant in VARIANTS:
        with open(os.path.join(folder, f"model_{variant}.tflite"), "rb") as f:
            content = f.read()
        ops = litert.check_builtins(content, variant)
        assert not any(name.startswith("CUSTOM") for name in ops)
        assert ops["CONV_2D"] >= 5 and ops["LOCAL_RESPONSE_NORMALIZATION"] >= 2
        signatures = Interpreter(model_content=content).get_signature_list()
        expected = {"serving_default"}
        if variant == "float32":
            expected |= {f"deconv_conv{i}" for i in range(1, 6)}
            assert ops["SCATTER_ND"] >= 2 and ops["TRANSPOSE_CONV"] >= 5
        assert set(signatures) == expected
    details = Interpreter(model_path=os.path.join(folder, "model_int8.tflite"))
    assert details.get_input_details()[0]["dtype"] == np.int8
    assert details.get_output_details()[0]["dtype"] == np.int8
    with open(os.path.join(folder, "labels.txt")) as f:
        assert f.read().split() == list(lite["run"].class_names)


def test_float32_is_within_1e4_of_the_savedmodel(lite):
    path = os.path.join(lite["folder"], "model_float32.tflite")
    probabilities = _probabilities(path, lite["inputs"])
    np.testing.assert_allclose(probabilities, lite["savedmodel_probabilities"], atol=1e-4)
    runner = litert.Runner(litert.interpreter(model_path=path))
    np.testing.assert_allclose(
        runner(batch_size=4, inputs=lite["inputs"])["probabilities"], probabilities, atol=1e-7
    )


def test_quantized_models_on_small_synthetic_data(lite):
    reference = lite["savedmodel_probabilities"]
    float_correct = (reference.argmax(1) == lite["labels"]).mean() * 100
    with open(os.path.join(lite["folder"], "verification.json")) as f:
        recorded = json.load(f)["verification"]
    for variant in ("float16", "dynamic_range", "int8"):
        path = os.path.join(lite["folder"], f"model_{variant}.tflite")
        probabilities = _probabilities(path, lite["inputs"])
        agreement = (probabilities.argmax(1) == reference.argmax(1)).mean() * 100
        accuracy = (probabilities.argmax(1) == lite["labels"]).mean() * 100
        assert agreement >= 99.0 and float_correct - accuracy <= 1.0, variant
        assert recorded[variant]["top1_agreement"] == pytest.approx(agreement)
        assert recorded[variant]["accuracy"] == pytest.approx(accuracy)
        assert recorded[variant]["examples"] == len(lite["labels"])
    np.testing.assert_allclose(
        _probabilities(os.path.join(lite["folder"], "model_int8.tflite"), lite["inputs"]),
        reference,
        atol=0.05,
    )


def test_deconv_signatures_equal_the_library(lite):
    run = lite["run"]
    inputs = lite["inputs"][:6]
    interpreter = litert.interpreter(
        model_path=os.path.join(lite["folder"], "model_float32.tflite")
    )
    dn = deconv.Deconvnet(run.model)
    activations = dn.activations(inputs)
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        maps = deconv.strongest_channels(activations[layer], 1)[:, 0].astype(np.int32)
        out = litert.Runner(interpreter, f"deconv_{layer}")(inputs=inputs, feature_map=maps)
        ref = dn.project(inputs, np.arange(len(inputs)), layer, maps)
        scale = np.abs(ref.projections).max()
        assert scale > 0
        np.testing.assert_allclose(out["projections"], ref.projections, atol=1e-4 * scale)
        np.testing.assert_array_equal(out["positions"], ref.positions)
        np.testing.assert_array_equal(out["boxes"], ref.boxes)
        np.testing.assert_allclose(out["activations"], ref.values, rtol=1e-4)


def _tflite(fn, specs, select_tf_ops=False):
    concrete = tf.function(fn, input_signature=specs).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS] + (
        [tf.lite.OpsSet.SELECT_TF_OPS] if select_tf_ops else []
    )
    return converter.convert()


def test_builtin_switches_in_tflite_match_max_pool_with_argmax():
    # Ties everywhere and maxima on shared window borders: coincident switches.
    rng = np.random.default_rng(0)
    x = np.maximum(rng.integers(-2, 3, (2, 14, 14, 3)), 0).astype(np.float32)
    signal = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)

    def pool_unpool(x, signal):
        pooled, switches = builtin_pool.argmax_pool(x, (3, 3), (2, 2), "same")
        return pooled, builtin_pool.unpool(signal, switches, (14, 14), (3, 3), (2, 2), "same")

    specs = [tf.TensorSpec(x.shape), tf.TensorSpec(signal.shape)]
    content = _tflite(pool_unpool, specs)
    assert "SCATTER_ND" in litert.check_builtins(content, "pool")
    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():  # Told apart by their shapes.
        value = x if tuple(detail["shape"]) == x.shape else signal
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    out = {
        tuple(d["shape"]): interpreter.get_tensor(d["index"])
        for d in interpreter.get_output_details()
    }
    pooled, unpooled = out[signal.shape], out[x.shape]
    ref_pooled, switches = tf.nn.max_pool_with_argmax(x, 3, 2, "SAME", include_batch_in_index=True)
    expected = np.zeros(x.size, np.float64)
    np.add.at(expected, switches.numpy().ravel(), signal.ravel())
    np.testing.assert_array_equal(pooled, ref_pooled.numpy())
    np.testing.assert_allclose(unpooled, expected.reshape(x.shape), atol=1e-6)


def test_a_flex_op_fails_the_export(tmp_path):
    def with_argmax(x):
        return tf.nn.max_pool_with_argmax(x, 3, 2, "VALID")[0]

    spec = [tf.TensorSpec([1, 9, 9, 2])]
    content = _tflite(with_argmax, spec, select_tf_ops=True)
    with pytest.raises(Error, match="non-builtin ops.*FlexMaxPoolWithArgmax.*no Flex delegate"):
        litert.check_builtins(content, "model")
    module = tf.Module()
    module.f = tf.function(with_argmax, input_signature=spec)
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.f})
    with pytest.raises(Error, match="LiteRT float32 conversion failed"):
        litert.convert(str(tmp_path / "sm"), "float32", conv_layers=())


def test_the_int8_bars():
    numbers = {"examples": 1000, "accuracy": 80.0, "max_abs_diff": 0.01}
    good = {
        "savedmodel": dict(numbers, accuracy_drop=0.0, top1_agreement=100.0, max_abs_diff=0.0),
        "float32": dict(numbers, accuracy_drop=0.0, top1_agreement=100.0, max_abs_diff=5e-5),
        "int8": dict(numbers, accuracy_drop=1.0, top1_agreement=99.0),
    }
    verify.judge(good)
    for key, value, message in (
        ("top1_agreement", 98.9, "int8 top-1 agreement 98.90 %"),
        ("accuracy_drop", 1.1, "int8 accuracy drop 1.10 points"),
    ):
        bad = dict(good, int8=dict(good["int8"], **{key: value}))
        with pytest.raises(Error, match=message):
            verify.judge(bad)
    bad = dict(good, float32=dict(good["float32"], max_abs_diff=2e-4))
    with pytest.raises(Error, match="float32 LiteRT differs by 0.0002"):
        verify.judge(bad)


def test_split_verifier_counts(lite):
    path = os.path.join(lite["folder"], "model_int8.tflite")
    with open(path, "rb") as f:
        verifier = verify.SplitVerifier(lite["run"].model, None, {"int8": f.read()})
    inputs, labels = lite["inputs"], lite["labels"].copy()
    labels[:3] = (labels[:3] + 1) % 3  # Three wrong labels: accuracy 80 %.
    for start in range(0, len(labels), 4):
        verifier.update(inputs[start : start + 4], labels[start : start + 4])
    results = verifier.results()
    assert list(results) == ["keras", "int8"]
    expected = lite["run"].model.predict(inputs, verbose=0)
    assert results["keras"]["accuracy"] == pytest.approx(
        100 * (expected.argmax(1) == labels).mean()
    )
    assert results["int8"]["top1_agreement"] == 100.0 and results["int8"]["examples"] == 15


def test_runner_refuses_wrong_inputs_with_the_spec(lite):
    runner = litert.Runner(
        litert.interpreter(model_path=os.path.join(lite["folder"], "model_float32.tflite"))
    )
    with pytest.raises(Error, match=r"must be float32 \(batch, 56, 56, 1\); got float32 \(2, 50"):
        runner(inputs=np.zeros((2, 50, 56, 1), np.float32))
    with pytest.raises(Error, match=r"must be float32 .*got int32"):
        runner(inputs=np.zeros((2, 56, 56, 1), np.int32))
    with pytest.raises(Error, match="has no input 'images'"):
        runner(images=np.zeros((2, 56, 56, 1), np.float32))


def test_int8_without_training_data_fails_in_one_line(lite, tmp_path):
    config = exporter.ExportConfig(
        source=os.path.join(lite["shared"]["run_dir"], "model.keras"),
        base_dir=str(tmp_path / "serving"),
        formats=("int8",),
    )
    with pytest.raises(Error, match="int8 model needs training images for calibration"):
        exporter.export(config)
    assert not (tmp_path / "serving").exists()


def test_two_tower_alexnet_deconv_in_tflite_equals_the_library():
    # Grouped conv2/4/5: the forward convs and the group-wise transposes are builtins too.
    model = AlexNet(4, (67, 67, 3), towers=2, width=0.25, fc_units=16, init="he", seed=0)
    pre = data.Preprocessing(72, 67, 3, 1 / 64)
    mean = np.full((72, 72, 3), 120, np.float32)
    layers = source_lib.check_model(model, "alexnet2")
    g = graph.ServingGraph(source_lib.Source("alexnet2", model, pre, mean, "abcd", layers, {}))
    with litert.lite_savedmodel(g) as path:
        content = litert.convert(path, "float32", layers)
    # The builtin op set: TensorFlow's LRN op and direct convolutions, no Winograd.
    operators = litert.operators(content)
    assert "LOCAL_RESPONSE_NORMALIZATION" in operators
    assert not any("BATCH_MATMUL" in name or "SPACE_TO_BATCH" in name for name in operators)
    # fc6, fc7 and the head as FULLY_CONNECTED on the [out, in] kernels, no transposes.
    assert operators["FULLY_CONNECTED"] == 3 and "TRANSPOSE" not in operators
    interpreter = litert.interpreter(model_content=content)
    inputs = np.random.default_rng(1).normal(0, 1, (3, 67, 67, 3)).astype(np.float32)
    probabilities = litert.Runner(interpreter)(inputs=inputs)["probabilities"]
    np.testing.assert_allclose(probabilities, model.predict(inputs, verbose=0), atol=1e-5)
    dn = deconv.Deconvnet(model)
    for layer in ("conv2", "conv5"):
        maps = deconv.strongest_channels(dn.activations(inputs, [layer])[layer], 1)[:, 0]
        out = litert.Runner(interpreter, f"deconv_{layer}")(
            inputs=inputs, feature_map=maps.astype(np.int32)
        )
        ref = dn.project(inputs, np.arange(3), layer, maps)
        scale = np.abs(ref.projections).max()
        np.testing.assert_allclose(out["projections"], ref.projections, atol=1e-4 * scale)
