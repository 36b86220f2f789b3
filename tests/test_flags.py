"""Every tool's flags (except tools/train.py): validators refuse bad values with a message.

Wrong types, out-of-range values, unknown names, missing required flags and
conflicting flags must all be refused while the flags are parsed, before
any work. Each tool's flags are parsed in one small subprocess (a tool's
module defines its flags on absl's global FLAGS, so two tools cannot share a
process), case after case; a few real runs check the exit status 2 and the
single `TOOL: error: ...` line.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_tool

_DRIVER = """
import json, sys
from absl import flags
tool, cases = sys.argv[1], json.loads(sys.argv[2])
sys.argv[0] = "tools/%s.py" % tool
__import__("zfkeras_tools." + tool)
results = []
for args in cases:
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS([sys.argv[0], *args])
        results.append(None)
    except flags.Error as e:
        results.append(str(e))
print(json.dumps(results))
"""

# tool -> (arguments every case starts with, [(extra arguments, None if accepted
# else a fragment of the refusal)]).
CASES = {
    "deconv": (
        ["--image=a.png", "--checkpoint=run"],
        [
            ([], None),
            (["--channels=1,2", "--layers=conv1"], None),
            (["--top=4", "--mode=map"], None),
            (["--top=abc"], "--top=abc"),
            (["--top=0"], "positive integer"),
            (["--batch_size=-5"], "positive integer"),
            (["--tpo=3"], "Unknown command line flag 'tpo'"),
            (["--mode=mean"], "max|map"),
            (["--channels=1", "--top=3"], "--channels or --top, not both"),
            (["--channels=-1"], "non-negative integers"),
        ],
    ),
    "predict": (
        ["--image=a.png"],
        [
            (["--model_path=serving/m"], None),
            (
                [
                    "--server=http://localhost:8501/v1/models/m",
                    "--timeout=5",
                    "--request_format=columnar",
                ],
                None,
            ),
            ([], "exactly one of --model_path and --server"),
            (
                ["--model_path=m", "--server=http://localhost:8501/v1/models/m"],
                "exactly one of --model_path and --server",
            ),
            (["--server=localhost:8501"], "REST URL"),
            (["--model_path=m", "--timeout=5"], "for --server only"),
            (["--model_path=m", "--request_format=row"], "for --server only"),
            (["--model_path=m", "--format=xml"], "table|json"),
            (["--model_path=m", "--top_k=0"], "positive integer"),
            (["--server=http://h:1/v1/models/m", "--timeout=0"], "--timeout"),
            (["--server=http://h:1/v1/models/m", "--timeout=abc"], "--timeout"),
            (["--model_path=m", "--model-path=n"], "Unknown command line flag"),
        ],
    ),
    "occlusion": (
        ["--checkpoint=run"],
        [
            ([], None),
            (["--size=8", "--stride=4"], None),
            (["--stride=3"], None),
            (["--image=a.png,b.png", "--label=bag", "--label=1"], None),
            (["--size=8", "--stride=8"], "--stride must be below --size"),
            (["--size=1"], "--size must be 0"),
            (["--size=-3"], "non-negative integer"),
            (["--image=a.png", "--indices=1"], "not both"),
            (["--label=bag"], "--label needs --image files"),
            (["--image=a.png,b.png", "--label=bag"], "2 files, 1 labels"),
            (["--indices=x"], "non-negative integers"),
            (["--num_images=0"], "positive integer"),
        ],
    ),
    "invariance": (
        ["--checkpoint=run"],
        [
            ([], None),
            (["--images=a.png,b.png", "--labels=bag,?"], None),
            (["--translations=-0.5,0,0.5", "--rotations=0:90:4", "--scales=1"], None),
            (["--count=21"], "--count"),
            (["--count=0"], "--count"),
            (["--fill=grey"], "mean|black|nearest|reflect"),
            (["--scales=0:2:3"], "--scales must be > 0"),
            (["--translations=-2:2:5"], "between -1 and 1"),
            (["--translations=nan"], "--translations takes"),
            (["--rotations=0:360:100000"], "COUNT 1-1000"),
            (["--rotations=abc"], "START:STOP:COUNT"),
            (["--labels=bag"], "--labels needs --images files"),
            (["--images=a.png,b.png", "--labels=bag"], "2 files, 1 labels"),
            (["--batch_size=0"], "positive integer"),
        ],
    ),
    "correspondence": (
        ["--checkpoint=run", "--parts_file=parts.json"],
        [
            ([], None),
            (["--repeats=0"], "positive integer"),
            (["--seed=x"], "--seed"),
            (["--part=nose"], "Unknown command line flag 'part'"),
        ],
    ),
    "compare_filters": (
        ["--checkpoint=a,b"],
        [
            ([], None),
            (["--labels=A,B", "--near_dead_ratio=0.5"], None),
            (["--checkpoint=c"], None),  # Repeated: a, b and c.
            (["--labels=A"], "2 checkpoints, 1 labels"),
            (["--near_dead_ratio=2"], "--near_dead_ratio"),
            (["--count=17"], "--count"),
            (["--top=0"], "--top"),
        ],
    ),
    "evaluate": (
        ["--checkpoint=run"],
        [
            ([], None),
            (["--crops=10"], None),
            (["--crops=5"], "1 and/or 10"),
            (["--snapshot=0"], "positive integer"),
            (["--batch_size=1.5"], "--batch_size"),
        ],
    ),
    "evolution": (
        ["--checkpoint=run"],
        [
            ([], None),
            (["--epochs=1,2", "--maps=conv5:1,2"], None),
            (["--epochs=0"], "1 or more"),
            (["--epochs=one"], "1 or more"),
            (["--maps=conv5"], "LAYER:c1,c2"),
            (["--num_maps=-1"], "non-negative integer"),
        ],
    ),
    "mine_top9": (
        ["--checkpoint=run"],
        [
            ([], None),
            (["--strategy=gpu"], "default|mirrored|multi_worker|tpu"),
            (["--top=0"], "positive integer"),
            (["--maps=conv5:a"], "LAYER:c1,c2"),
            (["--checkpoint_every=0"], "positive integer"),
        ],
    ),
    "probe": (
        ["--checkpoint=run"],
        [
            ([], None),
            (["--layers=1,7", "--experiments=layers"], None),
            (["--layers=8"], "1-7"),
            (["--experiments=both"], "layers and/or transfer"),
            (["--learning_rate=0"], "above 0"),
            (["--l2=-1"], "non-negative"),
            (["--pooling=min"], "avg|max"),
            (["--classifier=tree"], "softmax|svm"),
            (["--per_class=0"], "positive integers"),
        ],
    ),
    "dataset_images": (
        ["--output_dir=images"],
        [
            ([], None),
            (["--count=0"], "positive integer"),
        ],
    ),
    "export": (
        ["--source=run", "--base_dir=serving"],
        [
            ([], None),
            (["--formats=savedmodel,int8"], None),
            (["--formats=onnx"], "one or more of savedmodel"),
            (["--version=-1"], "non-negative integer"),
            (["--top_k=0"], "positive integer"),
            (["--verify_examples=x"], "--verify_examples"),
        ],
    ),
}

# Required flags, tool by tool: (arguments without them, the flag named).
MISSING = {
    "deconv": [(["--checkpoint=run"], "--image"), (["--image=a.png"], "--checkpoint")],
    "predict": [(["--model_path=m"], "--image")],
    "occlusion": [([], "--checkpoint")],
    "invariance": [([], "--checkpoint")],
    "correspondence": [
        (["--checkpoint=run"], "--parts_file"),
        (["--parts_file=p"], "--checkpoint"),
    ],
    "compare_filters": [([], "--checkpoint")],
    "evaluate": [([], "--checkpoint")],
    "evolution": [([], "--checkpoint")],
    "mine_top9": [([], "--checkpoint")],
    "probe": [([], "--checkpoint")],
    "dataset_images": [([], "--output_dir")],
    "export": [(["--base_dir=b"], "--source"), (["--source=s"], "--base_dir")],
}

# Whole command lines refused for what they lack: (arguments, fragment).
EMPTY = {
    "deconv": [(["--checkpoint=run", "--image="], "--image needs at least one file")],
    "predict": [(["--model_path=m", "--image= , "], "--image needs at least one file")],
}

TOOLS = sorted(CASES)


@pytest.fixture(scope="module")
def parsed():
    """{tool: [refusal message or None, per case of CASES, MISSING, EMPTY]}."""
    out = {}
    for tool in TOOLS:
        base, cases = CASES[tool]
        argvs = [base + extra for extra, _ in cases] + [args for args, _ in MISSING[tool]]
        argvs += [args for args, _ in EMPTY.get(tool, [])]
        result = subprocess.run(
            [sys.executable, "-c", _DRIVER, tool, json.dumps(argvs)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        out[tool] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def test_every_tool_but_train_is_covered():
    names = {
        name[:-3]
        for name in os.listdir(os.path.join(REPO, "tools"))
        if name.endswith(".py") and name not in ("__init__.py", "common.py", "train.py")
    }
    assert names == set(TOOLS)


@pytest.mark.parametrize(
    "tool, index",
    [(tool, i) for tool in TOOLS for i in range(len(CASES[tool][1]))],
    ids=lambda v: v if isinstance(v, str) else str(v),
)
def test_flag_values(parsed, tool, index):
    base, cases = CASES[tool]
    extra, expected = cases[index]
    message = parsed[tool][index]
    where = f"{tool} {' '.join(base + extra)}"
    if expected is None:
        assert message is None, f"{where}: refused: {message}"
    else:
        assert message is not None, f"{where}: accepted"
        assert expected in message, f"{where}: {message}"
        assert "\n" not in message


@pytest.mark.parametrize("tool", TOOLS)
def test_missing_required_flags(parsed, tool):
    offset = len(CASES[tool][1])
    for index, (args, flag) in enumerate(MISSING[tool]):
        message = parsed[tool][offset + index]
        assert message is not None and flag in message, f"{tool} {args}: {message}"
        assert "must have a value other than None" in message


@pytest.mark.parametrize("tool", sorted(EMPTY))
def test_empty_file_lists(parsed, tool):
    offset = len(CASES[tool][1]) + len(MISSING[tool])
    for index, (args, fragment) in enumerate(EMPTY[tool]):
        message = parsed[tool][offset + index]
        assert message is not None and fragment in message, f"{tool} {args}: {message}"


@pytest.mark.parametrize(
    "tool, args, fragment",
    [
        ("deconv", ["--image=a.png", "--checkpoint=run", "--channels=1", "--top=3"], "not both"),
        ("predict", ["--image=a.png"], "exactly one of --model_path and --server"),
        ("occlusion", ["--checkpoint=run", "--nosuchflag"], "Unknown command line flag"),
    ],
)
def test_a_flag_error_is_one_line_and_exit_status_2(tool, args, fragment):
    result = run_tool(tool, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{tool}: error: ") and fragment in lines[0], lines[0]
    assert result.stdout == ""
