#!/usr/bin/env bash
# Reproduces RESULTS.md: every run and figure it shows, one step at a time.
#
#   bash scripts/results.sh STEP...     (or: all)
#
# Steps, in the order RESULTS.md uses them:
#   reference   ZFNet with fashion_mnist_reference.cfg (the >= 93 % model)
#   accuracy    ZFNet, AlexNet, AlexNet two-tower at the comparison budget, seeds 0-2
#   ablations   Table 3 rows at the comparison budget, seed 0 (ZFNet, then AlexNet)
#   renorm      ZFNet without filter renormalisation (Fig. 6(a)), seed 0
#   figures     all of: top9 (Fig. 2), evolution (Fig. 4), invariance (Fig. 5),
#               filters (Fig. 6), occlusion (Fig. 7), correspondence (Table 1),
#               probe (Table 7); each is also a step of its own
#   photos      tools/deconv.py on the photos in $PHOTOS (default ../shared/data/photos)
#   tables      regenerate RESULTS.md's measured tables from the runs' JSON
#
# Runs go to runs/results/NAME; a finished run (eval.json present) is skipped
# and an interrupted one resumes, so re-running a step continues it. Each run
# logs to runs/results/NAME.log. Figures are copied to docs/results/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=.venv/bin/python
out=${RESULTS_RUNS:-runs/results}
docs=${RESULTS_DOCS:-docs/results}
PHOTOS=${PHOTOS:-../shared/data/photos}
mkdir -p "$out" "$docs"

# train NAME CONFIG [FLAG...]: one training run, skipped when finished.
train() {
  local name=$1 config=$2
  shift 2
  if [ -f "$out/$name/eval.json" ]; then
    echo "results: $name done"
    return
  fi
  echo "results: training $name ($(date -u +%H:%M) UTC; log $out/$name.log)"
  $py tools/train.py --flagfile="tools/configs/$config.cfg" --workdir="$out/$name" "$@" \
    >>"$out/$name.log" 2>&1 || { tail -n 3 "$out/$name.log" >&2; return 1; }
  tail -n 3 "$out/$name.log"
}

# figure NAME TOOL [FLAG...]: one analysis tool into $out/figures/NAME; PNGs and its
# printed output (output.txt) to docs.
figure() {
  local name=$1 tool=$2
  shift 2
  echo "results: $name ($(date -u +%H:%M) UTC)"
  mkdir -p "$out/figures/$name" "$docs/$name"
  # What the tool prints (its measured summary) is kept beside the figures.
  $py "tools/$tool.py" --output_dir="$out/figures/$name" "$@" | tee "$out/figures/$name/output.txt"
  cp "$out/figures/$name"/*.png "$out/figures/$name/output.txt" "$docs/$name/"
  $py scripts/small_png.py --max_width=1000 "$docs/$name"/*.png >/dev/null
  # Small JSON summaries go with the figures; big per-map dumps stay in runs/.
  find "$out/figures/$name" -maxdepth 1 -name '*.json' -size -200k -exec cp {} "$docs/$name/" \;
}

step_reference() { train reference fashion_mnist_reference; }

step_accuracy() {
  for seed in 0 1 2; do
    for config in fashion_mnist_zfnet fashion_mnist_alexnet fashion_mnist_alexnet2; do
      train "${config#fashion_mnist_}_s$seed" "$config" --seed="$seed"
    done
  done
}

# Table 3's rows in RESULTS.md's order: the layer removals and fc widths first.
ablations=(no_conv3_conv4 no_fc6_fc7 fc2048 fc8192 no_fc7 conv512_1024_512
  conv512_1024_512_fc8192 alexnet_ablation_no_conv3_conv4 alexnet_ablation_no_fc6_fc7
  alexnet_ablation_fc2048 alexnet_ablation_fc8192 alexnet_ablation_no_fc7
  alexnet_ablation_no_conv3_conv4_fc6_fc7)

step_ablations() {
  local name
  for name in "${ablations[@]}"; do
    [[ $name == alexnet_* ]] || name=ablation_$name
    train "${name}_s0" "fashion_mnist_$name"
  done
}

step_renorm() { train zfnet_no_renorm_s0 fashion_mnist_zfnet --filter_rms=0; }

# The figure steps read the reference run (and, for filters, the seed-0 runs).
ref=$out/reference

test_images() {
  [ -d "$out/images" ] ||
    $py tools/dataset_images.py --split=test --count=40 --output_dir="$out/images" >/dev/null
}

step_top9() { figure top9 mine_top9 --checkpoint="$ref" --split=test --num_maps=12; }

step_evolution() {
  figure evolution evolution --checkpoint="$ref" --split=test --num_images=2000
}

step_invariance() { figure invariance invariance --checkpoint="$ref" --split=test --count=5; }

step_filters() {
  figure compare_filters compare_filters \
    --checkpoint="$out/alexnet_s0,$out/zfnet_s0,$out/zfnet_no_renorm_s0" \
    --labels="AlexNet,ZFNet,ZFNet no renormalisation"
}

step_occlusion() {
  figure occlusion occlusion --checkpoint="$ref" --split=test --indices=0,2,4,6,8,11
}

step_correspondence() {
  test_images
  # The parts file names images by file name: it sits beside them.
  cp "$docs/fashion_mnist_parts.json" "$out/images/parts.json"
  figure correspondence correspondence --checkpoint="$ref" \
    --parts_file="$out/images/parts.json" --repeats=20
}

step_probe() {
  figure probe probe --checkpoint="$ref" --train_split='train[:10000]' --test_split=test
}

step_photos() {
  if [ ! -d "$PHOTOS" ]; then
    echo "results: no photos in $PHOTOS (set PHOTOS=FOLDER)" >&2
    return 1
  fi
  local images
  images=$(find "$PHOTOS" -maxdepth 1 \( -name '*.png' -o -name '*.jpg' \) | sort | paste -sd, -)
  figure photos deconv --checkpoint="$ref" --image="$images" --top=6
}

step_tables() { $py scripts/results_tables.py --runs="$out" --docs="$docs" --results=RESULTS.md; }

figures=(top9 evolution invariance filters occlusion correspondence probe)
known=(reference accuracy ablations renorm "${figures[@]}" photos tables)
steps=()
for step in "$@"; do
  case $step in
    all) steps+=(reference accuracy renorm ablations "${figures[@]}" photos tables) ;;
    figures) steps+=("${figures[@]}") ;;
    *) steps+=("$step") ;;
  esac
done
if [ "${#steps[@]}" -eq 0 ]; then
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
for step in "${steps[@]}"; do
  if [[ " ${known[*]} " != *" $step "* ]]; then
    echo "results: unknown step $step (${known[*]} figures all)" >&2
    exit 2
  fi
done
for step in "${steps[@]}"; do "step_$step"; done
