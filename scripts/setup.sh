#!/usr/bin/env bash
# Creates .venv and installs zfkeras into it (idempotent; re-installs when
# setup.py changes). Sourced by quickstart.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# quickstart.sh and test.sh may start at the same time: one installs, the other waits.
exec 9<scripts/setup.sh
flock 9
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.zfkeras-installed
want="$(sha256sum setup.py | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing zfkeras and its pinned dependencies into .venv (a few minutes the first time)"
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install --disable-pip-version-check -e ".[test,lite]"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "setup: pip install failed; full log in $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
