#!/usr/bin/env bash
# Reproduces the figures of the foundation issue's note (after the two pretraining runs):
#   bci-decoder train --config configs/poyo-mp-small.yaml   (-> runs/poyo-mp-small, copied to models/)
#   bci-decoder train --config configs/loso.yaml            (-> runs/loso)
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin
mkdir -p out
what=${1:-all}
if [[ $what == all || $what == evaluate ]]; then
  $B/bci-decoder evaluate --model models/poyo-mp-small --data ../shared/data/real --json out/evaluate_real.json | tee out/evaluate_real.txt
fi
if [[ $what == all || $what == loso ]]; then
  $B/python benchmarks/unit_identification.py --model runs/loso --seconds 30 60 120 --json out/unit_identification.json | tee out/unit_identification.txt
fi
if [[ $what == all || $what == single ]]; then
  $B/python benchmarks/multi_vs_single.py --multi models/poyo-mp-small --sessions stevenson2011_m1 millerlab_s1_area2 --steps 300 --json out/multi_vs_single.json | tee out/multi_vs_single.txt
fi
