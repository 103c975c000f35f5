#!/usr/bin/env bash
# Set up .venv for llmprune on a fresh machine: the CPU build of torch first (an unpinned torch would pull a
# multi-GB CUDA build), then llmprune itself with its test and eval (lm-eval) extras. Safe to re-run.
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   # where no local CPU wheel exists
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,eval]"
.venv/bin/python -c "import torch, transformers, llmprune; print(f'llmprune {llmprune.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
