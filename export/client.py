"""Classifying image files with an exported model: local or over TF Serving's REST API.

Three backends give the same records ({image, classes, class_names,
probabilities}, best first):

- a SavedModel folder (a version folder, or a model folder: its highest
  version, as TF Serving picks it): the encoded bytes go to its
  `serving_default` signature, preprocessing included.
- a .tflite file from the export: decoding, resizing and the mean
  subtraction are done here with `zfkeras.images` / `zfkeras.data` and the
  files beside the model (preprocessing.json, mean.npy, labels.txt).
- a TF Serving REST endpoint `http://host:port/v1/models/NAME` (optionally
  `/versions/N` or `/labels/L`): a `:predict` request with
  `{"b64": ...}` images, in the row ("instances") or columnar ("inputs")
  form of TF Serving's REST API.

Every file is read with `zfkeras.images` first, so a missing or corrupt
file is reported by name before anything is sent, and the three backends see
the same pixels (a TIFF or an EXIF-rotated photo goes to a SavedModel or
server as a PNG of its upright pixels).
"""

import base64
import dataclasses
import json
import os
import re
import urllib.error
import urllib.request

import numpy as np

from zfkeras import data, images
from zfkeras.errors import Error

REQUEST_FORMATS = ("row", "columnar")
_SERVER_URL = re.compile(r"^https?://[^/\s]+/v1/models/[^/:\s]+(/(versions/\d+|labels/[^/:\s]+))?$")


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """What `predict` classifies, and with what.

    Attributes:
        images: image file paths.
        model_path: a SavedModel (version or model folder) or a .tflite file.
        server: a TF Serving REST model URL (instead of model_path).
        top_k: classes per image (at most what the model returns).
        request_format: 'row' or 'columnar' REST request.
        batch_size: images per request / call.
        timeout: seconds per REST request.
    """

    images: tuple
    model_path: str = ""
    server: str = ""
    top_k: int = 5
    request_format: str = "row"
    batch_size: int = 32
    timeout: float = 30.0

    def __post_init__(self):
        if bool(self.model_path) == bool(self.server):
            raise Error("give exactly one of a model path and a server URL")
        if self.request_format not in REQUEST_FORMATS:
            raise Error(
                f"unknown request format {self.request_format!r}; valid: "
                f"{', '.join(REQUEST_FORMATS)}"
            )
        if self.top_k < 1 or self.batch_size < 1 or not self.timeout > 0:
            raise Error("top_k, batch_size and timeout must be positive")
        if not self.images:
            raise Error("no images given")


def _records(paths, classes, names, probabilities, top_k):
    out = []
    for path, c, n, p in zip(paths, classes, names, probabilities):
        out.append(
            {
                "image": path,
                "classes": [int(v) for v in c[:top_k]],
                "class_names": [v.decode() if isinstance(v, bytes) else str(v) for v in n[:top_k]],
                "probabilities": [float(v) for v in p[:top_k]],
            }
        )
    return out


# ---------------------------------------------------------------------------
# REST requests and responses (TF Serving's documented JSON forms).


def predict_request(signature, inputs, request_format="row"):
    """The JSON body of a TF Serving `:predict` request.

    Args:
        signature: the signature name.
        inputs: {input name: list of per-example values}; bytes values are
            sent as {"b64": ...}.
        request_format: 'row' ({"instances": [...]}) or 'columnar'
            ({"inputs": {...}}).
    """

    def encode(value):
        if isinstance(value, bytes):
            return {"b64": base64.b64encode(value).decode("ascii")}
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        return value

    columns = {name: [encode(v) for v in values] for name, values in inputs.items()}
    if request_format == "columnar":
        if len(columns) == 1:
            return {"signature_name": signature, "inputs": next(iter(columns.values()))}
        return {"signature_name": signature, "inputs": columns}
    count = len(next(iter(columns.values())))
    if len(columns) == 1:
        instances = next(iter(columns.values()))
    else:
        instances = [{name: values[i] for name, values in columns.items()} for i in range(count)]
    return {"signature_name": signature, "instances": instances}


def parse_predict_response(body, output_names=None):
    """{output name: list per example} from a row or columnar `:predict` response.

    Args:
        body: the decoded JSON response.
        output_names: names to use when a row response holds bare values
            (a signature with a single output).
    """
    if "predictions" in body:
        rows = body["predictions"]
        if rows and isinstance(rows[0], dict):
            return {name: [row[name] for row in rows] for name in rows[0]}
        name = (output_names or ["output"])[0]
        return {name: rows}
    if "outputs" in body:
        outputs = body["outputs"]
        if isinstance(outputs, dict):
            return outputs
        return {(output_names or ["output"])[0]: outputs}
    raise Error("the server's response has neither 'predictions' nor 'outputs'")


_TF_NOISE = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[")


def short_error(message, limit=300):
    """The informative lines of a TensorFlow error message, on one line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_TF_NOISE)] or lines
    return " ".join(" ".join(useful).split())[:limit]


def _post(url, body, timeout):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read().decode("utf-8")).get("error", "")
        except (ValueError, AttributeError):
            message = ""
        message = short_error(message) or e.reason
        raise Error(f"{url}: HTTP {e.code}: {message}") from None
    except urllib.error.URLError as e:
        raise Error(f"{url}: cannot connect ({e.reason})") from None
    except TimeoutError:
        raise Error(f"{url}: no answer within {timeout:g} s") from None
    except ValueError as e:
        raise Error(f"{url}: the response is not JSON ({e})") from None


# ---------------------------------------------------------------------------
# Backends.


def _read_all(paths):
    """Reads every file (one-line Error naming a bad one); returns the bytes to send.

    A file's own bytes, or a PNG of its pixels where `serving_default` alone
    would read it differently (TIFF, EXIF orientation): see
    `zfkeras.images.encode_for_serving`.
    """
    return [images.encode_for_serving(path) for path in paths]


def _classify_rest(config, paths, contents):
    server = config.server.rstrip("/")
    if not _SERVER_URL.match(server):
        raise Error(
            f"{config.server}: not a TF Serving model URL "
            "(http://host:port/v1/models/NAME[/versions/N])"
        )
    url = f"{server}:predict"
    records = []
    for start in range(0, len(contents), config.batch_size):
        part = slice(start, start + config.batch_size)
        body = predict_request("serving_default", {"images": contents[part]}, config.request_format)
        outputs = parse_predict_response(_post(url, body, config.timeout))
        missing = [k for k in ("classes", "class_names", "probabilities") if k not in outputs]
        if missing:
            raise Error(f"{url}: the response lacks {', '.join(missing)}")
        records += _records(
            paths[part],
            outputs["classes"],
            outputs["class_names"],
            outputs["probabilities"],
            config.top_k,
        )
    return records


def _classify_savedmodel(config, paths, contents):
    import tensorflow as tf

    from zfkeras_export import savedmodel

    path = savedmodel.resolve_version_dir(config.model_path)
    try:
        loaded = tf.saved_model.load(path)
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise Error(
            f"{path}: cannot load the SavedModel ({' '.join(str(e).split())[:200]})"
        ) from None
    if savedmodel.DEFAULT_SIGNATURE not in loaded.signatures:
        raise Error(f"{path}: no serving_default signature")
    signature = loaded.signatures[savedmodel.DEFAULT_SIGNATURE]
    records = []
    for start in range(0, len(contents), config.batch_size):
        part = slice(start, start + config.batch_size)
        try:
            out = signature(images=tf.constant(contents[part], tf.string))
        except tf.errors.InvalidArgumentError as e:
            raise Error(f"{path}: {short_error(e.message)}") from None
        records += _records(
            paths[part],
            out["classes"].numpy(),
            out["class_names"].numpy(),
            out["probabilities"].numpy(),
            config.top_k,
        )
    return records


def read_litert_sidecar(model_path):
    """(Preprocessing, mean, class names) from the files beside an exported .tflite."""
    folder = os.path.dirname(os.path.abspath(model_path))
    try:
        with open(os.path.join(folder, "preprocessing.json")) as f:
            settings = json.load(f)
        mean = np.load(os.path.join(folder, settings.pop("mean_file", "mean.npy")))
        with open(os.path.join(folder, "labels.txt"), encoding="utf-8") as f:
            names = tuple(line.rstrip("\n") for line in f)
        preprocessing = data.Preprocessing(**settings)
    except (OSError, ValueError, TypeError) as e:
        raise Error(
            f"{folder}: missing or bad preprocessing.json / mean.npy / labels.txt beside the "
            f".tflite ({e})"
        ) from None
    return preprocessing, mean.astype(np.float32), names


def _classify_litert(config, paths):
    from zfkeras_export import litert

    if not os.path.isfile(config.model_path):
        raise Error(f"{config.model_path}: no such file")
    preprocessing, mean, names = read_litert_sidecar(config.model_path)
    runner = litert.Runner(litert.interpreter(model_path=config.model_path))
    views = np.stack([data.eval_view(images.read_image(p), preprocessing) for p in paths])
    inputs = data.subtract_mean(views, preprocessing, mean)
    probabilities = runner(batch_size=config.batch_size, inputs=inputs)["probabilities"]
    if probabilities.shape[1] != len(names):
        raise Error(
            f"{config.model_path}: {probabilities.shape[1]} classes but "
            f"{len(names)} labels in labels.txt"
        )
    order = np.argsort(-probabilities, axis=1, kind="stable")
    top = np.take_along_axis(probabilities, order, axis=1)
    return _records(paths, order, np.array(names, dtype=object)[order], top, config.top_k)


def predict(config):
    """Classifies `config.images`; returns one record per image (module docstring).

    Raises:
        Error: a bad image file, model path, server URL or server answer.
    """
    paths = list(config.images)
    if config.server:
        return _classify_rest(config, paths, _read_all(paths))
    if config.model_path.endswith(".tflite"):
        return _classify_litert(config, paths)
    if not os.path.isdir(config.model_path):
        raise Error(f"{config.model_path}: no such SavedModel folder or .tflite file")
    return _classify_savedmodel(config, paths, _read_all(paths))


def format_table(records):
    """A plain-text table: image, best class, probability, the other top-k."""
    width = max([len("image")] + [len(r["image"]) for r in records])
    lines = [f"{'image':<{width}}  {'class':<24} {'p':>6}  others"]
    for r in records:
        best = f"{r['class_names'][0]} ({r['classes'][0]})"
        others = ", ".join(
            f"{n} {p:.3f}" for n, p in zip(r["class_names"][1:], r["probabilities"][1:])
        )
        lines.append(f"{r['image']:<{width}}  {best:<24} {r['probabilities'][0]:6.3f}  {others}")
    return "\n".join(lines)
