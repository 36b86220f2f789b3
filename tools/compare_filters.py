"""Compares the first layers of two or more models (Zeiler & Fergus Fig. 6).

    python tools/compare_filters.py --checkpoint=runs/alexnet,runs/zfnet \\
        --labels=AlexNet,ZFNet --output_dir=figures/compare
    python tools/compare_filters.py --checkpoint=runs/zfnet@1,runs/zfnet --images=a.jpg,b.jpg

Shows the conv1 filters side by side with their radial power spectra, the
share of filter energy in low / mid / high spatial frequencies (band edges
1/8 and 1/4 cycles per pixel: the output Nyquist frequencies of stride 4 and
stride 2; beside them the same shares for white-noise filters of the same
size, a filter with no structure), the count of dead and near-dead filters on a sample of
--sample_size dataset images, and the strongest conv2 maps of a few images
projected to pixels. RUN_DIR@N stands for the run's snapshot of epoch N.
Writes filters.png, layer2.png, compare_filters.json and compare_filters.csv
(one row per filter) into --output_dir.
"""

from absl import flags

from zfkeras_tools import common

_CHECKPOINT = flags.DEFINE_multi_string(
    "checkpoint", None, "Two or more run dirs or .keras files (RUN_DIR@N: snapshot N)."
)
_LABELS = flags.DEFINE_list("labels", [], "A name per checkpoint.")
_IMAGES = flags.DEFINE_multi_string(
    "images", [], "Image files for the layer-2 projections (JPEG, PNG, BMP, GIF, TIFF)."
)
_DATASET = flags.DEFINE_string("dataset", "", "Dataset of the sample (default: the first run's).")
_SPLIT = flags.DEFINE_string("split", "test", "Split of the sample.")
_COUNT = flags.DEFINE_integer("count", 4, "Images with layer-2 projections.", 1, 16)
_TOP = flags.DEFINE_integer("top", 4, "Strongest conv2 maps projected per image.", 1, 16)
_SAMPLE = flags.DEFINE_integer("sample_size", 256, "Images on which dead filters are counted.", 1)
_NEAR_DEAD = flags.DEFINE_float(
    "near_dead_ratio",
    0.1,
    "Near-dead: mean activation below this x the median filter's.",
    0.0,
    1.0,
)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data folder.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder of manually obtained dataset files.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "compare_filters", "Folder for the outputs.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", 1)

flags.mark_flag_as_required("checkpoint")


flags.register_validator(
    "checkpoint",
    lambda v: v is None or len(common.paths(v)) >= 2,
    "--checkpoint needs two or more models to compare.",
)


common.register_one_per("labels", "checkpoint", "checkpoints")


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras.analysis import architecture

    config = architecture.CompareConfig(
        checkpoints=common.paths(_CHECKPOINT.value),
        output_dir=_OUTPUT_DIR.value,
        labels=tuple(_LABELS.value),
        images=common.paths(_IMAGES.value),
        dataset=_DATASET.value,
        split=_SPLIT.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        count=_COUNT.value,
        top=_TOP.value,
        sample_size=_SAMPLE.value,
        near_dead_ratio=_NEAR_DEAD.value,
        batch_size=_BATCH.value,
    )
    out = architecture.compare_models(config, common.progress)
    for model in out["record"]["models"]:
        bands, noise = model["bands"]["mean_fraction"], model["bands"]["white_noise_mean_fraction"]
        conv1 = model["conv1"]
        print(
            f"{model['label']}: conv1 {conv1['kernel_size'][0]}x{conv1['kernel_size'][1]}"
            f"/{conv1['strides'][0]}; dead {model['dead']['count']}/{conv1['filters']}, "
            f"near-dead {model['near_dead']['count']}; energy low {bands['low']:.2f}, "
            f"mid {bands['mid']:.2f}, high {bands['high']:.2f} (white-noise filters of this "
            f"size: {noise['low']:.2f}, {noise['mid']:.2f}, {noise['high']:.2f})"
        )
    print("written: " + ", ".join(out["paths"].values()))


def run():
    common.run(main)


if __name__ == "__main__":
    run()
