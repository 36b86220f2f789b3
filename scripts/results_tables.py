"""Writes RESULTS.md's measured tables from the runs of scripts/results.sh.

    python scripts/results_tables.py --runs=runs/results --results=RESULTS.md

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in
RESULTS.md and is replaced whole; text outside the markers is left alone. A
run that has not finished shows as "not run". Numbers come only from each
run's eval.json (test accuracy) and history (wall time), never from here.
"""

import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zfkeras import fileio  # noqa: E402

# Paper: Table 2 / Table 3 validation top-1 error (%), beside each of our rows.
ACCURACY = (
    ("zfnet", "ZFNet", "38.4 (Table 2, 1 convnet)"),
    ("alexnet", "AlexNet, one tower", "40.5 (their AlexNet replication)"),
    ("alexnet2", "AlexNet, two towers", "40.5 (their AlexNet replication)"),
)
ABLATIONS = (
    ("zfnet", "ZFNet", "38.4"),
    ("ablation_no_conv3_conv4", "ZFNet without conv3, conv4", "45.4 (AlexNet's row)"),
    ("ablation_no_fc7", "ZFNet without fc7", "40.0 (AlexNet's row)"),
    ("ablation_no_fc6_fc7", "ZFNet without fc6, fc7", "44.8 (AlexNet's row)"),
    ("ablation_fc2048", "ZFNet, fc 2048 (x0.25: 512)", "40.2"),
    ("ablation_fc8192", "ZFNet, fc 8192 (x0.25: 2048)", "38.8"),
    ("ablation_conv512_1024_512", "ZFNet, conv3-5 512, 1024, 512", "37.5"),
    ("ablation_conv512_1024_512_fc8192", "ZFNet, both of the above", "38.3"),
    ("alexnet", "AlexNet", "40.5"),
    ("alexnet_ablation_no_conv3_conv4", "AlexNet without conv3, conv4", "45.4"),
    ("alexnet_ablation_no_fc7", "AlexNet without fc7", "40.0"),
    ("alexnet_ablation_no_fc6_fc7", "AlexNet without fc6, fc7", "44.8"),
    ("alexnet_ablation_no_conv3_conv4_fc6_fc7", "AlexNet with only conv1, conv2, conv5", "71.3"),
    ("alexnet_ablation_fc2048", "AlexNet, fc 2048 (x0.25: 512)", "41.7"),
    ("alexnet_ablation_fc8192", "AlexNet, fc 8192 (x0.25: 2048)", "40.0"),
)


def read_eval(runs, name):
    path = os.path.join(runs, name, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def accuracies(result):
    return result["test_1crop"]["accuracy"], result["test_10crop"]["accuracy"]


def mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def accuracy_table(runs, seeds=(0, 1, 2)):
    rows = [
        "| model | seeds | test accuracy, 1 crop (%) | 10 crops (%) | error, 10 crops (%) "
        "| minutes per run | paper: val top-1 error (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label, paper in ACCURACY:
        results = [read_eval(runs, f"{key}_s{seed}") for seed in seeds]
        done = [(seed, r) for seed, r in zip(seeds, results) if r is not None]
        if not done:
            rows.append(f"| {label} | not run | | | | | {paper} |")
            continue
        one = [accuracies(r)[0] for _, r in done]
        ten = [accuracies(r)[1] for _, r in done]
        minutes = statistics.mean(r["wall_time_s"] / 60 for _, r in done)
        seed_list = ",".join(str(seed) for seed, _ in done)
        rows.append(
            f"| {label} | {seed_list} | {mean_std(one)} | {mean_std(ten)} | "
            f"{mean_std([100 - a for a in ten])} | {minutes:.0f} | {paper} |"
        )
    return "\n".join(rows)


def ablation_table(runs):
    rows = [
        "| model (seed 0) | test accuracy, 1 crop (%) | 10 crops (%) | error, 10 crops (%) "
        "| paper: val top-1 error (%) |",
        "|---|---|---|---|---|",
    ]
    for key, label, paper in ABLATIONS:
        result = read_eval(runs, f"{key}_s0")
        if result is None:
            rows.append(f"| {label} | not run | | | {paper} |")
            continue
        one, ten = accuracies(result)
        rows.append(f"| {label} | {one:.2f} | {ten:.2f} | {100 - ten:.2f} | {paper} |")
    return "\n".join(rows)


def reference_table(runs):
    result = read_eval(runs, "reference")
    if result is None:
        return "Not run yet: `bash scripts/results.sh reference`."
    one, ten = accuracies(result)
    # The reference trains on all 60,000 training images: no validation column.
    epochs = len(result.get("history", {}).get("loss", []))
    return "\n".join(
        [
            "| config | epochs | test accuracy, 1 crop (%) | 10 crops (%) | wall time (min) |",
            "|---|---|---|---|---|",
            f"| `fashion_mnist_reference.cfg` | {epochs} | {one:.2f} | {ten:.2f} "
            f"| {result['wall_time_s'] / 60:.0f} |",
        ]
    )


def replace_table(text, name, table):
    pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"results_tables: no <!-- table:{name} --> markers in the results file")
    return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/results")
    parser.add_argument("--results", default="RESULTS.md")
    args = parser.parse_args()
    with open(args.results, encoding="utf-8") as f:
        text = f.read()
    text = replace_table(text, "reference", reference_table(args.runs))
    text = replace_table(text, "accuracy", accuracy_table(args.runs))
    text = replace_table(text, "ablations", ablation_table(args.runs))
    fileio.write_text(args.results, text)
    print(f"results_tables: updated {args.results}")


if __name__ == "__main__":
    main()
