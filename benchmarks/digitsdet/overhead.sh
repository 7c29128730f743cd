#!/usr/bin/env bash
# Training-step overhead of every DigitsDet distillation head, both default pairs, trained
# teachers, on an otherwise idle machine (the ratios mean nothing under contention):
#   benchmarks/digitsdet/overhead.sh [OUT]  -> OUT/<family>_<head>.json, OUT.{json,md}
# (OUT defaults to benchmarks/digitsdet/overhead).
# Needs the trained R-50/2 teachers at output/digitsdet/<family>_R50_teacher/model_final.pth.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-benchmarks/digitsdet/overhead}
mkdir -p "$out"
for family in retinanet faster_rcnn; do
  for head in fitnet fgfi fgbg mgd logit loc dfd gk detkds; do
    result="$out/${family}_${head}.json"
    [ -f "$result" ] && continue  # re-running continues where it stopped
    .venv/bin/python tools/benchmark.py overhead --iters 20 --warmup 3 \
      --config-file "configs/DigitsDet/${family}_R18_from_R50_${head}.yaml" --json "$result"
  done
done
.venv/bin/python tools/benchmark.py overhead-summary --inputs "$out"/*.json \
  --json "$out.json" --markdown "$out.md"
