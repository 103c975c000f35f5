#!/usr/bin/env bash
# .venv-device: a virtual environment with the package versions of the lent GPU machines' image (python 3.12 there),
# for rehearsing the GPU check on this CPU (`bash benchmarks/gpu_check.sh --rehearse`, run by the fast tier):
# transformers 5.17, accelerate 1.15, safetensors 0.8, huggingface_hub 1.33, peft, typer, rich, matplotlib, pytest --
# and, as there, no datasets, gguf, lm-eval or pyarrow. torch is the CPU build this machine installs (the image has
# 2.11 with CUDA 13.0; no GPU here to use it). llmprune itself is installed without its dependencies. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
V=.venv-device
PINS=(transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 huggingface_hub==1.33.0 peft typer rich matplotlib
      "pytest>=8")
if [ -f $V/llmprune-device-image ] && [ -x $V/bin/python ] && $V/bin/python -c "import transformers as t, torch; assert t.__version__ == '5.17.0'" \
    2>/dev/null; then
  exit 0
fi
[ -x $V/bin/python ] || "$PY" -m venv $V
if ! $V/bin/python -c "import torch" 2>/dev/null; then
  if [ -z "${TORCH_INDEX:-}" ] && ! $V/bin/pip install --quiet --dry-run --no-deps --no-index "torch==2.13.0" \
      >/dev/null 2>&1; then
    TORCH_INDEX=https://download.pytorch.org/whl/cpu
  fi
  $V/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
$V/bin/pip install --quiet --disable-pip-version-check "${PINS[@]}"
$V/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
for gone in datasets gguf lm_eval pyarrow; do
  if $V/bin/python -c "import $gone" 2>/dev/null; then
    echo "$V: $gone is installed (a dependency pulled it in), but the device image has none" >&2
    exit 1
  fi
done
# tests/conftest.py: in this environment a test that needs one of those packages is skipped, not failed
echo "a replica of the GPU machines' image (scripts/device_venv.sh)" > $V/llmprune-device-image
$V/bin/python -c "import torch, transformers; print(f'$V: torch {torch.__version__}, transformers {transformers.__version__}')"
