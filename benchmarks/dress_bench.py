"""Structured removal on the real model of docs/benchmarks.md: DReSS (regularise, then remove) against direct removal of
the same units, with parameters, test perplexity, the saved model's prefill / decode speed-up over dense (timed in
the same run), and the wall time and peak RSS of ``regularize``.

    python benchmarks/dress_bench.py                                        # hidden 25%: direct and DReSS
    python benchmarks/dress_bench.py --rows hidden:0.1,hidden:0.25,hidden:0.5 --modes direct,dress
    python benchmarks/dress_bench.py --rows heads:0.34,mlp:0.3,layers:0.2 --modes direct
    python benchmarks/dress_bench.py --reg "--steps 200 --lambda 0.01"    # regularise options for every DReSS row
    python benchmarks/dress_bench.py --model gemma3-270m --rows hidden:0.1,hidden:0.25 --eval-windows 32

Every run is saved under benchmarks/results/ (``--save NAME``, default ``MODEL-dress``) as well as ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import DENSE_PPL, LLMPRUNE, append_results, calibrated_base, popen_rss, save_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="hidden:0.25", help="comma-separated STRUCTURE:RATIO")
    ap.add_argument("--modes", default="direct,dress", help="direct (no regularisation) and/or dress")
    ap.add_argument("--select", default="activation")
    ap.add_argument("--reg", default="", help="extra options for `llmprune regularize`")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=None, help="default: the whole test split (105 windows)")
    ap.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    ap.add_argument("--out", type=Path, default=None, help="default: runs/dress-bench (SmolLM2), runs/dress-bench-MODEL")
    ap.add_argument("--model", choices=assets.MODELS, default=assets.MODELS[0])
    ap.add_argument("--save", default="", help="results name under benchmarks/results/ (default: MODEL-dress)")
    args = ap.parse_args()

    paths = assets.fetch(model=args.model)
    if args.out is None:
        args.out = Path("runs/dress-bench" + ("" if args.model == assets.MODELS[0] else f"-{args.model}"))
    base = calibrated_base(args.out, paths, args.samples, args.seqlen)
    evalargs = ["--dataset", paths["test"], "--seqlen", str(args.seqlen)]
    if args.eval_windows:
        evalargs += ["--max-windows", str(args.eval_windows)]
    if not args.no_speed:
        evalargs += ["--speed", "--speed-baseline", str(base)]
    dense_params = json.loads((base / "manifest.json").read_text())["steps"][0]["metrics"]["parameters"]
    rows = []
    for spec in args.rows.split(","):
        structure, ratio = spec.split(":")
        for mode in args.modes.split(","):
            wd = args.out / f"{structure}-{ratio}-{mode}"
            if wd.exists():
                shutil.rmtree(wd)
            shutil.copytree(base, wd)
            sel = ["--structure", structure, "--ratio", ratio, "--select", args.select]
            reg = {}
            reg_s = reg_rss = None
            if mode == "dress":
                reg, reg_s, reg_rss = popen_rss([*LLMPRUNE, "regularize", str(wd), *sel, *args.reg.split()])
            res, _, _ = popen_rss([*LLMPRUNE, "prune", str(wd), "--method", "dress",
                                   *(sel if mode == "direct" else [])])
            ev, _, _ = popen_rss([*LLMPRUNE, "eval", str(wd), *evalargs])
            sp = ev.get("speed", {})
            row = dict(structure=structure, ratio=float(ratio), mode=mode, units=res["units_removed"],
                       parameters=res["parameters"], removed=1 - res["parameters"] / dense_params,
                       ppl=ev["perplexity"], prefill_speedup=sp.get("prefill_speedup"),
                       decode_speedup=sp.get("decode_speedup"), regularize_s=reg_s, regularize_rss_mib=reg_rss,
                       steps=reg.get("steps"), holdout_gap=reg.get("gap"), holdout_ppl_zeroed=reg.get("ppl_zeroed"),
                       reg_options=args.reg if mode == "dress" else "", windows=ev["windows"],
                       prune_s=res.get("prune_s"))
            rows.append(row)
            print(json.dumps(row), flush=True)
    append_results(args.out, rows)
    windows = rows[0]["windows"] if rows else 0
    caption = (f"{args.model}, {args.samples} x {args.seqlen} calibration windows, test perplexity over {windows} "
               f"windows of {args.seqlen}; regularize options: {args.reg or 'the defaults'}. Command: "
               "python benchmarks/dress_bench.py " + " ".join(sys.argv[1:]))
    save_results(Path(__file__).parent / "results", args.save or f"{args.model}-dress", rows, caption,
                 table(rows, dense_params, DENSE_PPL[args.model]))


def table(rows: list[dict], dense_params: int, dense_ppl: float) -> str:
    direct = {(r["structure"], r["ratio"]): r["ppl"] for r in rows if r["mode"] == "direct"}
    lines = ["| structure | ratio | mode | units | parameters | removed | ppl | ppl / direct | prefill × | decode × "
             "| regularize s | regularize RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        d = direct.get((r["structure"], r["ratio"]))
        lines.append(f"| {r['structure']} | {r['ratio']} | {r['mode']} | {r['units']} | {r['parameters']:,} | "
              f"{r['removed']:.1%} | {r['ppl']:.2f} | {f(r['ppl'] / d if d else None, '.3f')} | "
              f"{f(r['prefill_speedup'], '.2f')} | {f(r['decode_speedup'], '.2f')} | {f(r['regularize_s'], '.0f')} | "
              f"{f(r['regularize_rss_mib'], '.0f')} |")
    lines.append(f"\ndense: {dense_params:,} parameters, perplexity {dense_ppl} (docs/benchmarks.md)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
