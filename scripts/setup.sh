#!/usr/bin/env bash
# Set up .venv for llmprune on a fresh machine: the CPU build of torch first (an unpinned torch would pull a
# multi-GB CUDA build), then llmprune itself with its test, eval (lm-eval) and gguf (llama-cpp-python: built from
# source with cmake and g++ the first time, a few minutes; pip caches the wheel) extras. Safe to re-run.
# torch comes from a wheel pip finds without the network (a --find-links folder) when there is one, else from
# PyTorch's CPU index; TORCH_INDEX=URL names another index (a CUDA one, say).
# --tests also builds .venv-device (scripts/device_venv.sh: the GPU machines' package versions), which the test
# suite's rehearsal of the GPU check runs in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -z "${TORCH_INDEX:-}" ] && ! .venv/bin/pip install --quiet --dry-run --no-deps --no-index "torch==2.13.0" \
      >/dev/null 2>&1; then
    TORCH_INDEX=https://download.pytorch.org/whl/cpu  # PyPI's Linux torch is the CUDA build
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
# llama-cpp-python (the gguf extra) is built from source. A native build on a CPU with AMX runs llama.cpp's AMX
# kernels, which crash on Q4_K weights (ggml-org/llama.cpp#20824; here: a segfault in the first decode of a q4_k_m
# file). On x86-64 it is built once for AVX2/FMA/F16C, without AMX, into a wheel folder of its own (pip's cache would
# hand back a native build), and installed from there.
if [ "$(uname -m)" = x86_64 ]; then
  WHEELS=${LLMPRUNE_WHEELS:-$HOME/.cache/llmprune/wheels}
  if ! ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python 0.3.36 for AVX2 (a few minutes, once)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
      .venv/bin/pip wheel --quiet --disable-pip-version-check --no-deps --no-cache-dir "llama-cpp-python==0.3.36" \
      -w "$WHEELS"
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
    "$(ls "$WHEELS"/llama_cpp_python-0.3.36-*.whl | head -1)"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,eval,gguf]"
.venv/bin/python -c "import torch, transformers, llmprune; print(f'llmprune {llmprune.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
if [ "${1:-}" = --tests ]; then
  bash scripts/device_venv.sh
fi
