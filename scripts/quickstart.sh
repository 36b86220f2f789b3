#!/usr/bin/env bash
# The Quick start's main job: set up .venv, make sure Fashion-MNIST is here,
# train the quickstart ZFNet, evaluate it with 10 crops, project test images
# through the deconvnet, export it for serving and classify the
# images with it. Re-running resumes or reuses what is done.
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
[ -d $run/serving/quickstart/1 ] ||
  $py tools/export.py --source=$run --base_dir=$run/serving --model_name=quickstart --version=1
$py tools/predict.py --model_path=$run/serving/quickstart \
  --image="$(ls $run/images/*.png | paste -sd, -)"
cat <<TXT

Quick start done. In $run/:
  model.keras, run.json, mean.npy   the trained ZFNet and its preprocessing
  eval.json, eval_test.json         test accuracy (1-crop, 10-crop)
  deconv/*_deconv.png, .json        deconvnet projections of the test images in images/
  snapshots/, tensorboard/          epoch snapshots; .venv/bin/tensorboard --logdir=$run/tensorboard
  serving/quickstart/1/             SavedModel for TF Serving (serving/quickstart_litert/1: LiteRT)
Next: README.md lists the analysis tools (top-9 mining, occlusion, ...) to run on it.
TXT
