"""Occlusion sensitivity (Zeiler & Fergus Fig. 7): slide a grey square over images.

    python tools/occlusion.py --checkpoint=runs/quickstart --num_images=4
    python tools/occlusion.py --checkpoint=runs/quickstart --image=shoe.png \\
        --label="ankle boot" --size=16 --stride=4 --output_dir=occlusion

The square is the mean image (zeros in the model's input space) and moves by
--stride < --size over the model's input. For every position: (b) the total
activation of the layer-5 map (--layer) strongest on the unoccluded image,
(d) p(true class), (e) the most probable class; (c) is that map's projection.
Images come from --image files (true class from --label, else the model's
unoccluded prediction) or from the run's dataset split (--indices or the
first --num_images). Writes occlusion.png (one row per image),
occlusion.json and occlusion.csv.
"""

from absl import flags

from zfkeras_tools import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training work dir or a .keras file.")
_IMAGE = flags.DEFINE_multi_string(
    "image", [], "Image file(s) (JPEG, PNG, BMP, GIF, TIFF); repeat or comma-separate."
)
_LABEL = flags.DEFINE_multi_string(
    "label", [], "True class (name or index) of each --image, in order."
)
_DATASET = flags.DEFINE_string("dataset", "", "Dataset (default: the run's).")
_SPLIT = flags.DEFINE_string("split", "test", "Split the examples come from.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data folder (default: the run's).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder of manually obtained dataset files.")
_INDICES = flags.DEFINE_list("indices", [], "Example numbers in the split (default: the first).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 4, "Examples used without --indices.", 1)
_LAYER = flags.DEFINE_string("layer", "", "Layer of the feature map (default: last conv).")
_SIZE = flags.DEFINE_integer("size", 0, "Occluder side in input pixels (0: input/4).", 0)
_STRIDE = flags.DEFINE_integer("stride", 0, "Occluder step, below --size (0: size/2).", 0)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "occlusion", "Folder for PNG, JSON and CSV.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Occluded copies per forward pass.", 1)

flags.mark_flag_as_required("checkpoint")
flags.register_validator(
    "indices",
    lambda values: all(str(v).strip().isdigit() for v in values),
    "--indices takes non-negative integers.",
)
flags.register_validator(
    "size", lambda v: v == 0 or v >= 2, "--size must be 0 (a quarter of the input) or >= 2."
)
flags.register_multi_flags_validator(
    ["size", "stride"],
    lambda v: not (v["size"] and v["stride"]) or v["stride"] < v["size"],
    "--stride must be below --size (neighbouring squares overlap, as in the paper).",
)
flags.register_multi_flags_validator(
    ["image", "indices"],
    lambda v: not (v["image"] and v["indices"]),
    "Give --image files or --indices of dataset examples, not both.",
)


common.register_one_per("label", "image", "files", "; dataset examples have their own")


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras.analysis import occlusion

    config = occlusion.OcclusionConfig(
        checkpoint=_CHECKPOINT.value,
        output_dir=_OUTPUT_DIR.value,
        images=common.paths(_IMAGE.value),
        labels=tuple(_LABEL.value),
        dataset=_DATASET.value,
        split=_SPLIT.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        indices=tuple(int(i) for i in _INDICES.value),
        num_images=_NUM_IMAGES.value,
        layer=_LAYER.value,
        size=_SIZE.value,
        stride=_STRIDE.value,
        batch_size=_BATCH.value,
    )
    result = occlusion.run_occlusion(config, progress=common.batch_progress("occluding"))
    for item in result["images"]:
        kind = "" if item["label_given"] else "predicted "
        print(
            f"{item['image']} ({kind}{item['class_name']}): p {item['p_true']:.2f} unoccluded, "
            f"{item['min_p_true']:.2f} at worst; map {item['map']}"
        )
    print(f"written: {result['figure']}, {result['json']}, {result['csv']}")


def run():
    common.run(main)


if __name__ == "__main__":
    run()
