"""LiteRT (TFLite) models of the classifier and the deconvnet, builtin ops only.

Variants (`VARIANTS`):

- float32: the classifier as signature `serving_default` (inputs float32
  (N, crop, crop, C) preprocessed -> probabilities (N, classes)) and the
  deconvnet as `deconv_convL` (inputs, feature_map int32 (N,) ->
  projections, activations, positions, boxes), switches from
  `builtin_pool`.
- float16: float16 weights, float compute (classifier only).
- dynamic_range: int8 weights, activations quantized on the fly.
- int8: full-integer quantization from representative model inputs (the
  training split through the run's evaluation preprocessing), int8 input and
  output (their scale and zero point are in the input/output details).
  TFLite has no integer local response normalisation kernel: the converter
  keeps the two ContrastNorm layers in float between DEQUANTIZE and
  QUANTIZE; everything else runs in int8.

Every model is converted with `TFLITE_BUILTINS` (or `TFLITE_BUILTINS_INT8`)
only and its operator codes are read back from the flatbuffer: a custom or
Flex op fails the export, since the Python runtimes here have no Flex
delegate. Image decoding is not in the models (a Flex op): clients decode,
resize and subtract the mean themselves (`preprocessing.json`, `mean.npy`
beside the models).
"""

import collections
import contextlib
import functools
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema

from zfkeras import layers as zlayers
from zfkeras import quiet
from zfkeras.errors import Error
from zfkeras_export import savedmodel

VARIANTS = ("float32", "float16", "dynamic_range", "int8")
CLASSIFY_SIGNATURE = "serving_default"
_BUILTIN_NAMES = {
    value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")
}


def model_file(variant):
    """File name of a variant: 'model_int8.tflite'."""
    return f"model_{variant}.tflite"


def _build_lite_archive(serving_graph):
    g = serving_graph
    crop, channels = g.preprocessing.crop_size, g.preprocessing.channels
    inputs_spec = tf.TensorSpec([None, crop, crop, channels], tf.float32, name="inputs")
    feature_map_spec = tf.TensorSpec([None], tf.int32, name="feature_map")
    archive = keras.export.ExportArchive()
    archive.add_endpoint(
        CLASSIFY_SIGNATURE, lambda inputs: {"probabilities": g.probabilities(inputs)}, [inputs_spec]
    )
    for layer in g.source.conv_layers:
        archive.add_endpoint(
            savedmodel.deconv_signature(layer),
            functools.partial(g.deconv, layer_name=layer, check=False),
            [inputs_spec, feature_map_spec],
        )
    return archive


@contextlib.contextmanager
def lite_savedmodel(serving_graph):
    """A temporary SavedModel of the TFLite signatures (float inputs, no asserts)."""
    with tempfile.TemporaryDirectory(prefix="zfkeras-litert-") as folder:
        path = os.path.join(folder, "savedmodel")
        # TFLite builtins: the LRN op and direct convolutions (XNNPACK's).
        with serving_graph.using_ops(zlayers.BUILTIN):
            _build_lite_archive(serving_graph).write_out(path, verbose=False)
        yield path


def operators(model_content):
    """{operator name: count} of a .tflite flatbuffer; custom ops as 'CUSTOM:name'."""
    model = schema.Model.GetRootAs(model_content, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = _BUILTIN_NAMES.get(builtin, str(builtin))
        if name == "CUSTOM":
            custom = code.CustomCode()
            name = f"CUSTOM:{custom.decode() if custom else '?'}"
        codes.append(name)
    counts = collections.Counter()
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            counts[codes[subgraph.Operators(o).OpcodeIndex()]] += 1
    return dict(sorted(counts.items()))


def check_builtins(model_content, what):
    """Raises Error if a .tflite uses a custom or Select-TF (Flex) op."""
    ops = operators(model_content)
    bad = sorted(name for name in ops if name.startswith("CUSTOM"))
    if bad:
        raise Error(
            f"{what}: uses non-builtin ops ({', '.join(bad)}); the LiteRT runtimes here have "
            "no Flex delegate"
        )
    return ops


def convert(savedmodel_path, variant, conv_layers, representative=None):
    """Converts the lite SavedModel to one variant; returns the .tflite bytes.

    Args:
        savedmodel_path: from `lite_savedmodel`.
        variant: one of `VARIANTS`.
        conv_layers: conv layers whose deconv signatures go into float32.
        representative: for int8, a callable yielding lists of one float32
            model-input batch.

    Raises:
        Error: conversion failure (e.g. an op with no builtin kernel), or a
            non-builtin op in the result.
    """
    if variant not in VARIANTS:
        raise Error(f"unknown LiteRT variant {variant!r}; valid: {', '.join(VARIANTS)}")
    keys = [CLASSIFY_SIGNATURE]
    if variant == "float32":
        keys += [savedmodel.deconv_signature(layer) for layer in conv_layers]
    converter = tf.lite.TFLiteConverter.from_saved_model(savedmodel_path, signature_keys=keys)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if representative is None:
            raise Error("the int8 model needs representative data (the training split)")
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        with quiet.stderr_silenced():
            content = converter.convert()
    except Exception as e:  # The converter raises many types; report one line.
        text = " ".join(str(e).split())[:300] or type(e).__name__
        raise Error(f"LiteRT {variant} conversion failed: {text}") from None
    check_builtins(content, f"LiteRT {variant} model")
    return content


# ---------------------------------------------------------------------------
# Running .tflite models.


def interpreter(model_path=None, model_content=None, num_threads=None):
    """An `ai_edge_litert` interpreter (or `tf.lite.Interpreter` without it)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - the package is an optional extra.
        Interpreter = tf.lite.Interpreter
    try:
        return Interpreter(
            model_path=model_path, model_content=model_content, num_threads=num_threads
        )
    except (ValueError, RuntimeError) as e:
        what = model_path or "model"
        raise Error(
            f"{what}: cannot load LiteRT model ({' '.join(str(e).split())[:200]})"
        ) from None


class Runner:
    """Runs one signature of a .tflite in batches, (de)quantizing int8 I/O.

    Args:
        lite: an interpreter from `interpreter()`.
        signature: a signature key.
    """

    def __init__(self, lite, signature=CLASSIFY_SIGNATURE):
        available = lite.get_signature_list()
        if signature not in available:
            raise Error(f"LiteRT model has no signature {signature!r} ({', '.join(available)})")
        self._runner = lite.get_signature_runner(signature)
        self.signature = signature
        self.input_details = self._runner.get_input_details()
        self.output_details = self._runner.get_output_details()
        self._started = False

    def _check(self, name, value):
        detail = self.input_details.get(name)
        if detail is None:
            raise Error(
                f"signature {self.signature!r} has no input {name!r} "
                f"(inputs: {', '.join(self.input_details)})"
            )
        spec = tuple(int(d) for d in detail["shape_signature"])
        shape = value.shape
        fits = len(shape) == len(spec) and all(e in (-1, d) for e, d in zip(spec, shape))
        dtype = np.dtype(detail["dtype"])
        quantized = bool(detail["quantization"][0]) and np.issubdtype(value.dtype, np.floating)
        if not fits or not (value.dtype == dtype or quantized):
            wanted = ", ".join("batch" if e == -1 else str(e) for e in spec)
            raise Error(
                f"input {name!r} of {self.signature!r} must be {dtype.name} ({wanted}); "
                f"got {value.dtype.name} {tuple(shape)}"
            )

    def _quantize(self, name, value):
        detail = self.input_details[name]
        dtype = detail["dtype"]
        scale, zero = detail["quantization"]
        if np.issubdtype(dtype, np.integer) and scale and np.issubdtype(value.dtype, np.floating):
            info = np.iinfo(dtype)
            value = np.clip(np.round(value / scale + zero), info.min, info.max)
        return np.ascontiguousarray(value, dtype)

    def _dequantize(self, name, value):
        scale, zero = self.output_details[name]["quantization"]
        if np.issubdtype(value.dtype, np.integer) and scale:
            return (value.astype(np.float32) - zero) * np.float32(scale)
        return value

    def __call__(self, batch_size=256, **inputs):
        """Runs the signature on NumPy inputs (all of the same length); dict of outputs."""
        inputs = {name: np.asarray(value) for name, value in inputs.items()}
        for name, value in inputs.items():
            self._check(name, value)
        count = len(next(iter(inputs.values())))
        parts = collections.defaultdict(list)
        for start in range(0, count, batch_size):
            chunk = {
                name: self._quantize(name, value[start : start + batch_size])
                for name, value in inputs.items()
            }
            if self._started:
                outputs = self._runner(**chunk)
            else:
                with quiet.stderr_silenced():  # The XNNPACK delegate announces itself.
                    outputs = self._runner(**chunk)
                self._started = True
            for name, value in outputs.items():
                parts[name].append(self._dequantize(name, value))
        return {name: np.concatenate(values) for name, values in parts.items()}
