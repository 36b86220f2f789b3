"""Feature evolution during training (Zeiler & Fergus Fig. 4), from a run's snapshots.

    python tools/evolution.py --checkpoint=runs/quickstart --output_dir=evolution
    python tools/evolution.py --checkpoint=runs/quickstart --layers=conv1,conv5 \\
        --maps=conv5:3,17 --num_images=5000 --epochs=1,2,5

For each snapshot epoch the training tool kept (snapshots/epoch_NNN.keras)
and the final model, the strongest activation of each chosen map over the
split (the run's dataset, test split, by default; --num_images subsamples it)
is found with that snapshot's weights and projected with its deconvnet:
one row per map, one column per epoch. Writes evolution.png and
evolution.json (image, activation, position, box per map and epoch).
"""

from absl import flags

from zfkeras_tools import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training work dir with snapshots/.")
_DATASET = flags.DEFINE_string("dataset", "", "Dataset (default: the run's).")
_SPLIT = flags.DEFINE_string("split", "test", "Split searched (TFDS slicing ok).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data folder (default: the run's).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder of manually obtained dataset files.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "evolution", "Folder for the PNG and JSON.")
_LAYERS = flags.DEFINE_list("layers", [], "Layers shown (default: every conv layer).")
_MAPS = common.define_maps_flag(
    "Maps to show, LAYER:c1,c2,... (repeatable); other layers get random ones."
)
_NUM_MAPS = flags.DEFINE_integer("num_maps", 4, "Random maps shown per layer (0: all).", 0)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 0, "Search the first N images (0: all).", 0)
_EPOCHS = flags.DEFINE_list("epochs", [], "Snapshot epochs shown (default: all).")
_FINAL = flags.DEFINE_bool("include_final", True, "Add the final model as the last column.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Images per batch.", 1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random choice of maps.")

flags.mark_flag_as_required("checkpoint")
flags.register_validator(
    "epochs",
    lambda values: all(str(v).strip().isdigit() and int(v) >= 1 for v in values),
    "--epochs takes a comma-separated list of epoch numbers (1 or more).",
)


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras.analysis import evolution

    config = evolution.EvolutionConfig(
        checkpoint=_CHECKPOINT.value,
        output_dir=_OUTPUT_DIR.value,
        dataset=_DATASET.value,
        split=_SPLIT.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        layers=tuple(_LAYERS.value),
        maps=common.layer_maps(_MAPS.value),
        num_maps=_NUM_MAPS.value,
        num_images=_NUM_IMAGES.value,
        epochs=tuple(int(e) for e in _EPOCHS.value),
        include_final=_FINAL.value,
        batch_size=_BATCH.value,
        seed=_SEED.value,
    )
    result = evolution.run_evolution(config, progress=common.batch_progress("evolution"))
    print(f"columns: {', '.join(result['columns'])}; layers: {', '.join(result['layers'])}")
    print(f"written: {result['figure']}, {result['json']}")


def run():
    common.run(main)


if __name__ == "__main__":
    run()
