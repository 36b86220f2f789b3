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


def test_tables_are_computed_from_the_runs(tmp_path):
    runs = tmp_path / "runs"
    _eval(runs / "zfnet_s0", 90.0, 91.0)
    _eval(runs / "zfnet_s1", 92.0, 93.0)
    _eval(runs / "alexnet_s0", 88.5, 89.25)
    _eval(runs / "ablation_no_fc7_s0", 87.0, 87.5)
    _eval(runs / "reference", 93.1, 93.4, minutes=70)
    results = tmp_path / "RESULTS.md"
    text = "intro\n"
    for name in ("reference", "accuracy", "ablations"):
        text += f"<!-- table:{name} -->\nold\n<!-- /table:{name} -->\nkept {name}\n"
    results.write_text(text)

    done = subprocess.run(
        [sys.executable, SCRIPT, f"--runs={runs}", f"--results={results}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    out = results.read_text()
    assert "old" not in out and out.startswith("intro\n")
    assert all(f"kept {name}" in out for name in ("reference", "accuracy", "ablations"))
    # Two seeds: mean and sample standard deviation (91 +- 1.41, 92 +- 1.41).
    assert "| ZFNet | 0,1 | 91.00 ± 1.41 | 92.00 ± 1.41 | 8.00 ± 1.41 | 12 |" in out
    assert "| AlexNet, one tower | 0 | 88.50 | 89.25 | 10.75 | 12 |" in out
    assert "| AlexNet, two towers | not run |" in out
    assert "| ZFNet without fc7 | 87.00 | 87.50 | 12.50 |" in out
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
