"""scripts/results_tables.py: RESULTS.md's tables come from the runs' JSON."""

import json
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "results_tables.py")


def _eval(path, one, ten, minutes=12.0):
    os.makedirs(path)
    result = {
        "test_1crop": {"accuracy": one},
        "test_10crop": {"accuracy": ten},
        "wall_time_s": minutes * 60,
        "history": {"loss": [0.9, 0.4], "val_accuracy": [0.5, 0.9]},
    }
    with open(os.path.join(path, "eval.json"), "w") as f:
        json.dump(result, f)


TABLES = ("reference", "accuracy", "ablations", "invariance", "filters", "correspondence", "probe")


def _markers():
    text = "intro\n"
    for name in TABLES:
        text += f"<!-- table:{name} -->\nold\n<!-- /table:{name} -->\nkept {name}\n"
    return text


def _run(runs, docs, results):
    done = subprocess.run(
        [sys.executable, SCRIPT, f"--runs={runs}", f"--docs={docs}", f"--results={results}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return results.read_text()


def _write_json(path, record):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f)


def test_figure_tables_are_computed_from_the_figure_records(tmp_path):
    docs = tmp_path / "docs"
    _write_json(
        docs / "invariance" / "invariance.json",
        {
            "labels": [3, 5],
            "units": {"translation": "pixels"},
            "sweeps": {
                "translation": {
                    "parameters": [-2.0, 0.0, 2.0, 4.0],
                    # Steps next to the identity: 1/4 and 3/4 of image 0's largest
                    # distance, 2/4 and 2/4 of image 1's: mean 50 %.
                    "layer1_distance": [[1.0, 0.0, 3.0, 4.0], [2.0, 0.0, 2.0, 4.0]],
                    "layer7_distance": [[0.1, 0.0, 0.1, 1.0], [0.1, 0.0, 0.1, 1.0]],
                    "predicted_class": [[3, 3, 3, 1], [5, 5, 5, 2]],
                }
            },
        },
    )
    _write_json(
        docs / "compare_filters" / "compare_filters.json",
        {
            "models": [
                {
                    "label": "AlexNet",
                    "bands": {
                        "mean_fraction": {"low": 0.1, "mid": 0.2, "high": 0.7},
                        "white_noise_mean_fraction": {"low": 0.05, "mid": 0.15, "high": 0.8},
                    },
                    "dead": {"count": 3},
                    "conv1": {"filters": 48},
                    "weight_rms": {"median": 0.1234, "max_over_median": 1.5},
                }
            ]
        },
    )
    side = {"layer5": {"mean": 0.3, "std": 0.05}, "layer7": {"mean": 0.2, "std": 0.04}}
    _write_json(
        docs / "correspondence" / "correspondence.json",
        {
            "layers": {"layer5": "pool5", "layer7": "relu7"},
            "parts": [{"part": "left_cuff", **side, "random": side}],
        },
    )
    results = tmp_path / "RESULTS.md"
    results.write_text(_markers())
    out = _run(tmp_path / "runs", docs, results)
    assert "| translation | 2 pixels | 50 % | 10 % | 75 % |" in out
    assert "| AlexNet | 0.10 | 0.20 | 0.70 | 0.05 / 0.15 / 0.80 | 3 of 48 | 0.123 (1.50) |" in out
    assert "| left cuff | 0.300 ± 0.050 | 0.300 ± 0.050 | 0.200 ± 0.040 | 0.200 ± 0.040 |" in out
    assert "Not run yet: `bash scripts/results.sh probe`." in out


def test_tables_are_computed_from_the_runs(tmp_path):
    runs = tmp_path / "runs"
    _eval(runs / "zfnet_s0", 90.0, 91.0)
    _eval(runs / "zfnet_s1", 92.0, 93.0)
    _eval(runs / "alexnet_s0", 88.5, 89.25)
    _eval(runs / "ablation_no_fc7_s0", 87.0, 87.5)
    _eval(runs / "reference", 93.1, 93.4, minutes=70)
    results = tmp_path / "RESULTS.md"
    results.write_text(_markers())

    out = _run(runs, tmp_path / "docs", results)
    assert "old" not in out and out.startswith("intro\n")
    assert all(f"kept {name}" in out for name in TABLES)
    assert "Not run yet: `bash scripts/results.sh probe`." in out
    # Two seeds: mean and sample standard deviation (91 +- 1.41, 92 +- 1.41).
    assert "| ZFNet | 0,1 | 91.00 ± 1.41 | 92.00 ± 1.41 | 8.00 ± 1.41 | 12 |" in out
    assert "| AlexNet, one tower | 0 | 88.50 | 89.25 | 10.75 | 12 |" in out
    assert "| AlexNet, two towers | not run |" in out
    assert "| ZFNet without fc7 | 87.00 | 87.50 | 12.50 | 12 |" in out
    assert "| `fashion_mnist_reference.cfg` | 2 | 93.10 | 93.40 | 70 |" in out


def test_missing_markers_are_an_error(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("no markers\n")
    done = subprocess.run(
        [sys.executable, SCRIPT, f"--runs={tmp_path}", f"--results={results}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "markers" in done.stderr
    assert results.read_text() == "no markers\n"


def test_results_sh_trains_every_ablation_config():
    # results.sh lists Table 3's runs in RESULTS.md's order; none may be missed.
    listed = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$(sed -n "/^ablations=(/,/)/p" scripts/results.sh)"; '
            'printf "%s\\n" "${ablations[@]}"',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    configs = {
        name[len("fashion_mnist_") : -len(".cfg")]
        for name in os.listdir(os.path.join(REPO, "tools", "configs"))
        if name.startswith("fashion_mnist_") and "ablation" in name
    }
    names = {name if name.startswith("alexnet_") else f"ablation_{name}" for name in listed}
    assert len(listed) == len(names) == 13
    assert names == configs
