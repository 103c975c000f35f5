#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it runs): on a lent GPU machine from the repository root, with
# .gpu/ carried (made here once: python benchmarks/gpu_check.py --prepare .gpu), or on this CPU with --rehearse.
#   bash benchmarks/gpu_check.sh              results under $OUT (the device tool's), else benchmarks/results/gpu-check
#   bash benchmarks/gpu_check.sh --rehearse   tiny geometry on the CPU, under 3 minutes (PY=.venv-device/bin/python:
#                                             the device image's package versions, scripts/device_venv.sh)
# Exits non-zero when any step failed or was cut off; the table is written row by row as the steps end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PY:-python3}" benchmarks/gpu_check.py "$@"
