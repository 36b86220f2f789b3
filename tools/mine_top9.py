"""Top-9 activations of feature maps over a dataset split, projected (Zeiler & Fergus Fig. 2).

    python tools/mine_top9.py --checkpoint=runs/quickstart --output_dir=top9
    python tools/mine_top9.py --checkpoint=runs/quickstart --layers=conv1,conv5 \\
        --maps=conv5:3,17,40 --num_maps=9 --split=test --output_dir=top9

One streaming pass over the split (the run's dataset, test split, by default)
keeps the 9 strongest activations of every map of the chosen layers (one per
image); the winners of the maps shown are projected with the deconvnet and
drawn beside their image patches, one PNG per layer. The mined state
(top9_state.npz) is saved every --checkpoint_every batches: re-running the
same command resumes an interrupted pass, or re-plots (other maps, say)
without mining again. Per layer it prints how class-specific the maps are:
the share of a map's top 9 that belong to its commonest class, against the
same share with the labels shuffled.
"""

from absl import flags

from zfkeras_tools import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training work dir or a .keras file.")
_DATASET = flags.DEFINE_string("dataset", "", "Dataset (default: the run's).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to mine (TFDS slicing ok).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data folder (default: the run's).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder of manually obtained dataset files.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "top9", "Folder for PNG, JSON and the state.")
_LAYERS = flags.DEFINE_list("layers", [], "Layers to mine (default: every conv layer).")
_TOP = flags.DEFINE_integer("top", 9, "Activations kept per map (k).", 1)
_MAPS = common.define_maps_flag(
    "Maps to show, LAYER:c1,c2,... (repeatable); other layers get random ones."
)
_NUM_MAPS = flags.DEFINE_integer("num_maps", 16, "Random maps shown per layer (0: all).", 0)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 0, "Mine only the first N images (0: all).", 0)
_BATCH = flags.DEFINE_integer("batch_size", 100, "Images per batch.", 1)
_STRATEGY = flags.DEFINE_enum(
    "strategy", "default", ["default", "mirrored", "multi_worker", "tpu"], "Distribution."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random choice of maps.")
_EVERY = flags.DEFINE_integer("checkpoint_every", 200, "Batches between state saves.", 1)
_REMINE = flags.DEFINE_bool("remine", False, "Ignore a saved state and mine again.")

flags.mark_flag_as_required("checkpoint")


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras.analysis import topk

    config = topk.TopKConfig(
        checkpoint=_CHECKPOINT.value,
        output_dir=_OUTPUT_DIR.value,
        dataset=_DATASET.value,
        split=_SPLIT.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        layers=tuple(_LAYERS.value),
        k=_TOP.value,
        maps=common.layer_maps(_MAPS.value),
        num_maps=_NUM_MAPS.value,
        num_images=_NUM_IMAGES.value,
        batch_size=_BATCH.value,
        strategy=_STRATEGY.value,
        seed=_SEED.value,
        checkpoint_every=_EVERY.value,
        remine=_REMINE.value,
    )
    result = topk.run_topk(config, progress=common.batch_progress("mining"))
    if result["state"] is None:
        return  # A non-chief worker of a multi-worker run.
    how = "reused the saved state" if result["reused"] else f"mined {result['num_images']} images"
    if result["resumed_from"]:
        how += f" (resumed after batch {result['resumed_from']})"
    print(f"{how}; layers: {', '.join(result['layers'])}")
    for layer, row in result["classes"].items():
        line = f"{layer}: {row['maps']} maps, {row['silent_maps']} never active"
        if row["majority_share"] is not None:
            line += (
                f"; top-{_TOP.value} images of one class: {row['one_class_maps']:.0%} of maps;"
                f" mean share of the commonest class {row['majority_share']:.2f}"
                f" (labels shuffled: {row['shuffled_majority_share']:.2f})"
            )
        print(line)
    print(f"written: {', '.join(result['figures'] + [result['json'], result['state']])}")


def run():
    common.run(main)


if __name__ == "__main__":
    run()
