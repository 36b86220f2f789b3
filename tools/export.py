"""Exports a trained model for serving: SavedModel (TF Serving) and LiteRT models.

    python tools/export.py --source=runs/quickstart --base_dir=serving --data_dir=/tmp/tfds

Writes <base_dir>/<model_name>/<version>/ (a SavedModel with signatures
serving_default, classify_pixels, classify_inputs and deconv_conv1..5) and
<base_dir>/<model_name>_litert/<version>/ (float32, float16, dynamic-range
and int8 .tflite files with labels.txt, preprocessing.json, mean.npy and
verification.json). Everything is checked before it is moved into place:
the SavedModel reloaded in a fresh process against Keras (1e-5, two batch
sizes) and the deconvnet, every LiteRT model on the test split (float32
within 1e-4; int8 >= 99 % top-1 agreement, <= 1 point accuracy drop).
"""

from absl import flags

from zfkeras_tools import common

_FORMATS = ("savedmodel", "float32", "float16", "dynamic_range", "int8")

_SOURCE = flags.DEFINE_string("source", None, "A training work dir or a .keras file.")
_BASE_DIR = flags.DEFINE_string("base_dir", None, "TF Serving base folder for the model.")
_MODEL_NAME = flags.DEFINE_string("model_name", "", "Model name (default: the run's folder name).")
_VERSION = flags.DEFINE_integer("version", 0, "Version number (0: one above the highest).", 0)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing version.")
_FORMATS_FLAG = flags.DEFINE_list("formats", list(_FORMATS), f"Any of {', '.join(_FORMATS)}.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes returned per image.", 1)
_SNAPSHOT = flags.DEFINE_integer("snapshot", None, "Export snapshots/epoch_NNN.keras.", 1)
_DATASET = flags.DEFINE_string("dataset", "", "Calibration/verification data (default: the run's).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data folder.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder of manually obtained dataset files.")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", "", "int8 calibration split (default: run's).")
_TEST_SPLIT = flags.DEFINE_string("test_split", "test", "Verification split.")
_VERIFY = flags.DEFINE_integer("verify_examples", 0, "Test examples verified (0: all).", 0)
_REPRESENTATIVE = flags.DEFINE_integer(
    "representative_examples", 500, "Training examples for int8 calibration.", 1
)
_BATCH = flags.DEFINE_integer("batch_size", 250, "Examples per verification batch.", 1)
_SAVEDMODEL_XLA = flags.DEFINE_bool(
    "savedmodel_xla",
    False,
    "SavedModel: Keras' XLA normalisation and Winograd transforms (faster; TF Serving "
    "needs --xla_cpu_compilation_enabled). LiteRT runs TFLite builtins either way.",
)

flags.mark_flags_as_required(["source", "base_dir"])
flags.register_validator(
    "formats",
    lambda v: bool(v) and all(f in _FORMATS for f in v),
    f"--formats takes one or more of {', '.join(_FORMATS)}.",
)


def _print_summary(summary):
    for note in summary["notes"]:
        print(f"note: {note}")
    paths = summary["paths"]
    if "savedmodel" in paths:
        parity = summary["parity"]
        worst = max(v for k, v in parity.items() if k.endswith("_max_abs_diff"))
        deconv = max((v for k, v in parity.items() if k.startswith("deconv_")), default=0.0)
        print(f"SavedModel: {paths['savedmodel']}")
        print(f"  signatures: {', '.join(summary['signatures'])}")
        print(
            f"  fresh-process parity at batch sizes {parity['batch_sizes']}: probabilities "
            f"max |diff| {worst:.2g}, deconv relative error {deconv:.2g}"
        )
    if "litert" in paths:
        print(f"LiteRT: {paths['litert']}")
        for info in summary["litert"]["variants"].values():
            ops = sum(info["operators"].values())
            print(f"  {info['file']}: {info['bytes'] / 1e6:.2f} MB, {ops} ops")
    verification = summary.get("verification")
    if verification:
        reference = next(iter(verification))
        count = verification[reference]["examples"]
        against = "Keras" if reference == "savedmodel" else "itself"
        print(
            f"verification on {summary['test_split']} ({count} examples; p_ref: {reference}, "
            f"compared with {against}):"
        )
        print(
            f"  {'artifact':<14} {'accuracy':>9} {'drop':>7} {'top-1 agree':>12} "
            f"{'max |p - p_ref|':>16}"
        )
        for name, r in verification.items():
            print(
                f"  {name:<14} {r['accuracy']:8.2f}% {r['accuracy_drop']:+7.2f} "
                f"{r['top1_agreement']:11.2f}% {r['max_abs_diff']:16.2g}"
            )
    timings = summary["timings"]
    parts = [
        f"{label} {sum(v for k, v in timings.items() if k.startswith(prefix)):.0f} s"
        for label, prefix in (
            ("SavedModel", "savedmodel_"),
            ("LiteRT", "litert_"),
            ("calibration data", "calibration_"),
            ("verification", "verification_"),
        )
        if any(k.startswith(prefix) for k in timings)
    ]
    print(f"done in {timings['total_s']:.0f} s ({', '.join(parts)})")


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras_export import exporter

    config = exporter.ExportConfig(
        source=_SOURCE.value,
        base_dir=_BASE_DIR.value,
        model_name=_MODEL_NAME.value,
        version=_VERSION.value,
        formats=tuple(_FORMATS_FLAG.value),
        overwrite=_OVERWRITE.value,
        top_k=_TOP_K.value,
        snapshot=_SNAPSHOT.value,
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        train_split=_TRAIN_SPLIT.value,
        test_split=_TEST_SPLIT.value,
        verify_examples=_VERIFY.value,
        representative_examples=_REPRESENTATIVE.value,
        batch_size=_BATCH.value,
        savedmodel_xla=_SAVEDMODEL_XLA.value,
    )
    _print_summary(exporter.export(config))


def run():
    common.run(main)


if __name__ == "__main__":
    run()
