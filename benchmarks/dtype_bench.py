"""bf16 against fp32 on the real model of docs/benchmarks.md: the same prune on a workdir calibrated in each dtype.

The GGUF source is dequantized once to float32 and once to bfloat16 (``calibrate --dtype``); every later step keeps
the workdir's dtype (weights on disk and block compute; statistics in fp32). For each method, prune and evaluate both
in their own processes (peak RSS from ``wait4``) and report the bf16/fp32 perplexity ratio, with the dense models'.

    python benchmarks/dtype_bench.py                      # Wanda 2:4 and SparseGPT 50% (about 20 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, calibrated_base, popen_rss, save_results  # noqa: E402

RUNS = [("dense", None), ("wanda", "2:4"), ("sparsegpt", "unstructured")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("runs/dtype"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    paths = assets.fetch()
    evalargs = ["--dataset", paths["test"], "--seqlen", str(args.seqlen)]
    rows = []
    for dtype in ("float32", "bfloat16"):
        base = calibrated_base(args.out, paths, args.samples, args.seqlen, dtype)
        disk = sum(p.stat().st_size for p in (base / "model").glob("*.safetensors"))
        for method, pattern in RUNS:
            wd = args.out / f"{dtype}-{method}"
            if wd.exists():
                shutil.rmtree(wd)
            shutil.copytree(base, wd)
            prune_s, rss = 0.0, None
            if method != "dense":
                res, _, rss = popen_rss([*LLMPRUNE, "prune", str(wd), "--method", method, "--pattern", pattern])
                prune_s = res["capture_s"] + res["prune_s"] + res["propagate_s"]
            ev, _, eval_rss = popen_rss([*LLMPRUNE, "eval", str(wd), *evalargs])
            row = dict(dtype=dtype, method=method, pattern=pattern, ppl=ev["perplexity"], prune_s=round(prune_s, 1),
                       prune_rss_mib=None if rss is None else round(rss), eval_rss_mib=round(eval_rss), model_mib=round(disk / 2**20),
                       windows=ev["windows"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    fp32 = {r["method"]: r["ppl"] for r in rows if r["dtype"] == "float32"}
    lines = ["| dtype | method | pattern | perplexity | bf16 / fp32 | prune s | prune peak RSS MiB | eval peak RSS MiB "
             "| model on disk MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['method']} | {r['pattern'] or ''} | {r['ppl']:.2f} | "
                     f"{r['ppl'] / fp32[r['method']]:.4f} | {r['prune_s'] or ''} | {r['prune_rss_mib'] or ''} | "
                     f"{r['eval_rss_mib']} | {r['model_mib']} |")
    save_results(args.results, "dtype", rows,
        f"SmolLM2-135M-Instruct, docs/benchmarks.md protocol ({args.samples} x {args.seqlen} calibration windows, "
        f"{rows[0]['windows']} test windows), `python benchmarks/dtype_bench.py`",
        "\n".join(lines))


if __name__ == "__main__":
    main()
