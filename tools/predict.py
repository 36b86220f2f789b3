"""Classifies image files with an exported model, locally or through TF Serving.

    python tools/predict.py --image=a.jpg,b.png --model_path=serving/quickstart
    python tools/predict.py --image=a.jpg --model_path=serving/quickstart_litert/1/model_int8.tflite
    python tools/predict.py --image=a.jpg --server=http://localhost:8501/v1/models/quickstart

--model_path takes a SavedModel (a version folder, or the model folder: its
highest version) or an exported .tflite (its preprocessing.json, mean.npy
and labels.txt beside it); --server sends a TF Serving REST :predict request
with {"b64": ...} images. Prints a table, or JSON with --format=json.
"""

import json

from absl import flags

from zfkeras_tools import common

_IMAGE = flags.DEFINE_multi_string(
    "image", None, "Image files (JPEG, PNG, BMP, GIF, TIFF); repeat or comma-separate."
)
_MODEL_PATH = flags.DEFINE_string("model_path", "", "A SavedModel folder or a .tflite file.")
_SERVER = flags.DEFINE_string("server", "", "TF Serving REST URL: http://HOST:PORT/v1/models/NAME.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes shown per image.", 1)
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json"], "Output format.")
_REQUEST_FORMAT = flags.DEFINE_enum(
    "request_format",
    None,
    ["row", "columnar"],
    "With --server: REST body, instances (row, the default) or inputs (columnar).",
)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per request.", 1)
_TIMEOUT = flags.DEFINE_float(
    "timeout", None, "With --server: seconds per REST request (default 30).", 0.001, 3600
)

flags.mark_flag_as_required("image")
flags.register_validator(
    "image",
    lambda v: v is None or any(common.split_list(x) for x in v),
    "--image needs at least one file.",
)
flags.register_multi_flags_validator(
    ["model_path", "server"],
    lambda v: bool(v["model_path"]) != bool(v["server"]),
    "Give exactly one of --model_path and --server.",
)
flags.register_validator(
    "server",
    lambda v: not v or v.startswith(("http://", "https://")),
    "--server takes a TF Serving REST URL: http://HOST:PORT/v1/models/NAME.",
)
flags.register_multi_flags_validator(
    ["server", "request_format", "timeout"],
    lambda v: bool(v["server"]) or (v["request_format"] is None and v["timeout"] is None),
    "--request_format and --timeout are for --server only.",
)


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras_export import client

    config = client.PredictConfig(
        images=common.paths(_IMAGE.value),
        model_path=_MODEL_PATH.value,
        server=_SERVER.value,
        top_k=_TOP_K.value,
        request_format=_REQUEST_FORMAT.value or "row",
        batch_size=_BATCH.value,
        timeout=30.0 if _TIMEOUT.value is None else _TIMEOUT.value,
    )
    records = client.predict(config)
    if _FORMAT.value == "json":
        print(json.dumps(records, indent=2))
    else:
        print(client.format_table(records))


def run():
    common.run(main)


if __name__ == "__main__":
    run()
