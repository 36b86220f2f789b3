"""Correspondence of object parts across images (Zeiler & Fergus Table 1).

    python tools/correspondence.py --checkpoint=runs/quickstart \\
        --parts_file=dogs/parts.json --output_dir=figures/correspondence

The parts file maps each image (relative to the file's folder) to named
boxes [x0, y0, x1, y1] in pixels of the original image:

    {"dog1.jpg": {"left_eye": [120, 80, 150, 105], "nose": [140, 130, 175, 160]}, ...}

Each part is occluded (set to the mean image) in every image; Delta, the mean
over image pairs of the fraction of layer-5 (pool5) and layer-7 features whose
change flips sign between the two images, is compared with boxes of the same
size at random places (--repeats draws). Lower than random means the model
treats the part consistently. Writes correspondence.png, correspondence.json
and correspondence.csv into --output_dir.
"""

from absl import flags

from zfkeras_tools import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training work dir or a .keras file.")
_PARTS_FILE = flags.DEFINE_string("parts_file", None, "JSON: {image: {part: [x0, y0, x1, y1]}}.")
_PARTS = flags.DEFINE_list("parts", [], "Parts to measure (default: all in the file).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Random-occluder draws per part.", 1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random occluders.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "correspondence", "Folder for the outputs.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", 1)

flags.mark_flags_as_required(["checkpoint", "parts_file"])


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras.analysis import correspondence

    config = correspondence.CorrespondenceConfig(
        checkpoint=_CHECKPOINT.value,
        parts_file=_PARTS_FILE.value,
        output_dir=_OUTPUT_DIR.value,
        parts=tuple(_PARTS.value),
        repeats=_REPEATS.value,
        seed=_SEED.value,
        batch_size=_BATCH.value,
    )
    out = correspondence.run_correspondence(config, common.progress)
    record = out["record"]
    print(f"{'part':<16} {'layer 5':>15} {'layer 7':>15}   (random occluders of the same size)")
    for entry in record["parts"]:
        cells = []
        for key in ("layer5", "layer7"):
            cells.append(f"{entry[key]['mean']:.3f} +- {entry[key]['std']:.3f}")
        randoms = [
            f"{entry['random'][k]['mean']:.3f} +- {entry['random'][k]['std']:.3f}"
            for k in ("layer5", "layer7")
        ]
        print(f"{entry['part']:<16} {cells[0]:>15} {cells[1]:>15}   ({', '.join(randoms)})")
    if record["note"]:
        print(f"note: {record['note']}")
    print("written: " + ", ".join(out["paths"].values()))


def run():
    common.run(main)


if __name__ == "__main__":
    run()
