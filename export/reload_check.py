"""Runs requests against a SavedModel reloaded by plain TensorFlow, in a fresh process.

    python reload_check.py REQUESTS.pkl RESULTS.pkl

The exporter runs this file by path in a new interpreter, so the SavedModel
is read back from disk with nothing from zfkeras imported (the results say
which modules were loaded). REQUESTS (written by `zfkeras_export.verify`):

    {"saved_model": path,
     "calls": [(key, signature, {input: array or list of bytes}, batch_size)],
     "invalid": [(key, signature, {input: array or list of bytes})]}

Each call is run in batches of `batch_size` and its outputs concatenated;
each invalid request must fail, and its error type and message are recorded.
RESULTS: {"signatures": {name: {"inputs": {key: [dtype, shape]}, "outputs":
{key: [dtype, shape]}}}, "outputs": {key: {output: array}}, "errors": {key:
[type, message]}, "zfkeras_modules": [names]}.

Only the standard library, NumPy and TensorFlow are imported here.
"""

import os
import pickle
import sys


def _spec(spec):
    shape = None if spec.shape.rank is None else [d for d in spec.shape.as_list()]
    return [spec.dtype.name, shape]


def _tensor(tf, value, dtype):
    if dtype == tf.string:
        return tf.constant(list(value), tf.string)
    return tf.constant(value, dtype)


def _describe(function):
    _, inputs = function.structured_input_signature
    outputs = function.structured_outputs
    return {
        "inputs": {k: _spec(v) for k, v in inputs.items()},
        "outputs": {k: _spec(v) for k, v in outputs.items()},
    }


def _call(tf, function, inputs):
    _, specs = function.structured_input_signature
    tensors = {k: _tensor(tf, v, specs[k].dtype) for k, v in inputs.items()}
    return {k: v.numpy() for k, v in function(**tensors).items()}


def main(argv):
    if len(argv) != 3:
        sys.stderr.write("usage: reload_check.py REQUESTS.pkl RESULTS.pkl\n")
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    with open(argv[1], "rb") as f:
        request = pickle.load(f)
    loaded = tf.saved_model.load(request["saved_model"])
    signatures = loaded.signatures
    results = {
        "signatures": {name: _describe(fn) for name, fn in signatures.items()},
        "outputs": {},
        "errors": {},
    }
    for key, name, inputs, batch_size in request["calls"]:
        count = len(next(iter(inputs.values())))
        parts = []
        for start in range(0, count, batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in inputs.items()}
            parts.append(_call(tf, signatures[name], chunk))
        results["outputs"][key] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    for key, name, inputs in request.get("invalid", ()):
        try:
            _call(tf, signatures[name], inputs)
        except Exception as e:  # Recorded for the parent to judge.
            message = getattr(e, "message", None) or str(e)
            results["errors"][key] = [type(e).__name__, message]
        else:
            results["errors"][key] = None
    results["zfkeras_modules"] = sorted(m for m in sys.modules if m.startswith("zfkeras"))
    with open(argv[2], "wb") as f:
        pickle.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
