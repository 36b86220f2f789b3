"""Importing zfkeras first turns TensorFlow's oneDNN kernels on (x86-64)."""

import os
import platform
import subprocess
import sys

import pytest

_PROBE = (
    "import zfkeras.layers\n"
    "from tensorflow.python.util import _pywrap_util_port as port\n"
    "print(port.IsMklEnabled())\n"
)


def _onednn_enabled(setting):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 only")
def test_zfkeras_turns_onednn_on():
    assert _onednn_enabled(None) == "True"


def test_users_setting_wins():
    assert _onednn_enabled("0") == "False"
