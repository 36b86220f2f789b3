#!/usr/bin/env bash
# Sets up .venv and runs the test suite (extra arguments go to pytest,
# e.g. --run-slow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
scripts/fashion_mnist.sh || echo "test: Fashion-MNIST tests that need the real files will be skipped"
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
