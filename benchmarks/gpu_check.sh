#!/usr/bin/env bash
# The GPU check (issue 17): run on a lent GPU machine from the repository root, in about 10 minutes of device time.
#   1. the CUDA-marked tests (tests/test_cuda.py);
#   2. Wanda, SparseGPT and Wanda++ at 2:4 on a 7B-shaped random-init bf16 model (Llama-2-7B geometry) streamed from
#      disk with --device cuda, 128 x 2048 calibration windows (SAMPLES=N for fewer), each prune in its own process:
#      seconds, peak device memory (the step records it) and peak host RSS (/usr/bin/time or wait4).
# The machine has no network: carry .gpu/ (git-ignored), made here once with
#   python benchmarks/random_model.py .gpu/tokenizer --save-tokenizer
#   cp ~/.cache/llmprune-bench/wiki-calib.txt .gpu/calib.txt
# and call it as: bash benchmarks/gpu_check.sh   (results under $OUT, or benchmarks/results/gpu/ without one)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
PY=${PY:-python3}
RES=${OUT:-benchmarks/results/gpu}
SAMPLES=${SAMPLES:-128}
WORK=${WORK:-/tmp/llmprune-gpu}
mkdir -p "$RES" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/gpu.txt"
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' \
  | tee -a "$RES/gpu.txt"
timeout 120 $PY -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tail -20 | tee "$RES/cuda-tests.txt"
t0=$(date +%s)
$PY benchmarks/random_model.py "$WORK/random-7b" --size 7b --tokenizer .gpu/tokenizer >/dev/null || exit 1
echo "built the 7B-shaped model in $(( $(date +%s) - t0 )) s" | tee "$RES/build.txt"
$PY -m llmprune calibrate "$WORK/w" --model "$WORK/random-7b" --dataset .gpu/calib.txt --samples "$SAMPLES" \
  --seqlen 2048 --force --json > "$RES/calibrate.json" || exit 1
for m in wanda sparsegpt wandapp; do
  rm -rf "$WORK/w-$m"; cp -al "$WORK/w" "$WORK/w-$m"
  # a method that would run past the time left is cut off at 4 minutes: the table says so instead of a number
  $PY - "$WORK/w-$m" "$m" > "$RES/prune-$m.json" <<'PYEOF'
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen([sys.executable, "-m", "llmprune", "prune", sys.argv[1], "--method", sys.argv[2], "--pattern",
                      "2:4", "--device", "cuda", "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
try:
    out, _ = p.communicate(timeout=240)
except subprocess.TimeoutExpired:
    p.kill(); p.wait(); out = b"{}"
res = json.loads(out or b"{}")
res.update(method=sys.argv[2], wall_s=round(time.perf_counter() - t0, 1), completed=bool(res.get("sparsity")),
           peak_host_rss_mib=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
print(json.dumps(res))
PYEOF
  rm -rf "$WORK/w-$m"
done
$PY - "$RES" <<'PYEOF'
import json, pathlib, sys
res = pathlib.Path(sys.argv[1])
rows = [json.loads((res / f"prune-{m}.json").read_text()) for m in ("wanda", "sparsegpt", "wandapp")]
lines = ["| method | completed | wall s | capture s | prune s | propagate s | peak device MiB | peak host RSS MiB |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['method']} | {r['completed']} | {r['wall_s']} | {r.get('capture_s', '')} | {r.get('prune_s', '')} "
                 f"| {r.get('propagate_s', '')} | {r.get('peak_device_memory_mib', '')} | {r['peak_host_rss_mib']} |")
(res / "gpu-7b.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
