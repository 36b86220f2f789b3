"""Trains ZFNet or AlexNet (Zeiler & Fergus Section 3) and evaluates it.

    python tools/train.py --flagfile=tools/configs/quickstart.cfg

Re-running the same command resumes an interrupted or killed run at the
batch of its last checkpoint (every --checkpoint_every_steps batches and at
each epoch end). Ctrl-C (SIGINT) or SIGTERM saves a checkpoint at the current
batch and exits with status 130 (143). The work dir gets the model, its
preprocessing, snapshots, TensorBoard logs, flags.txt (a flagfile that re-runs
it) and eval.json.
"""

import os
import sys

from absl import flags

from zfkeras_tools import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run (resumes if it exists).")
_DATASET = flags.DEFINE_string(
    "dataset", "fashion_mnist", "fashion_mnist, folder:PATH or a TFDS name (cifar10, ...)."
)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data folder (default ~/tensorflow_datasets).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder of manually obtained dataset files.")
_DOWNLOAD = flags.DEFINE_bool("download", False, "Let TFDS download the dataset.")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "Training split (TFDS slicing ok).")
_VAL_SPLIT = flags.DEFINE_string("val_split", "test", "Split that drives the plateau schedule.")
_TEST_SPLIT = flags.DEFINE_string("test_split", "test", "Split evaluated at the end.")
_RESIZE = flags.DEFINE_integer("resize_size", 256, "Short side resize and centre square.", 1)
_CROP = flags.DEFINE_integer("crop_size", 224, "Random/centre crop = model input size.", 1)
_CHANNELS = flags.DEFINE_enum("channels", "auto", ["auto", "1", "3"], "Input channels.")
_INPUT_SCALE = flags.DEFINE_float(
    "input_scale", 1.0, "Multiplier of mean-subtracted pixels (paper: 1, raw 0-255 scale).", 0.0
)
_BORDER = flags.DEFINE_float(
    "border",
    0.0,
    "Black border added on every side before the resize, as a fraction of the short side "
    "(paper: 0).",
    0.0,
    1.0,
)
_CACHE = flags.DEFINE_bool("cache", False, "Keep the resized uint8 images in memory.")
_SHUFFLE = flags.DEFINE_integer("shuffle_buffer", 10000, "Shuffle buffer (examples).", 1)
_ARCH = flags.DEFINE_enum("architecture", "zfnet", ["zfnet", "alexnet", "alexnet2"], "Model.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Multiplier of the conv filter counts.", 0.0)
_FC = flags.DEFINE_integer("fc_units", 4096, "Width of fc6 and fc7.", 1)
_CONV_WIDTHS = flags.DEFINE_list("conv_widths", ["384", "384", "256"], "conv3,conv4,conv5 filters.")
_REMOVE = flags.DEFINE_multi_enum(
    "remove", [], ["conv3", "conv4", "conv5", "fc6", "fc7"], "Layers left out (Table 3)."
)
_DROPOUT = flags.DEFINE_float("dropout", 0.5, "Dropout after fc6 and fc7.", 0.0, 0.99)
_FILTER_RMS = flags.DEFINE_float(
    "filter_rms", 0.1, "Filter renormalisation radius; 0 switches it off.", 0.0
)
_INIT = flags.DEFINE_enum("init", "paper", ["paper", "he"], "paper: N(0, 1e-2); he: He-normal.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Mini-batch size.", 1)
_EPOCHS = flags.DEFINE_integer("epochs", 70, "Epochs.", 1)
_LR = flags.DEFINE_float("learning_rate", 0.01, "Initial learning rate.", 0.0)
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.", 0.0, 1.0)
_WD = flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (0: none).", 0.0)
_SCHEDULE = flags.DEFINE_enum(
    "lr_schedule", "plateau", ["plateau", "step", "cosine", "constant"], "Learning-rate schedule."
)
_LR_FACTOR = flags.DEFINE_float("lr_factor", 0.1, "Factor of each lowering.", 0.0, 1.0)
_LR_PATIENCE = flags.DEFINE_integer("lr_patience", 3, "Plateau epochs before lowering.", 0)
_LR_BOUNDARIES = flags.DEFINE_list("lr_boundaries", [], "Epochs at which step lowers the rate.")
_MIN_LR = flags.DEFINE_float("min_learning_rate", 1e-5, "Floor of the learning rate.", 0.0)
_SNAPSHOTS = flags.DEFINE_list(
    "snapshot_epochs", ["1", "2", "5", "10", "20", "30", "40", "64"], "Epochs kept (Fig. 4)."
)
_EVAL_CROPS = flags.DEFINE_list("eval_crops", ["1", "10"], "Final evaluation: 1 and/or 10 crops.")
_EVOLUTION = flags.DEFINE_integer(
    "evolution_maps", 4, "Maps per conv layer projected to TensorBoard at snapshot epochs.", 0
)
_EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 100, "Images per evaluation batch.", 1)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False, "Deterministic ops (bit-identical).")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every_steps",
    100,
    "Batches between crash-safe checkpoints (0: epoch ends only); a kill loses at most these.",
    0,
)
_STRATEGY = flags.DEFINE_enum(
    "strategy", "default", ["default", "mirrored", "multi_worker", "tpu"], "Distribution."
)
_TPU = flags.DEFINE_string("tpu_address", "", "TPU name or address for --strategy=tpu.")
_VERBOSE = flags.DEFINE_integer("verbose", -1, "Keras verbosity; -1: bar on a tty, else lines.")

flags.mark_flag_as_required("workdir")


def _ints(name, values):
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise flags.ValidationError(f"--{name} takes integers, not {','.join(values)}") from None


@flags.multi_flags_validator(["resize_size", "crop_size"], "crop_size must be <= resize_size.")
def _check_sizes(values):
    return values["crop_size"] <= values["resize_size"]


@flags.multi_flags_validator(
    ["lr_schedule", "lr_boundaries"], "--lr_schedule=step needs --lr_boundaries."
)
def _check_step(values):
    return values["lr_schedule"] != "step" or bool(values["lr_boundaries"])


for _name in ("conv_widths", "lr_boundaries", "snapshot_epochs", "eval_crops"):
    flags.register_validator(
        _name,
        lambda v: all(str(x).strip().isdigit() for x in v),
        message=f"--{_name} takes a comma-separated list of positive integers.",
    )
flags.register_validator(
    "eval_crops", lambda v: all(x in ("1", "10") for x in v), "--eval_crops takes 1 and/or 10."
)


def config_from_flags():
    from zfkeras.train import TrainConfig

    return TrainConfig(
        workdir=_WORKDIR.value,
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        download=_DOWNLOAD.value,
        train_split=_TRAIN_SPLIT.value,
        val_split=_VAL_SPLIT.value,
        test_split=_TEST_SPLIT.value,
        resize_size=_RESIZE.value,
        crop_size=_CROP.value,
        channels=0 if _CHANNELS.value == "auto" else int(_CHANNELS.value),
        input_scale=_INPUT_SCALE.value,
        border=_BORDER.value,
        cache=_CACHE.value,
        shuffle_buffer=_SHUFFLE.value,
        architecture=_ARCH.value,
        width=_WIDTH.value,
        fc_units=_FC.value,
        conv_widths=_ints("conv_widths", _CONV_WIDTHS.value),
        remove=tuple(_REMOVE.value),
        dropout=_DROPOUT.value,
        filter_rms=_FILTER_RMS.value,
        init=_INIT.value,
        batch_size=_BATCH.value,
        epochs=_EPOCHS.value,
        learning_rate=_LR.value,
        momentum=_MOMENTUM.value,
        weight_decay=_WD.value,
        lr_schedule=_SCHEDULE.value,
        lr_factor=_LR_FACTOR.value,
        lr_patience=_LR_PATIENCE.value,
        lr_boundaries=_ints("lr_boundaries", _LR_BOUNDARIES.value),
        min_learning_rate=_MIN_LR.value,
        snapshot_epochs=_ints("snapshot_epochs", _SNAPSHOTS.value),
        eval_crops=_ints("eval_crops", _EVAL_CROPS.value),
        eval_batch_size=_EVAL_BATCH.value,
        evolution_maps=_EVOLUTION.value,
        seed=_SEED.value,
        deterministic=_DETERMINISTIC.value,
        checkpoint_every_steps=_CHECKPOINT_EVERY.value,
        strategy=_STRATEGY.value,
        tpu_address=_TPU.value,
        verbose=_VERBOSE.value,
    )


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras import train

    config = config_from_flags()
    print(f"Training {config.architecture} on {config.dataset} in {config.workdir}", flush=True)
    try:
        results = train.train_and_evaluate(
            config, flags_text=common.tool_flags_as_flagfile(__name__), report=common.progress
        )
    except train.Interrupted as e:
        _exit(str(e), e.exit_code)
    except KeyboardInterrupt:
        _exit("interrupted; run the same command to resume from the last checkpoint", 130)
    for crops in config.eval_crops:
        r = results[f"test_{crops}crop"]
        print(
            f"test ({crops}-crop, {r['examples']} images): accuracy {r['accuracy']:.2f} %, "
            f"top-5 error {r['top5_error']:.2f} %"
        )
    model_path = os.path.join(config.workdir, "model.keras")
    print(f"wall time {results['wall_time_s']:.0f} s; model: {model_path}")


def _exit(message, code):
    common.progress(message)
    sys.exit(code)


def run():
    common.run(main)


if __name__ == "__main__":
    run()
