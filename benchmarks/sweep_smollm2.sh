#!/usr/bin/env bash
# A sweep on the benchmark's real model (docs/benchmarks.md protocol): SmolLM2-135M calibrated on 64 x 512 windows, then
# magnitude, Wanda and SparseGPT at 30/50/70% unstructured and 2:4, each evaluated on the whole test split
# (perplexity) and on 200 paragraphs of it (last-word accuracy). Results and plots go to WORK/sweep/ and are copied
# to benchmarks/results/sweep-smollm2-DATE/. Re-running it skips what is done.
#   bash benchmarks/sweep_smollm2.sh [WORK]            (default WORK: runs/sweep-smollm2)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/sweep-smollm2}
eval "$(.venv/bin/python benchmarks/assets.py --shell)"
[ -f "$WORK/manifest.json" ] || .venv/bin/llmprune calibrate "$WORK" --model "$MODEL" --dataset "$CALIB" \
  --samples "$SAMPLES" --seqlen "$SEQLEN"
.venv/bin/llmprune sweep "$WORK" --methods magnitude,wanda,sparsegpt --sparsities 0.3,0.5,0.7 --patterns 2:4 \
  --dataset "$TEST" --seqlen "$SEQLEN" --tasks "lastword:$TEST" --limit 200
OUT=benchmarks/results/sweep-smollm2-$(date +%F)
mkdir -p "$OUT"
cp "$WORK"/sweep/results.json "$WORK"/sweep/results.csv "$WORK"/sweep/*.png "$OUT"/
echo "results and plots: $OUT"
