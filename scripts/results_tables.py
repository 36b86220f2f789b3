"""Writes RESULTS.md's measured tables from the runs of scripts/results.sh.

    python scripts/results_tables.py --runs=runs/results --docs=docs/results --results=RESULTS.md

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in
RESULTS.md and is replaced whole; text outside the markers is left alone. A
run that has not finished shows as "not run". Numbers come only from each
run's eval.json (test accuracy, wall time) and from the figure steps' JSON
records in docs/results (Fig. 5, Fig. 6, Tables 1 and 7), never from here.
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


def read_json(path):
    """A JSON record, or None if the step that writes it has not run."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_eval(runs, name):
    return read_json(os.path.join(runs, name, "eval.json"))


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
        "| minutes | paper: val top-1 error (%) |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, paper in ABLATIONS:
        result = read_eval(runs, f"{key}_s0")
        if result is None:
            rows.append(f"| {label} | not run | | | | {paper} |")
            continue
        one, ten = accuracies(result)
        minutes = result["wall_time_s"] / 60
        rows.append(
            f"| {label} | {one:.2f} | {ten:.2f} | {100 - ten:.2f} | {minutes:.0f} | {paper} |"
        )
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


def read_figure(docs, step, name):
    """A figure step's JSON record in the docs folder, or None if not run."""
    return read_json(os.path.join(docs, step, name))


def not_run(step):
    return f"Not run yet: `bash scripts/results.sh {step}`."


def filters_table(docs):
    record = read_figure(docs, "compare_filters", "compare_filters.json")
    if record is None:
        return not_run("filters")
    rows = [
        "| model | low | mid | high | white noise (low / mid / high) | dead filters "
        "| filter RMS, median (max / median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in record["models"]:
        bands, noise = model["bands"]["mean_fraction"], model["bands"]["white_noise_mean_fraction"]
        rms = model["weight_rms"]
        rows.append(
            f"| {model['label']} | {bands['low']:.2f} | {bands['mid']:.2f} | {bands['high']:.2f} "
            f"| {noise['low']:.2f} / {noise['mid']:.2f} / {noise['high']:.2f} "
            f"| {model['dead']['count']} of {model['conv1']['filters']} "
            f"| {rms['median']:.3f} ({rms['max_over_median']:.2f}) |"
        )
    return "\n".join(rows)


def correspondence_table(docs):
    record = read_figure(docs, "correspondence", "correspondence.json")
    if record is None:
        return not_run("correspondence")
    names = record["layers"]
    rows = [
        f"| part | layer 5 ({names['layer5']}) | random | layer 7 ({names['layer7']}) | random |",
        "|---|---|---|---|---|",
    ]
    for part in record["parts"]:
        cells = []
        for layer in ("layer5", "layer7"):
            own, random = part[layer], part["random"][layer]
            cells += [
                f"{own['mean']:.3f} ± {own['std']:.3f}",
                f"{random['mean']:.3f} ± {random['std']:.3f}",
            ]
        rows.append(f"| {part['part'].replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def probe_table(docs):
    record = read_figure(docs, "probe", "probe.json")
    if record is None:
        return not_run("probe")
    layers = record["layers"]
    return "\n".join(
        [
            "| layer | " + " | ".join(layer["name"] for layer in layers) + " |",
            "|---|" + "---|" * len(layers),
            "| test accuracy (%) | "
            + " | ".join(f"{100 * layer['accuracy']:.1f}" for layer in layers)
            + " |",
        ]
    )


def invariance_table(docs):
    """Per transform: how far the first step moves layers 1 and 7, and the class kept."""
    record = read_figure(docs, "invariance", "invariance.json")
    if record is None:
        return not_run("invariance")
    labels = record["labels"]
    identity = {"translation": 0.0, "scale": 1.0, "rotation": 0.0}
    rows = [
        "| transform | first step | layer 1: distance at the first step / largest "
        "| layer 7: the same | sweep classified correctly |",
        "|---|---|---|---|---|",
    ]
    for kind in ("translation", "scale", "rotation"):
        sweep = record["sweeps"].get(kind)
        if sweep is None:
            continue
        values = sweep["parameters"]
        centre = min(range(len(values)), key=lambda i: abs(values[i] - identity[kind]))
        steps = [i for i in (centre - 1, centre + 1) if 0 <= i < len(values)]
        shares = []
        for layer in ("layer1", "layer7"):
            ratios = [
                row[i] / max(row)
                for row in sweep[f"{layer}_distance"]
                if max(row) > 0
                for i in steps
            ]
            shares.append(f"{100 * statistics.mean(ratios):.0f} %")
        predicted = sweep["predicted_class"]
        right = sum(p == label for row, label in zip(predicted, labels) for p in row)
        total = sum(len(row) for row in predicted)
        if kind == "scale":
            step = f"{values[steps[-1]]:g}x"
        else:
            step = f"{abs(values[steps[-1]] - values[centre]):g} {record['units'][kind]}"
        rows.append(
            f"| {kind} | {step} | {shares[0]} | {shares[1]} | {100 * right / total:.0f} % |"
        )
    return "\n".join(rows)


def replace_table(text, name, table):
    pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"results_tables: no <!-- table:{name} --> markers in the results file")
    return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/results")
    parser.add_argument("--results", default="RESULTS.md")
    parser.add_argument("--docs", default="docs/results", help="the figure steps' output")
    args = parser.parse_args()
    with open(args.results, encoding="utf-8") as f:
        text = f.read()
    text = replace_table(text, "reference", reference_table(args.runs))
    text = replace_table(text, "accuracy", accuracy_table(args.runs))
    text = replace_table(text, "ablations", ablation_table(args.runs))
    for name, table in (
        ("invariance", invariance_table),
        ("filters", filters_table),
        ("correspondence", correspondence_table),
        ("probe", probe_table),
    ):
        text = replace_table(text, name, table(args.docs))
    fileio.write_text(args.results, text)
    print(f"results_tables: updated {args.results}")


if __name__ == "__main__":
    main()
