"""`export(config)`: a training run -> verified SavedModel and LiteRT models.

Steps:
1. Load and check the source (a zfkeras run or .keras; `source.py`).
2. Write the SavedModel (`savedmodel.py`) into a hidden temporary folder
   beside its destination; reload it in a fresh process and check every
   signature at two batch sizes against Keras and `zfkeras.deconv`.
3. Convert the LiteRT variants (`litert.py`) into another temporary folder
   with their labels, preprocessing and mean; int8 calibrates on the training
   split through the run's evaluation preprocessing.
4. Stream the test split through Keras, the SavedModel and every variant
   (`verify.SplitVerifier`); fail unless SavedModel = Keras within 1e-5,
   float32 LiteRT = SavedModel within 1e-4, int8 agrees with float on >= 99 %
   of top-1 and loses <= 1 accuracy point.
5. Only then rename the folders into place:
   `<base_dir>/<model_name>/<version>/` (TF Serving) and
   `<base_dir>/<model_name>_litert/<version>/`. An existing version is never
   replaced without `overwrite`.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time

import numpy as np
from absl import logging

from zfkeras import data, fileio
from zfkeras import layers as zlayers
from zfkeras.errors import Error
from zfkeras_export import graph as graph_lib
from zfkeras_export import litert, savedmodel, verify
from zfkeras_export import source as source_lib

SAVEDMODEL = "savedmodel"
FORMATS = (SAVEDMODEL, *litert.VARIANTS)
LABELS_FILE = "labels.txt"
PREPROCESSING_FILE = "preprocessing.json"
MEAN_FILE = "mean.npy"
VERIFICATION_FILE = "verification.json"


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What `export` writes.

    Attributes:
        source: a training work dir or a .keras file.
        base_dir: TF Serving's base folder; the SavedModel goes to
            <base_dir>/<model_name>/<version>, LiteRT files to
            <base_dir>/<model_name>_litert/<version>.
        model_name: default: the run folder's (or .keras file's) name.
        version: a positive integer; 0 = one more than the highest existing.
        formats: any of FORMATS.
        overwrite: replace an existing version.
        top_k: classes returned by the classify signatures.
        snapshot: export snapshots/epoch_NNN.keras of the run instead.
        dataset: dataset for calibration and verification (default: the run's).
        data_dir: TFDS data folder.
        manual_dir: manually downloaded dataset files.
        train_split: int8 calibration split (default: the run's training split).
        test_split: verification split.
        verify_examples: test examples verified (0 = the whole split).
        representative_examples: training examples for int8 calibration.
        batch_size: examples per verification batch.
        savedmodel_xla: the SavedModel runs Keras' XLA computations (the
            contrast normalisation, and the Winograd transforms of
            conv3-conv5; faster) instead of the same in plain TensorFlow
            ops; TF Serving then needs --xla_cpu_compilation_enabled. LiteRT
            models run TFLite builtins either way.
    """

    source: str
    base_dir: str
    model_name: str = ""
    version: int = 0
    formats: tuple = FORMATS
    overwrite: bool = False
    top_k: int = 5
    snapshot: int = None
    dataset: str = ""
    data_dir: str = ""
    manual_dir: str = ""
    train_split: str = ""
    test_split: str = "test"
    verify_examples: int = 0
    representative_examples: int = 500
    batch_size: int = 250
    savedmodel_xla: bool = False

    def __post_init__(self):
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown or not self.formats:
            raise Error(f"unknown formats {', '.join(unknown)}; valid: {', '.join(FORMATS)}")
        if self.savedmodel_xla and SAVEDMODEL not in self.formats:
            raise Error(f"savedmodel_xla needs the {SAVEDMODEL} format in formats")
        if self.version < 0:
            raise Error(f"version must be a positive integer, not {self.version}")
        if self.top_k < 1:
            raise Error(f"top_k must be >= 1, not {self.top_k}")
        if self.model_name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.model_name):
            raise Error(
                f"model_name {self.model_name!r}: use letters, digits, '_', '.' and '-' only"
            )


def default_model_name(path):
    """The folder (or file) name of a run, made safe for a URL path."""
    base = os.path.basename(os.path.normpath(path))
    base = base[: -len(".keras")] if base.endswith(".keras") else base
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-")
    return name or "zfkeras"


def _destinations(config, name):
    model_dir = os.path.join(config.base_dir, name)
    lite_dir = os.path.join(config.base_dir, f"{name}_litert")
    version = config.version
    if not version:
        existing = savedmodel.versions(model_dir) + savedmodel.versions(lite_dir)
        version = max(existing, default=0) + 1
    out = {}
    if SAVEDMODEL in config.formats:
        out[SAVEDMODEL] = os.path.join(model_dir, str(version))
    if set(config.formats) & set(litert.VARIANTS):
        out["litert"] = os.path.join(lite_dir, str(version))
    for path in out.values():
        if os.path.exists(path) and not config.overwrite:
            raise Error(f"{path}: version {version} exists; pass --overwrite or another --version")
    return version, out


def _move_into_place(staging, final, overwrite):
    if os.path.exists(final):
        if not overwrite:
            raise Error(f"{final}: appeared during the export; not overwritten")
        fileio.replace_dir(staging, final)
    else:
        os.rename(staging, final)


def _publish_tree(root):
    """fsyncs every file, and opens the (mkdtemp 0700) root to other users as
    umask allows: TF Serving often runs as another user."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())


def _load_split(source, config, split, count):
    dataset = config.dataset or source.meta.get("dataset")
    if not dataset:
        return None
    ds, info = data.load(
        dataset,
        split,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        channels=source.preprocessing.channels,
    )
    if info.num_classes != source.num_classes:
        raise Error(
            f"{source.path}: model has {source.num_classes} classes, dataset {dataset!r} "
            f"has {info.num_classes}"
        )
    if count:
        ds = ds.take(count)
    return data.eval_batches(ds, source.preprocessing, source.mean, config.batch_size)


def _representative(source, config):
    split = config.train_split or source.meta.get("train_split") or "train"
    batches = _load_split(source, config, split, config.representative_examples)
    if batches is None:
        raise Error(
            f"{source.path}: the int8 model needs training images for calibration; pass "
            "--dataset (a bare .keras file names none)"
        )
    samples = np.concatenate([images.numpy() for images, _ in batches])
    if not len(samples):
        raise Error(f"split {split!r} is empty: no calibration data for int8")

    def representative():
        for sample in samples:
            yield [sample[None]]

    return representative, split, len(samples)


def _info(config, source, serving_graph, name, version):
    return {
        "source": os.path.abspath(source.path),
        "snapshot": config.snapshot,
        "model_name": name,
        "version": version,
        "architecture": source.meta.get("architecture", source.model.name),
        "dataset": source.meta.get("dataset", ""),
        "class_names": list(source.class_names),
        "preprocessing": dataclasses.asdict(source.preprocessing),
        "input_shape": list(source.input_shape),
        "top_k": serving_graph.top_k,
        "savedmodel_ops": zlayers.XLA if config.savedmodel_xla else zlayers.PORTABLE,
        "notes": list(source.notes),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def export(config):
    """Exports, verifies and installs the artifacts of `config`.

    Returns:
        A dict: model_name, version, paths {savedmodel, litert}, the parity
        numbers, the split verification {artifact: numbers}, LiteRT sizes and
        op counts, timings, notes.

    Raises:
        Error: a bad source, an existing version, a failed conversion or a
            failed check (nothing is installed then).
    """
    timings = {}
    start = time.monotonic()
    source = source_lib.load_source(config.source, snapshot=config.snapshot)
    name = config.model_name or default_model_name(config.source)
    version, destinations = _destinations(config, name)
    # Resolved now (lazy pipelines) so that missing data fails before any work.
    test_batches = _load_split(source, config, config.test_split, config.verify_examples)
    if test_batches is None and "int8" in config.formats:
        raise Error(
            f"{config.source}: the int8 model needs training images for calibration and the "
            "test split for its verification; pass --dataset (a bare .keras file names none)"
        )
    serving_graph = graph_lib.ServingGraph(source, top_k=config.top_k)
    examples = verify.parity_examples(serving_graph)
    info = _info(config, source, serving_graph, name, version)
    summary = {
        "model_name": name,
        "version": version,
        "paths": dict(destinations),
        "notes": list(source.notes),
        "top_k": serving_graph.top_k,
    }
    staging = {}
    try:
        if SAVEDMODEL in destinations:
            t = time.monotonic()
            staging[SAVEDMODEL] = fileio.temp_dir_like(destinations[SAVEDMODEL])
            xla = config.savedmodel_xla
            with serving_graph.using_ops(zlayers.XLA) if xla else contextlib.nullcontext():
                savedmodel.write_savedmodel(serving_graph, staging[SAVEDMODEL])
            layers = source.model.layers
            if xla and any(isinstance(layer, zlayers.OP_SET_LAYERS) for layer in layers):
                summary["notes"].append(
                    "the SavedModel's contrast normalisation and Winograd convolutions are "
                    "XLA-compiled: start TF Serving with --xla_cpu_compilation_enabled"
                )
            timings["savedmodel_write_s"] = time.monotonic() - t
            t = time.monotonic()
            summary["parity"] = verify.check_savedmodel(
                staging[SAVEDMODEL], serving_graph, examples, label=destinations[SAVEDMODEL]
            )
            timings["savedmodel_parity_s"] = time.monotonic() - t
            summary["signatures"] = savedmodel.signature_names(source.conv_layers)

        lite_models = {}
        if "litert" in destinations:
            lite_models, lite_summary = _convert_litert(
                config, source, serving_graph, examples, timings
            )
            summary["litert"] = lite_summary

        t = time.monotonic()
        if test_batches is not None:
            verifier = verify.SplitVerifier(source.model, staging.get(SAVEDMODEL), lite_models)
            for images, labels in test_batches:
                verifier.update(images.numpy(), labels.numpy())
            summary["verification"] = verifier.results()
            summary["test_split"] = config.test_split
            timings["verification_s"] = time.monotonic() - t
            verify.judge(summary["verification"])
        else:
            summary["notes"].append("no dataset: the test-split verification was skipped")

        info["verification"] = summary.get("verification")
        info["parity"] = summary.get("parity")
        if SAVEDMODEL in staging:
            fileio.write_json(os.path.join(staging[SAVEDMODEL], savedmodel.INFO_FILE), info)
        if "litert" in destinations:
            staging["litert"] = fileio.temp_dir_like(destinations["litert"])
            _write_litert(staging["litert"], source, lite_models, info, summary["litert"])
        for path in staging.values():
            _publish_tree(path)
        for kind in list(staging):
            _move_into_place(staging[kind], destinations[kind], config.overwrite)
            del staging[kind]
    except OSError as e:
        raise Error(f"{config.base_dir}: cannot write ({e.strerror or e})") from None
    finally:
        for path in staging.values():
            shutil.rmtree(path, ignore_errors=True)
    timings["total_s"] = time.monotonic() - start
    summary["timings"] = timings
    return summary


def _convert_litert(config, source, serving_graph, examples, timings):
    variants = [v for v in litert.VARIANTS if v in config.formats]
    representative = None
    lite_summary = {"variants": {}}
    if "int8" in variants:
        t = time.monotonic()
        representative, split, count = _representative(source, config)
        lite_summary["calibration"] = {"split": split, "examples": count}
        timings["calibration_data_s"] = time.monotonic() - t
    contents = {}
    with litert.lite_savedmodel(serving_graph) as path:
        for variant in variants:
            t = time.monotonic()
            logging.info("converting the %s LiteRT model", variant)
            contents[variant] = litert.convert(
                path, variant, source.conv_layers, representative=representative
            )
            timings[f"litert_{variant}_s"] = time.monotonic() - t
            lite_summary["variants"][variant] = {
                "file": litert.model_file(variant),
                "bytes": len(contents[variant]),
                "operators": litert.operators(contents[variant]),
            }
    if "float32" in contents:
        t = time.monotonic()
        lite_summary["deconv_relative_error"] = verify.check_litert_deconv(
            contents["float32"], serving_graph, examples
        )
        runner = litert.Runner(litert.interpreter(model_content=contents["float32"]))
        probabilities = runner(inputs=examples.inputs)["probabilities"]
        reference = np.asarray(source.model(examples.inputs, training=False))
        diff = float(np.abs(probabilities - reference).max())
        lite_summary["parity_max_abs_diff"] = diff
        if diff > verify.LITE_FLOAT_TOLERANCE:
            raise Error(
                f"float32 LiteRT differs from the model by {diff:.3g} on the parity images "
                f"(tolerance {verify.LITE_FLOAT_TOLERANCE:g})"
            )
        timings["litert_deconv_check_s"] = time.monotonic() - t
    return contents, lite_summary


def _write_litert(folder, source, contents, info, lite_summary):
    for variant, content in contents.items():
        fileio.write_bytes(os.path.join(folder, litert.model_file(variant)), content)
    fileio.write_text(
        os.path.join(folder, LABELS_FILE), "".join(f"{n}\n" for n in source.class_names)
    )
    preprocessing = dict(dataclasses.asdict(source.preprocessing), mean_file=MEAN_FILE)
    fileio.write_json(os.path.join(folder, PREPROCESSING_FILE), preprocessing)
    fileio.save_npy(os.path.join(folder, MEAN_FILE), source.mean.astype(np.float32))
    record = dict(info, litert=lite_summary)
    fileio.write_json(os.path.join(folder, VERIFICATION_FILE), json.loads(json.dumps(record)))
