"""Shared test set-up: quiet TensorFlow, the `slow` marker and tiny fixtures."""

import os
import subprocess
import sys

import pytest

from zfkeras import quiet

quiet.import_tensorflow()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long test, run only with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run_tool(name, *args, timeout=600, env=None):
    """Runs tools/NAME.py in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
