"""Evaluates a trained model: top-1/top-5 error with the centre crop and 10 crops.

    python tools/evaluate.py --checkpoint=runs/quickstart

The dataset and split default to the run's own (run.json: its dataset, split
test); the numbers are printed and written as JSON.
"""

import os

from absl import flags

from zfkeras_tools import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training work dir or a .keras file.")
_DATASET = flags.DEFINE_string("dataset", "", "Dataset (default: the run's).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate (TFDS slicing ok).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data folder.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "Folder of manually obtained dataset files.")
_CROPS = flags.DEFINE_list("crops", ["1", "10"], "1 (centre crop) and/or 10 (paper's 10 crops).")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Images per batch.", 1)
_SNAPSHOT = flags.DEFINE_integer("snapshot", None, "Evaluate snapshots/epoch_NNN.keras.", 1)
_OUTPUT = flags.DEFINE_string(
    "output_file", "", "JSON output (default: eval_SPLIT.json in the run dir, else stdout)."
)

flags.mark_flag_as_required("checkpoint")
flags.register_validator(
    "crops", lambda v: bool(v) and all(x in ("1", "10") for x in v), "--crops takes 1 and/or 10."
)


def main(argv):
    if len(argv) > 1:
        raise common.Error(f"unexpected arguments: {' '.join(argv[1:])}")
    from zfkeras import evaluation

    config = evaluation.EvalConfig(
        checkpoint=_CHECKPOINT.value,
        dataset=_DATASET.value,
        split=_SPLIT.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        crops=tuple(int(c) for c in _CROPS.value),
        batch_size=_BATCH.value,
        snapshot=_SNAPSHOT.value,
        output_file=_OUTPUT.value,
    )
    results = evaluation.evaluate_checkpoint(config)
    for r in results["results"]:
        print(
            f"{results['dataset']} {results['split']} ({r['crops']}-crop, {r['examples']} "
            f"images): top-1 error {r['top1_error']:.2f} %, top-5 error {r['top5_error']:.2f} %"
        )
    if results.get("output_file"):
        print(f"written: {os.path.relpath(results['output_file'])}")


def run():
    common.run(main)


if __name__ == "__main__":
    run()
