"""Projects the strongest feature maps of images to pixel space (the deconvnet).

    python tools/deconv.py --image=photo.jpg --checkpoint=runs/quickstart
    python tools/deconv.py --image=a.png,b.jpg --checkpoint=model.keras \\
        --layers=conv1,conv5 --top=4 --output_dir=figures

Each image goes through the model's own evaluation preprocessing (resize,
centre crop, channels, mean); for each layer the strongest feature maps for
that image (or --channels) are projected down to pixels as in Zeiler & Fergus
(2013) Section 2.1, and shown beside their receptive-field patches (the spirit
of Fig. 2 and Fig. 7(c)). Writes NAME_deconv.png and NAME_deconv.json (layer,
channel, activation, position, box) per image into --output_dir. Several
images are projected as one batch.
"""

from absl import flags

from zfkeras_tools import common

_DEFAULT_TOP = 9

_IMAGE = flags.DEFINE_multi_string(
    "image", None, "Image files (JPEG, PNG, BMP, GIF, TIFF); repeat or comma-separate."
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training work dir or a .keras file.")
_LAYERS = flags.DEFINE_list("layers", [], "Layers to project (default: every conv layer).")
_TOP = flags.DEFINE_integer(
    "top", None, f"Strongest feature maps per layer and image (default {_DEFAULT_TOP}).", 1
)
_CHANNELS = flags.DEFINE_list("channels", [], "Explicit feature maps (instead of --top).")
_MODE = flags.DEFINE_enum(
    "mode", "max", ["max", "map"], "max: strongest single activation; map: the whole map."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "deconv", "Folder for the PNG and JSON files.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", 1)

flags.mark_flags_as_required(["image", "checkpoint"])
flags.register_validator(
    "image",
    lambda v: v is None or any(common.split_list(x) for x in v),
    "--image needs at least one file.",
)
flags.register_validator(
    "channels",
    lambda v: all(str(c).strip().isdigit() for c in v),
    "--channels takes non-negative integers.",
)
flags.register_multi_flags_validator(
    ["channels", "top"],
    lambda v: not (v["channels"] and v["top"] is not None),
    "Give --channels or --top, not both.",
)


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras import deconv

    config = deconv.DeconvConfig(
        images=common.paths(_IMAGE.value),
        checkpoint=_CHECKPOINT.value,
        output_dir=_OUTPUT_DIR.value,
        layers=tuple(_LAYERS.value),
        top=_DEFAULT_TOP if _TOP.value is None else _TOP.value,
        channels=tuple(int(c) for c in _CHANNELS.value),
        mode=_MODE.value,
        batch_size=_BATCH.value,
    )
    for item in deconv.visualize_images(config):
        prediction = item["prediction"]
        print(
            f"{item['image']}: {prediction['name']} ({prediction['probability']:.2f}); "
            f"written: {item['figure']}, {item['json']}"
        )


def run():
    common.run(main)


if __name__ == "__main__":
    run()
