"""GGUF in llama.cpp: the models llmprune makes, as llama.cpp runs them -- size, fidelity and speed.

For each model (SmolLM2-135M-Instruct, Gemma-3-270M; the protocol of docs/benchmarks.md) and each state -- dense,
blocks removed to -20% of the parameters, MLP channels removed to -20% (and, with --states, the same budget keeping
a width that is a multiple of 256: ``--width-multiple 256``), Wanda 2:4 -- and each GGUF type (f16,
q4_k_m): the file's size, the perplexity llama.cpp computes on the first test windows against the perplexity
transformers computes on the same windows for the same model, and llama.cpp's prefill and decode rates at batch 1
on this machine's cores, timed alternately with the dense model's file of the same type (median of the paired
ratios, their range, a verdict). Everything goes through the CLI, as a user runs it:
``eval --backend llama.cpp --gguf-type T --speed --speed-baseline DENSE_WORKDIR``.

The structured rows are DReSS's removal on the calibration statistics alone (``prune --method dress --structure S
--target-params 0.8``, no regularisation or recovery): what is measured here is the file, not the recipe; the
perplexity of the trained rows is in the structured table of benchmarks/README.md.

    python benchmarks/gguf_bench.py                   # both models (about 40 minutes on 2 cores)
    python benchmarks/gguf_bench.py --models smollm2  # one
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, popen_rss, save_results  # noqa: E402

STATES = {"dense": [], "blocks -20%": ["--method", "dress", "--structure", "layers", "--target-params", "0.8"],
          "MLP -20%": ["--method", "dress", "--structure", "mlp", "--target-params", "0.8"],
          "Wanda 2:4": ["--method", "wanda", "--pattern", "2:4"],
          # the same budget, the kept width the nearest whole number of k-quant super-blocks (256)
          "MLP -20% aligned": ["--method", "dress", "--structure", "mlp", "--target-params", "0.8",
                               "--width-multiple", "256"]}
DEFAULT_STATES = "dense,blocks -20%,MLP -20%,Wanda 2:4"
MODELS = {"smollm2": None, "gemma3-270m": "gemma3-270m"}


def run(cmd: list[str]) -> dict:
    res, _, _ = popen_rss(cmd)
    return res


def bench_model(name: str, args) -> list[dict]:
    paths = assets.fetch(model=MODELS[name]) if MODELS[name] else assets.fetch()
    root = args.out / name
    base = root / "dense"
    if not (base / "manifest.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        run([*LLMPRUNE, "calibrate", str(base), "--model", paths["model"], "--dataset", paths["calib"],
             "--samples", str(args.samples), "--seqlen", str(args.seqlen)])
    evalargs = ["--dataset", paths["test"], "--seqlen", str(args.seqlen), "--max-windows", str(args.windows)]
    rows = []
    for state in args.states:
        prune = STATES[state]
        wd = base if not prune else root / re.sub(r"[^a-z0-9]+", "-", state.lower()).strip("-")
        if prune and not (wd / "manifest.json").exists():
            shutil.rmtree(wd, ignore_errors=True)
            shutil.copytree(base, wd)
            run([*LLMPRUNE, "prune", str(wd), *prune])
        hf = run([*LLMPRUNE, "eval", str(wd), *evalargs])
        for gguf_type in args.types:
            speed = ["--speed", "--reps", str(args.reps), "--prompt-len", str(args.prompt_len), "--new-tokens",
                     str(args.new_tokens)] + ([] if wd == base else ["--speed-baseline", str(base)])
            lc = run([*LLMPRUNE, "eval", str(wd), *evalargs, "--backend", "llama.cpp", "--gguf-type", gguf_type,
                      *speed])
            sp = lc["speed"]
            row = dict(model=name, state=state, gguf_type=gguf_type, parameters=hf["parameters"],
                       gguf_mib=round(lc["gguf_bytes"] / 2**20, 1), ppl_transformers=round(hf["perplexity"], 3),
                       ppl_llamacpp=round(lc["perplexity"], 3), windows=lc["windows"], threads=sp["threads"],
                       prefill_tps=sp["prefill_tokens_per_s"], decode_tps=sp["decode_tokens_per_s"],
                       prefill_speedup=sp.get("prefill_speedup"), prefill_range=sp.get("prefill_speedup_range"),
                       prefill_verdict=sp.get("prefill_speedup_verdict"), decode_speedup=sp.get("decode_speedup"),
                       decode_range=sp.get("decode_speedup_range"), decode_verdict=sp.get("decode_speedup_verdict"),
                       reps=sp["reps"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | state | type | parameters | GGUF MiB | size / dense | ppl transformers | ppl llama.cpp | "
             "llama.cpp / transformers | q4_k_m / own f16 | prefill tok/s | decode tok/s | prefill speed-up | "
             "decode speed-up |", "|" + "---|" * 14]
    key = {(r["model"], r["state"], r["gguf_type"]): r for r in rows}
    for r in rows:
        dense = key[(r["model"], "dense", r["gguf_type"])]
        f16 = key.get((r["model"], r["state"], "f16"))
        own = f"{r['ppl_llamacpp'] / f16['ppl_llamacpp']:.4f}" if f16 and r["gguf_type"] != "f16" else ""

        def up(phase: str) -> str:
            if r[f"{phase}_speedup"] is None:
                return "(baseline)"
            lo, hi = r[f"{phase}_range"]
            return f"{r[f'{phase}_speedup']:.2f}x ({lo:.2f}-{hi:.2f}, {r[f'{phase}_verdict']})"

        lines.append(f"| {r['model']} | {r['state']} | {r['gguf_type']} | {r['parameters']:,} | {r['gguf_mib']} | "
                     f"{r['gguf_mib'] / dense['gguf_mib']:.3f} | {r['ppl_transformers']:.3f} | "
                     f"{r['ppl_llamacpp']:.3f} | {r['ppl_llamacpp'] / r['ppl_transformers']:.4f} | {own} | "
                     f"{r['prefill_tps']:,.0f} | {r['decode_tps']:,.1f} | {up('prefill')} | {up('decode')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--types", default="f16,q4_k_m", type=lambda s: s.split(","))
    ap.add_argument("--states", default=DEFAULT_STATES, type=lambda s: s.split(","),
                    help=f"comma-separated, of: {', '.join(STATES)} (dense is the speed baseline: keep it)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=24, help="test windows for both perplexities")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/gguf"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    rows = [r for name in args.models.split(",") for r in bench_model(name, args)]
    save_results(args.results, "gguf", rows,
                 f"llama.cpp (llama-cpp-python 0.3.36, CPU, {rows[0]['threads']} threads) against transformers; "
                 f"{args.windows} test windows of {args.seqlen} tokens; speed at batch 1, prompt {args.prompt_len}, "
                 f"{args.new_tokens} decoded tokens, {args.reps} paired repetitions; `python benchmarks/gguf_bench.py`",
                 table(rows))


if __name__ == "__main__":
    main()
