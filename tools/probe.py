"""Per-layer linear probes (Zeiler & Fergus Table 7) and transfer (Tables 4-6).

    python tools/probe.py --checkpoint=runs/quickstart --train_split='train[:10000]' \\
        --test_split='test[:2000]' --output_dir=figures/probe
    python tools/probe.py --checkpoint=runs/quickstart --dataset=folder:/data/other \\
        --experiments=transfer --per_class=5,10,30 --repeats=5

Layer probes: the features of each of layers 1-7 (conv layers globally
pooled) train a linear classifier on --train_split, tested on --test_split.
Transfer: layers 1-7 frozen, a new softmax on layer 7 trained with N images
per class (--per_class), mean +- std over --repeats random draws. The dataset
may be another one than the model was trained on. Writes probe.png,
probe.json and probe.csv into --output_dir.
"""

from absl import flags

from zfkeras_tools import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training work dir or a .keras file.")
_DATASET = flags.DEFINE_string("dataset", "", "Probe dataset (default: the run's).")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "Split the classifiers train on.")
_TEST_SPLIT = flags.DEFINE_string("test_split", "test", "Split they are tested on.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data folder.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder of manually obtained dataset files.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "probe", "Folder for PNG, JSON and CSV.")
_EXPERIMENTS = flags.DEFINE_list(
    "experiments", ["layers", "transfer"], "layers (Table 7) and/or transfer (Tables 4-6)."
)
_LAYERS = flags.DEFINE_list("layers", ["1", "2", "3", "4", "5", "6", "7"], "Layers probed (1-7).")
_POOLING = flags.DEFINE_enum("pooling", "avg", ["avg", "max"], "Global pooling of conv layers.")
_CLASSIFIER = flags.DEFINE_enum(
    "classifier", "softmax", ["softmax", "svm"], "Layer probes: softmax or linear SVM."
)
_PROBE_PER_CLASS = flags.DEFINE_integer(
    "probe_per_class", 0, "Layer probes: training images per class (0: all).", 0
)
_PER_CLASS = flags.DEFINE_list("per_class", ["5", "10", "30"], "Transfer: images per class.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Transfer: random draws per setting.", 1)
_STEPS = flags.DEFINE_integer("steps", 500, "Optimisation steps per classifier.", 1)
_LR = flags.DEFINE_float("learning_rate", 0.01, "Adam learning rate.", 0.0)
_L2 = flags.DEFINE_float("l2", 1e-4, "L2 penalty of the classifier weights.", 0.0)
_BATCH = flags.DEFINE_integer("batch_size", 100, "Images per forward pass.", 1)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and shuffling seed.")

flags.mark_flag_as_required("checkpoint")
flags.register_validator(
    "experiments",
    lambda v: bool(v) and all(x in ("layers", "transfer") for x in v),
    "--experiments takes layers and/or transfer.",
)
flags.register_validator(
    "layers",
    lambda v: bool(v) and all(x in "1234567" and len(x) == 1 for x in v),
    "--layers takes numbers 1-7.",
)
flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be above 0.")
flags.register_validator(
    "per_class",
    lambda v: all(x.isdigit() and int(x) > 0 for x in v),
    "--per_class takes positive integers.",
)


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras.analysis import probes

    config = probes.ProbeConfig(
        checkpoint=_CHECKPOINT.value,
        output_dir=_OUTPUT_DIR.value,
        dataset=_DATASET.value,
        train_split=_TRAIN_SPLIT.value,
        test_split=_TEST_SPLIT.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        experiments=tuple(_EXPERIMENTS.value),
        layers=tuple(int(n) for n in _LAYERS.value),
        pooling=_POOLING.value,
        probe_per_class=_PROBE_PER_CLASS.value,
        per_class=tuple(int(n) for n in _PER_CLASS.value),
        repeats=_REPEATS.value,
        linear=probes.LinearConfig(
            classifier=_CLASSIFIER.value,
            steps=_STEPS.value,
            learning_rate=_LR.value,
            l2=_L2.value,
        ),
        batch_size=_BATCH.value,
        seed=_SEED.value,
    )
    out = probes.run_probes(config, common.progress)
    record = out["record"]
    print(
        f"{record['dataset']}: {record['train_examples']} training, {record['test_examples']} "
        f"test images, {record['num_classes']} classes (chance {record['chance']:.3f})"
    )
    for row in record.get("layers", []):
        print(
            f"layer {row['layer']} ({row['name']}, {row['dims']} features): {row['accuracy']:.3f}"
        )
    if record.get("skipped_layers"):
        print(f"not in the model: layers {', '.join(map(str, record['skipped_layers']))}")
    if "transfer" in record:
        for row in record["transfer"]["results"]:
            print(
                f"transfer ({record['transfer']['layer']}), {row['per_class']} per class: "
                f"{row['mean']:.3f} +- {row['std']:.3f}"
            )
    print("written: " + ", ".join(out["paths"].values()))


def run():
    common.run(main)


if __name__ == "__main__":
    run()
