"""tools/predict.py and export/client.py: local SavedModel, .tflite, and TF Serving REST.

TensorFlow Serving cannot be installed here, so `tf_serving` below is a small
HTTP server on 127.0.0.1 implementing the documented REST predict contract
(POST /v1/models/NAME[/versions/N]:predict; "instances" row or "inputs"
columnar bodies; {"b64": ...} for binary strings; "predictions" / "outputs"
answers; {"error": ...} with status 400), backed by the exported SavedModel.
"""

import base64
import http.server
import json
import os
import re
import threading

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from test_export_savedmodel import run_tool, shared_export

from zfkeras import data, deconv, images, runs
from zfkeras.errors import Error
from zfkeras_export import client

_MAX_BODY = 20 * 1024 * 1024


def _is_binary(value):
    return isinstance(value, dict) and set(value) == {"b64"}


def _decode(value):
    if _is_binary(value):
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _jsonable(array):
    if array.dtype == object:
        return [_jsonable(a) if isinstance(a, np.ndarray) else a.decode() for a in array]
    return array.tolist()


class _ServingHandler(http.server.BaseHTTPRequestHandler):
    """TF Serving's REST predict API over one loaded SavedModel."""

    model_name = "tiny"
    loaded = None
    timeout = 30  # Seconds a client may take to send its request.

    def log_message(self, *args):
        pass

    def _answer(self, status, body):
        payload = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        match = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:predict", self.path)
        if not match or match.group(1) != self.model_name:
            return self._answer(404, {"error": f"Servable not found for request: {self.path}"})
        length = int(self.headers.get("Content-Length", 0))
        if length > _MAX_BODY:
            return self._answer(400, {"error": "request too large"})
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as e:
            return self._answer(400, {"error": f"JSON Parse error: {e}"})
        name = body.get("signature_name", "serving_default")
        if name not in self.loaded.signatures:
            return self._answer(
                400, {"error": f'Serving signature name: "{name}" not found in signature def'}
            )
        function = self.loaded.signatures[name]
        specs = function.structured_input_signature[1]
        if "instances" in body:
            rows = body["instances"]
            if rows and isinstance(rows[0], dict) and not _is_binary(rows[0]):
                columns = {key: [row[key] for row in rows] for key in rows[0]}
            else:
                columns = {next(iter(specs)): rows}
        elif "inputs" in body:
            inputs = body["inputs"]
            columns = inputs if isinstance(inputs, dict) else {next(iter(specs)): inputs}
        else:
            return self._answer(400, {"error": "Missing 'inputs' or 'instances' key"})
        try:
            tensors = {k: tf.constant(_decode(v), specs[k].dtype) for k, v in columns.items()}
            outputs = {k: v.numpy() for k, v in function(**tensors).items()}
        except tf.errors.OpError as e:
            return self._answer(400, {"error": e.message})
        except (KeyError, TypeError, ValueError) as e:
            return self._answer(400, {"error": str(e)})
        if "instances" in body:
            count = len(next(iter(outputs.values())))
            rows = [
                {k: _jsonable(v[i : i + 1])[0] for k, v in outputs.items()} for i in range(count)
            ]
            return self._answer(200, {"predictions": rows})
        return self._answer(200, {"outputs": {k: _jsonable(v) for k, v in outputs.items()}})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    shared = shared_export(tmp_path_factory)
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    paths = []
    for i, level in enumerate((40, 200, 120, 45)):
        path = root / f"image{i}.{'png' if i % 2 else 'jpg'}"
        pixels = np.clip(rng.normal(level, 10, (28 + i, 30, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    (root / "notes.txt").write_text("not an image")
    run = runs.load_run(shared["run_dir"])
    views = np.stack([data.eval_view(images.read_image(p), run.preprocessing) for p in paths])
    expected = run.model.predict(run.model_input(views), verbose=0)
    return {
        "shared": shared,
        "paths": paths,
        "root": root,
        "run": run,
        "inputs": run.model_input(views),
        "expected": expected,
        "savedmodel": os.path.join(shared["base_dir"], "tiny"),
        "litert": os.path.join(shared["base_dir"], "tiny_litert", "1"),
    }


@pytest.fixture(scope="module")
def tf_serving(artifacts):
    handler = type(
        "Handler",
        (_ServingHandler,),
        {"loaded": tf.saved_model.load(os.path.join(artifacts["savedmodel"], "1"))},
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/models/tiny"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _check_records(records, artifacts, top_k=2, atol=1e-5, ranked=None):
    """Records equal the Keras model's top-k (the first `ranked` in order)."""
    expected = artifacts["expected"]
    names = artifacts["run"].class_names
    ranked = top_k if ranked is None else ranked
    assert [r["image"] for r in records] == artifacts["paths"]
    for record, p in zip(records, expected):
        order = np.argsort(-p)[:top_k]
        assert len(record["classes"]) == top_k
        assert record["classes"][:ranked] == order[:ranked].tolist()
        assert record["class_names"] == [names[i] for i in record["classes"]]
        np.testing.assert_allclose(record["probabilities"], p[record["classes"]], atol=atol)


def test_tool_with_a_savedmodel_prints_a_table(artifacts):
    result = run_tool(
        "predict",
        f"--image={','.join(artifacts['paths'])}",
        f"--model_path={artifacts['savedmodel']}",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["image", "class", "p"]
    names = artifacts["run"].class_names
    for line, path, p in zip(lines[1:], artifacts["paths"], artifacts["expected"]):
        best = int(p.argmax())
        assert line.startswith(path)
        assert f"{names[best]} ({best})" in line and f"{p.max():.3f}" in line


def test_tool_against_the_rest_server_prints_json(artifacts, tf_serving):
    result = run_tool(
        "predict",
        f"--image={','.join(artifacts['paths'])}",
        f"--server={tf_serving}",
        "--format=json",
        "--batch_size=3",
    )
    assert result.returncode == 0, result.stderr
    _check_records(json.loads(result.stdout), artifacts)


@pytest.mark.parametrize("request_format", ["row", "columnar"])
def test_client_rest_forms_and_versions(artifacts, tf_serving, request_format):
    for server in (tf_serving, f"{tf_serving}/versions/1"):
        config = client.PredictConfig(
            images=tuple(artifacts["paths"]), server=server, request_format=request_format
        )
        _check_records(client.predict(config), artifacts)


@pytest.mark.parametrize("variant,atol,ranked", [("float32", 1e-4, 3), ("int8", 0.05, 1)])
def test_client_with_tflite_models(artifacts, variant, atol, ranked):
    path = os.path.join(artifacts["litert"], f"model_{variant}.tflite")
    records = client.predict(
        client.PredictConfig(images=tuple(artifacts["paths"]), model_path=path)
    )
    _check_records(records, artifacts, top_k=3, atol=atol, ranked=ranked)


def test_deconv_signature_over_rest(artifacts, tf_serving):
    encoded = [open(p, "rb").read() for p in artifacts["paths"][:2]]
    body = client.predict_request("deconv_conv2", {"images": encoded, "feature_map": [0, 5]}, "row")
    assert body["instances"][0]["images"] == {"b64": base64.b64encode(encoded[0]).decode()}
    answer = client._post(f"{tf_serving}:predict", body, timeout=30)
    outputs = client.parse_predict_response(answer)
    dn = deconv.Deconvnet(artifacts["run"].model)
    ref = dn.project(artifacts["inputs"][:2], [0, 1], "conv2", [0, 5])
    projections = np.array(outputs["projections"], np.float32)
    scale = max(np.abs(ref.projections).max(), 1e-12)
    np.testing.assert_allclose(projections, ref.projections, atol=1e-5 * scale)
    assert outputs["positions"] == ref.positions.tolist()


def test_bad_requests_get_errors_and_the_server_keeps_serving(artifacts, tf_serving):
    body = client.predict_request("serving_default", {"images": [b"\x89PNG broken"]})
    with pytest.raises(Error, match=r"HTTP 400: .*(image|PNG|format)"):
        client._post(f"{tf_serving}:predict", body, timeout=30)
    wrong = client.predict_request("classify_inputs", {"inputs": [np.zeros((5, 5, 1))]}, "columnar")
    with pytest.raises(Error, match=r"HTTP 400: .*float32 \(batch, 56, 56, 1\)"):
        client._post(f"{tf_serving}:predict", wrong, timeout=30)
    with pytest.raises(Error, match="HTTP 404"):
        client._post(tf_serving.replace("tiny", "other") + ":predict", body, timeout=30)
    config = client.PredictConfig(images=tuple(artifacts["paths"]), server=tf_serving)
    _check_records(client.predict(config), artifacts)


def test_client_errors_name_the_problem(artifacts, tf_serving):
    notes = str(artifacts["root"] / "notes.txt")
    cases = [
        (dict(images=(notes,), server=tf_serving), "notes.txt: not an image"),
        (
            dict(images=tuple(artifacts["paths"]), server="http://127.0.0.1:1/v1/models/tiny"),
            "cannot connect",
        ),
        (
            dict(images=tuple(artifacts["paths"]), server="localhost:8501/tiny"),
            "not a TF Serving model URL",
        ),
        (
            dict(images=tuple(artifacts["paths"]), model_path=str(artifacts["root"])),
            "not a SavedModel",
        ),
        (
            dict(images=tuple(artifacts["paths"]), model_path=str(artifacts["root"] / "x.tflite")),
            "no such file",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(Error, match=message):
            client.predict(client.PredictConfig(**kwargs, timeout=5))


def test_export_tool_refuses_a_foreign_model_in_one_line(artifacts, tmp_path):
    import keras

    odd = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(2)])
    odd.save(tmp_path / "odd.keras")
    result = run_tool(
        "export", f"--source={tmp_path / 'odd.keras'}", f"--base_dir={tmp_path / 'out'}"
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"export: error: {tmp_path / 'odd.keras'}: not a zfkeras model (no layer 'conv1'; "
        "expected a zfkeras ZFNet or AlexNet with layers conv1..conv5 and predictions)"
    ]
    assert not (tmp_path / "out").exists()
