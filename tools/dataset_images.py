"""Writes examples of a dataset split as PNG files (inputs for the image tools).

    python tools/dataset_images.py --dataset=fashion_mnist --split=test --count=4 \\
        --output_dir=runs/quickstart/images

Files are named SPLIT_INDEX_CLASS.png; the images are written as stored
(no preprocessing), so tools/deconv.py and the analysis tools see them exactly
as a user's own photos.
"""

from absl import flags

from zfkeras_tools import common

_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "Dataset name (see tools/train.py).")
_SPLIT = flags.DEFINE_string("split", "test", "Split (TFDS slicing ok).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data folder.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder of manually obtained dataset files.")
_COUNT = flags.DEFINE_integer("count", 4, "Number of examples, from the start of the split.", 1)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for the PNG files.")

flags.mark_flag_as_required("output_dir")


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras import data

    paths = data.write_examples(
        _DATASET.value,
        _SPLIT.value,
        _COUNT.value,
        _OUTPUT_DIR.value,
        data_dir=_DATA_DIR.value or None,
        manual_dir=_MANUAL_DIR.value or None,
    )
    for path in paths:
        print(path)


def run():
    common.run(main)


if __name__ == "__main__":
    run()
