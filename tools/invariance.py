"""Invariance of the features to translation, scale and rotation (Zeiler & Fergus Fig. 5).

    python tools/invariance.py --checkpoint=runs/quickstart --output_dir=figures/invariance
    python tools/invariance.py --checkpoint=model.keras --images=a.jpg,b.png \\
        --labels=sneaker,bag --output_dir=figures/invariance

A few images (image files, or --count examples of a dataset split, one per
class) are vertically translated, scaled and rotated before the model's
centre crop; for each transform the Euclidean distance of the layer-1 and
layer-7 feature vectors from the untransformed image's, and P(true class),
are plotted as the paper's 3x4 panel. Writes invariance.png, invariance.json
and invariance.csv into --output_dir. Ranges are START:STOP:COUNT or a
comma-separated list of values.
"""

import math

from absl import flags

from zfkeras_tools import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training work dir or a .keras file.")
_IMAGES = flags.DEFINE_multi_string(
    "images", [], "Image files (JPEG, PNG, BMP, GIF, TIFF); repeat or comma-separate."
)
_LABELS = flags.DEFINE_list("labels", [], "True class (name or id) of each --images file.")
_DATASET = flags.DEFINE_string("dataset", "", "Dataset of the examples (default: the run's).")
_SPLIT = flags.DEFINE_string("split", "test", "Split of the examples.")
_COUNT = flags.DEFINE_integer("count", 5, "Dataset examples (one per class first).", 1, 20)
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data folder.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder of manually obtained dataset files.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "invariance", "Folder for PNG, JSON and CSV.")
_TRANSLATIONS = flags.DEFINE_string(
    "translations", "-0.25:0.25:11", "Vertical shifts, fractions of the crop size (+: down)."
)
_SCALES = flags.DEFINE_string("scales", "1:1.8:9", "Zoom ratios about the centre.")
_ROTATIONS = flags.DEFINE_string("rotations", "0:360:37", "Angles in degrees, counterclockwise.")
_FILL = flags.DEFINE_enum(
    "fill", "mean", ["mean", "black", "nearest", "reflect"], "How uncovered borders are filled."
)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", 1)

flags.mark_flag_as_required("checkpoint")


_MAX_VALUES = 1000


def _values(text):
    """'a:b:n' (n evenly spaced values from a to b) or 'v1,v2,...' -> floats."""
    text = text.strip()
    if ":" in text:
        start, stop, count = text.split(":")
        count = int(count)
        if not 1 <= count <= _MAX_VALUES:
            raise ValueError
        step = (float(stop) - float(start)) / max(count - 1, 1)
        return tuple(round(float(start) + i * step, 6) for i in range(count))
    return tuple(float(v) for v in text.split(",") if v.strip())


for _name in ("translations", "scales", "rotations"):
    flags.register_validator(
        _name,
        lambda v: bool(v) and _values_ok(v),
        f"--{_name} takes START:STOP:COUNT (COUNT 1-{_MAX_VALUES}) or a comma-separated "
        "list of numbers.",
    )


def _values_ok(text):
    try:
        values = _values(text)
    except ValueError:
        return False
    return 0 < len(values) <= _MAX_VALUES and all(math.isfinite(v) for v in values)


flags.register_validator(
    "scales", lambda v: not _values_ok(v) or min(_values(v)) > 0, "--scales must be > 0."
)
flags.register_validator(
    "translations",
    lambda v: not _values_ok(v) or max(abs(t) for t in _values(v)) <= 1,
    "--translations are fractions of the crop size, between -1 and 1.",
)


common.register_one_per("labels", "images", "files")


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras.analysis import invariance

    config = invariance.InvarianceConfig(
        checkpoint=_CHECKPOINT.value,
        output_dir=_OUTPUT_DIR.value,
        images=common.paths(_IMAGES.value),
        labels=tuple(_LABELS.value),
        dataset=_DATASET.value,
        split=_SPLIT.value,
        count=_COUNT.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        sweeps=invariance.Sweeps(
            translations=_values(_TRANSLATIONS.value),
            scales=_values(_SCALES.value),
            rotations=_values(_ROTATIONS.value),
        ),
        fill=_FILL.value,
        batch_size=_BATCH.value,
    )
    out = invariance.run_invariance(config, common.progress)
    result = out["result"]
    for kind in invariance.TRANSFORMS:
        last = result.distances[kind]
        print(
            f"{kind}: mean distance over the sweep, layer 1 {last['layer1'].mean():.3g}, "
            f"layer 7 {last['layer7'].mean():.3g}; mean P(true class) "
            f"{result.probabilities[kind].mean():.2f}"
        )
    if result.note:
        print(f"note: {result.note}")
    print("written: " + ", ".join(out["paths"].values()))


def run():
    common.run(main)


if __name__ == "__main__":
    run()
