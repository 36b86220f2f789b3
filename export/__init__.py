"""Serving and export code, installed as the package `zfkeras_export`.

- `source`: the run (or .keras) to export, checked to be a zfkeras ZFNet/AlexNet.
- `graph`: the TF functions served (in-graph preprocessing, top-k, deconvnet).
- `builtin_pool`: max-pool switches and unpooling from TFLite builtin ops.
- `savedmodel`: the SavedModel signatures and TF Serving's folder layout.
- `litert`: float32 / float16 / dynamic-range / int8 .tflite models, op checks,
  a batched signature runner.
- `verify`: parity with Keras and `zfkeras.deconv` (fresh process), test-split
  agreement; `reload_check.py` is the plain-TensorFlow reloader it runs.
- `exporter`: `export(ExportConfig)`, the whole verified export (tools/export.py).
- `client`: classifying files with a SavedModel, a .tflite or TF Serving's REST
  API (tools/predict.py).

Nothing here imports `absl.flags`.
"""
