#!/usr/bin/env bash
# The Quick start's main job: set up .venv, make sure Fashion-MNIST is here,
# train the quickstart ZFNet, evaluate it with 10 crops, and project test
# images through the deconvnet. Re-running resumes or reuses what is done.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
scripts/fashion_mnist.sh
run=runs/quickstart
py=.venv/bin/python
$py tools/train.py --flagfile=tools/configs/quickstart.cfg --workdir=$run
$py tools/evaluate.py --checkpoint=$run --crops=10
$py tools/dataset_images.py --split=test --count=3 --output_dir=$run/images
$py tools/deconv.py --checkpoint=$run --image="$(ls $run/images/*.png | paste -sd, -)" \
  --top=6 --output_dir=$run/deconv
cat <<TXT

Quick start done. In $run/:
  model.keras, run.json, mean.npy   the trained ZFNet and its preprocessing
  eval.json, eval_test.json         test accuracy (1-crop, 10-crop)
  deconv/*_deconv.png, .json        deconvnet projections of the test images in images/
  snapshots/, tensorboard/          epoch snapshots; .venv/bin/tensorboard --logdir=$run/tensorboard
Next: README.md lists the analysis tools (top-9 mining, occlusion, ...) to run on it.
TXT
