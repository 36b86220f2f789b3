#!/usr/bin/env bash
# Makes sure Fashion-MNIST's IDX files are on this machine (offline-safe).
# Order: $FASHION_MNIST_DIR, Debian's dataset-fashion-mnist location; failing
# both, installs that package when run as root on a Debian-family machine.
set -euo pipefail
dir=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "data: installing Debian's dataset-fashion-mnist package (Fashion-MNIST IDX files)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  exit 0
fi
echo "data: Fashion-MNIST IDX files not found in $dir." >&2
echo "data: run 'sudo apt-get install dataset-fashion-mnist', or set FASHION_MNIST_DIR to a folder" >&2
echo "data: holding train-/t10k-images/labels-idx*-ubyte.gz." >&2
exit 1
