"""Checks of the exported artifacts against the Keras model and the library.

- `parity_examples`: small deterministic inputs for every signature: image
  files of every kind the serving graph decodes (grayscale, RGB, alpha,
  JPEG, BMP, GIF, odd sizes), a pixel batch, and their references through
  `zfkeras.images.read_image`, `zfkeras.data.eval_view` and `subtract_mean`.
- `check_savedmodel`: reloads the SavedModel in a fresh process (plain
  TensorFlow, `reload_check.py`), runs every signature at two batch sizes,
  and compares with the Keras model (1e-5) and `zfkeras.deconv` (1e-5 of the
  projection's scale); corrupt bytes must give InvalidArgument.
- `check_litert_deconv`: the float32 .tflite deconv signatures against the
  library (1e-4 of the scale).
- `SplitVerifier`: streams a dataset split through the Keras model, the
  SavedModel and each LiteRT variant: max |p - p_SavedModel|, top-1
  agreement with the float model, accuracy.
"""

import dataclasses
import io
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf
from PIL import Image

from zfkeras import data, deconv, images
from zfkeras.errors import Error
from zfkeras_export import client, litert, savedmodel

PROBABILITY_TOLERANCE = 1e-5  # SavedModel vs Keras.
# Deconv vs the library, times the projection's scale: five transposed
# convolutions sum many float32 terms; kernels differ in summation order
# with the batch size and the process (measured up to ~2e-5 on conv5).
PROJECTION_TOLERANCE = 1e-4
LITE_FLOAT_TOLERANCE = 1e-4  # float32 .tflite vs the SavedModel.
INT8_MIN_AGREEMENT = 99.0  # % top-1 agreement of int8 with float.
INT8_MAX_ACCURACY_DROP = 1.0  # accuracy points.
_RELOAD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reload_check.py")
_RELOAD_TIMEOUT_S = 900


# ---------------------------------------------------------------------------
# Parity inputs.


@dataclasses.dataclass(frozen=True)
class ParityExamples:
    """Inputs for every signature and their library references.

    Attributes:
        encoded: list of encoded image bytes (serving_default, deconv).
        views: uint8 (N, crop, crop, C) their centre views (the library's).
        inputs: float32 (N, crop, crop, C) their model inputs.
        pixels: uint8 (M, H, W, C) a raw pixel batch.
        pixel_inputs: float32 (M, crop, crop, C) its model inputs.
        feature_maps: {conv layer: int32 (N,)} maps to project per image.
    """

    encoded: list
    views: np.ndarray
    inputs: np.ndarray
    pixels: np.ndarray
    pixel_inputs: np.ndarray
    feature_maps: dict


def _smooth_image(rng, height, width, channels):
    """A smooth random uint8 image (upsampled noise): like a photo, not like static."""
    coarse = rng.uniform(0, 255, (height // 6 + 2, width // 6 + 2, channels))
    image = tf.image.resize(coarse[None], (height, width), method="bicubic")[0].numpy()
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _encode(array, kind, mode):
    buffer = io.BytesIO()
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array, mode)
    if kind == "GIF":
        image = image.convert("P")
    image.save(buffer, format=kind, **({"quality": 92} if kind == "JPEG" else {}))
    return buffer.getvalue()


def sample_images(seed=0):
    """Encoded test images of every kind the serving graph reads: [(name, bytes)]."""
    rng = np.random.default_rng(seed)
    kinds = [
        ("gray.png", 30, 44, 1, "PNG", "L"),
        ("rgb.png", 64, 48, 3, "PNG", "RGB"),
        ("rgba.png", 50, 70, 4, "PNG", "RGBA"),
        ("gray_alpha.png", 41, 33, 2, "PNG", "LA"),
        ("photo.jpg", 90, 120, 3, "JPEG", "RGB"),
        ("gray.jpg", 57, 57, 1, "JPEG", "L"),
        ("rgb.bmp", 36, 52, 3, "BMP", "RGB"),
        ("anim.gif", 45, 40, 3, "GIF", "RGB"),
    ]
    out = []
    for name, height, width, channels, kind, mode in kinds:
        array = _smooth_image(rng, height, width, channels)
        out.append((name, _encode(array, kind, mode)))
    return out


def parity_examples(serving_graph, seed=0):
    """Builds `ParityExamples` for a `ServingGraph` (references from the library)."""
    source = serving_graph.source
    pre = source.preprocessing
    samples = sample_images(seed)
    views = []
    with tempfile.TemporaryDirectory(prefix="zfkeras-parity-") as folder:
        for name, encoded in samples:
            path = os.path.join(folder, name)
            with open(path, "wb") as f:
                f.write(encoded)
            views.append(data.eval_view(images.read_image(path), pre))
    views = np.stack(views)
    inputs = data.subtract_mean(views, pre, source.mean)
    rng = np.random.default_rng(seed + 1)
    pixels = np.stack([_smooth_image(rng, 47, 61, pre.channels) for _ in range(5)])
    pixel_views = np.stack([data.eval_view(p, pre) for p in pixels])
    pixel_inputs = data.subtract_mean(pixel_views, pre, source.mean)
    dn = serving_graph.deconvnet
    activations = dn.activations(inputs, source.conv_layers)
    feature_maps = {}
    for layer in source.conv_layers:
        strongest = deconv.strongest_channels(activations[layer], 1)[:, 0]
        # Every other image gets an arbitrary map (maybe dead: a zero projection).
        arbitrary = (np.arange(len(inputs)) * 7) % dn.num_channels(layer)
        chosen = np.where(np.arange(len(inputs)) % 2 == 0, strongest, arbitrary)
        feature_maps[layer] = chosen.astype(np.int32)
    return ParityExamples(
        encoded=[encoded for _, encoded in samples],
        views=views,
        inputs=inputs,
        pixels=pixels,
        pixel_inputs=pixel_inputs,
        feature_maps=feature_maps,
    )


# ---------------------------------------------------------------------------
# SavedModel parity in a fresh process.


def _reload(request, what):
    with tempfile.TemporaryDirectory(prefix="zfkeras-reload-") as folder:
        request_path = os.path.join(folder, "request.pkl")
        result_path = os.path.join(folder, "result.pkl")
        with open(request_path, "wb") as f:
            pickle.dump(request, f)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        try:
            done = subprocess.run(
                [sys.executable, "-I", _RELOAD_SCRIPT, request_path, result_path],
                env=env,
                capture_output=True,
                text=True,
                timeout=_RELOAD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise Error(f"{what}: reloading timed out after {_RELOAD_TIMEOUT_S} s") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise Error(f"{what}: reload in a fresh process failed ({lines[-1] if lines else ''})")
        with open(result_path, "rb") as f:
            return pickle.load(f)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _projection_error(actual, expected):
    """max |actual - expected| over the scale of `expected` (per request)."""
    scale = np.abs(expected).reshape(len(expected), -1).max(axis=1)
    error = np.abs(actual - expected).reshape(len(expected), -1).max(axis=1)
    return float(np.max(error / np.maximum(scale, 1e-12)))


def check_savedmodel(path, serving_graph, examples, batch_sizes=(1, 8), label=None):
    """Reloads `path` in a fresh process and checks every signature.

    Args:
        path: the SavedModel folder.
        serving_graph: the `ServingGraph` it was written from.
        examples: `ParityExamples`.
        batch_sizes: two batch sizes each signature is run at.
        label: the name used in error messages (default: `path`).

    Returns:
        dict of the numbers (max differences per signature) for the record.

    Raises:
        Error: a difference above tolerance, a missing signature, a corrupt
            image that did not fail with InvalidArgument, or zfkeras modules
            imported by the reload.
    """
    source = serving_graph.source
    model = source.model
    encoded = examples.encoded
    where = label or path
    calls, invalid = [], []
    for b in batch_sizes:
        calls.append((f"images/{b}", savedmodel.DEFAULT_SIGNATURE, {"images": encoded}, b))
        calls.append((f"inputs/{b}", savedmodel.INPUTS_SIGNATURE, {"inputs": examples.inputs}, b))
        calls.append((f"pixels/{b}", savedmodel.PIXELS_SIGNATURE, {"pixels": examples.pixels}, b))
        for layer in source.conv_layers:
            inputs = {"images": encoded, "feature_map": examples.feature_maps[layer]}
            calls.append((f"{layer}/{b}", savedmodel.deconv_signature(layer), inputs, b))
    invalid.append(
        ("corrupt", savedmodel.DEFAULT_SIGNATURE, {"images": [encoded[0], b"not an image"]})
    )
    invalid.append(
        (
            "truncated",
            savedmodel.DEFAULT_SIGNATURE,
            {"images": [encoded[1][: len(encoded[1]) // 3]]},
        )
    )
    crop, channels = source.input_shape[0], source.input_shape[2]
    wrong = np.zeros((1, crop + 1, crop, channels), np.float32)
    invalid.append(("wrong_shape", savedmodel.INPUTS_SIGNATURE, {"inputs": wrong}))
    result = _reload({"saved_model": path, "calls": calls, "invalid": invalid}, where)

    if result["zfkeras_modules"]:
        raise Error(f"{where}: reloading imported {', '.join(result['zfkeras_modules'])}")
    missing = sorted(
        set(savedmodel.signature_names(source.conv_layers)) - set(result["signatures"])
    )
    if missing:
        raise Error(f"{where}: signatures missing after reload: {', '.join(missing)}")

    expected = {
        "images": np.asarray(model(examples.inputs, training=False)),
        "inputs": np.asarray(model(examples.inputs, training=False)),
        "pixels": np.asarray(model(examples.pixel_inputs, training=False)),
    }
    k = serving_graph.top_k
    names = np.array(source.class_names, dtype=object)
    numbers = {}
    for key, reference in expected.items():
        worst = 0.0
        for b in batch_sizes:
            out = result["outputs"][f"{key}/{b}"]
            worst = max(worst, _max_diff(out["all_probabilities"], reference))
            top = np.take_along_axis(reference, out["classes"].astype(np.int64), axis=1)
            worst = max(worst, _max_diff(out["probabilities"], top))
            if out["classes"].shape != (len(reference), k) or not np.all(
                out["class_names"].astype(str) == names[out["classes"]].astype(str)
            ):
                raise Error(f"{where}: {key} signature returns inconsistent classes and names")
            if not np.all(np.diff(out["probabilities"], axis=1) <= 0):
                raise Error(f"{where}: {key} signature's top-k is not sorted")
        numbers[f"{key}_max_abs_diff"] = worst
        if worst > PROBABILITY_TOLERANCE:
            raise Error(
                f"{where}: {key} signature differs from the Keras model by {worst:.3g} "
                f"(tolerance {PROBABILITY_TOLERANCE:g})"
            )

    dn = serving_graph.deconvnet
    indices = np.arange(len(examples.inputs))
    for layer in source.conv_layers:
        reference = dn.project(examples.inputs, indices, layer, examples.feature_maps[layer])
        worst = 0.0
        for b in batch_sizes:
            out = result["outputs"][f"{layer}/{b}"]
            if not np.array_equal(out["views"], examples.views):
                raise Error(f"{where}: deconv_{layer} views differ from zfkeras.data.eval_view")
            if not (
                np.array_equal(out["positions"], reference.positions)
                and np.array_equal(out["boxes"], reference.boxes)
            ):
                raise Error(f"{where}: deconv_{layer} positions/boxes differ from zfkeras.deconv")
            worst = max(worst, _projection_error(out["projections"], reference.projections))
            scale = max(float(np.abs(reference.values).max()), 1e-12)
            worst = max(worst, _max_diff(out["activations"], reference.values) / scale)
        numbers[f"deconv_{layer}_relative_error"] = worst
        if worst > PROJECTION_TOLERANCE:
            raise Error(
                f"{where}: deconv_{layer} differs from zfkeras.deconv by {worst:.3g} of the "
                f"projection's scale (tolerance {PROJECTION_TOLERANCE:g})"
            )

    for key, error in result["errors"].items():
        if error is None or error[0] != "InvalidArgumentError":
            got = "no error" if error is None else error[0]
            raise Error(
                f"{where}: a {key.replace('_', ' ')} request gave {got}, not InvalidArgument"
            )
    if "must be" not in result["errors"]["wrong_shape"][1]:
        raise Error(f"{where}: a wrongly shaped input is refused without naming the expected spec")
    numbers["batch_sizes"] = list(batch_sizes)
    numbers["invalid_requests"] = {
        k: client.short_error(v[1], limit=160) for k, v in result["errors"].items()
    }
    return numbers


# ---------------------------------------------------------------------------
# LiteRT.


def check_litert_deconv(content, serving_graph, examples):
    """The float32 .tflite deconv signatures against `zfkeras.deconv`.

    Returns:
        {layer: relative error}. Raises Error above `LITE_FLOAT_TOLERANCE`.
    """
    source = serving_graph.source
    lite = litert.interpreter(model_content=content)
    dn = serving_graph.deconvnet
    indices = np.arange(len(examples.inputs))
    numbers = {}
    for layer in source.conv_layers:
        runner = litert.Runner(lite, savedmodel.deconv_signature(layer))
        out = runner(inputs=examples.inputs, feature_map=examples.feature_maps[layer])
        reference = dn.project(examples.inputs, indices, layer, examples.feature_maps[layer])
        error = _projection_error(out["projections"], reference.projections)
        if not np.array_equal(out["positions"], reference.positions):
            raise Error(f"LiteRT deconv_{layer}: positions differ from zfkeras.deconv")
        numbers[layer] = error
        if error > LITE_FLOAT_TOLERANCE:
            raise Error(
                f"LiteRT deconv_{layer} differs from zfkeras.deconv by {error:.3g} of the "
                f"projection's scale (tolerance {LITE_FLOAT_TOLERANCE:g})"
            )
    return numbers


class SplitVerifier:
    """Accumulates agreement and accuracy of every artifact over a split.

    The float reference is the SavedModel (compared itself with Keras), or
    the Keras model when no SavedModel is exported; every LiteRT variant is
    compared with the reference (max |p - p_ref|, top-1 agreement) and the
    labels (accuracy, and its drop from the reference's).

    Args:
        model: the Keras model.
        savedmodel_path: the written SavedModel (or None): its
            classify_inputs is the float reference; the Keras model otherwise.
        lite_models: {variant: .tflite bytes}.
    """

    def __init__(self, model, savedmodel_path, lite_models):
        self._model = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        self._savedmodel = None
        if savedmodel_path:
            loaded = tf.saved_model.load(savedmodel_path)
            self._savedmodel = loaded.signatures[savedmodel.INPUTS_SIGNATURE]
            self._loaded = loaded  # Keeps the signature's variables alive.
        self._runners = {
            variant: litert.Runner(litert.interpreter(model_content=content))
            for variant, content in lite_models.items()
        }
        self.count = 0
        self._correct = {}
        self._agree = {}
        self._diff = {}

    def _add(self, name, probabilities, reference, labels):
        predicted = probabilities.argmax(axis=1)
        self._correct[name] = self._correct.get(name, 0) + int((predicted == labels).sum())
        agree = int((predicted == reference.argmax(axis=1)).sum())
        self._agree[name] = self._agree.get(name, 0) + agree
        self._diff[name] = max(self._diff.get(name, 0.0), _max_diff(probabilities, reference))

    def update(self, inputs, labels):
        """Adds one batch: float32 model inputs and int labels."""
        inputs = np.asarray(inputs, np.float32)
        labels = np.asarray(labels)
        keras_p = np.asarray(self._model(tf.constant(inputs)))
        reference = keras_p
        if self._savedmodel is not None:
            reference = self._savedmodel(inputs=tf.constant(inputs))["all_probabilities"].numpy()
            self._add("savedmodel", reference, keras_p, labels)  # Compared with Keras.
        else:
            self._add("keras", keras_p, keras_p, labels)
        for variant, runner in self._runners.items():
            self._add(variant, runner(inputs=inputs)["probabilities"], reference, labels)
        self.count += len(labels)

    def results(self):
        """{artifact: {examples, accuracy, accuracy_drop, top1_agreement, max_abs_diff}}.

        The reference comes first ('savedmodel', else 'keras'), then the
        LiteRT variants.
        """
        if not self.count:
            raise Error("the verification split is empty")
        float_name = "savedmodel" if self._savedmodel is not None else "keras"
        float_accuracy = 100.0 * self._correct[float_name] / self.count
        out = {}
        for name in self._correct:
            accuracy = 100.0 * self._correct[name] / self.count
            out[name] = {
                "examples": self.count,
                "accuracy": accuracy,
                "accuracy_drop": float_accuracy - accuracy,
                "top1_agreement": 100.0 * self._agree[name] / self.count,
                "max_abs_diff": self._diff[name],
            }
        return out


def judge(results):
    """Raises Error if a verified artifact misses its bar (module constants)."""
    problems = []
    saved = results.get("savedmodel")
    if saved and saved["max_abs_diff"] > PROBABILITY_TOLERANCE:
        problems.append(
            f"SavedModel differs from Keras by {saved['max_abs_diff']:.3g} "
            f"(> {PROBABILITY_TOLERANCE:g})"
        )
    lite = results.get("float32")
    if lite and lite["max_abs_diff"] > LITE_FLOAT_TOLERANCE:
        problems.append(
            f"float32 LiteRT differs by {lite['max_abs_diff']:.3g} (> {LITE_FLOAT_TOLERANCE:g})"
        )
    int8 = results.get("int8")
    if int8 and int8["top1_agreement"] < INT8_MIN_AGREEMENT:
        problems.append(
            f"int8 top-1 agreement {int8['top1_agreement']:.2f} % (< {INT8_MIN_AGREEMENT:g} %)"
        )
    if int8 and int8["accuracy_drop"] > INT8_MAX_ACCURACY_DROP:
        problems.append(
            f"int8 accuracy drop {int8['accuracy_drop']:.2f} points (> {INT8_MAX_ACCURACY_DROP:g})"
        )
    if problems:
        raise Error("verification failed: " + "; ".join(problems))
