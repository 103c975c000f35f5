"""Structured removal on the real model of BENCHMARK.md: DReSS (regularise, then remove) against direct removal of
the same units, with parameters, test perplexity, the saved model's prefill / decode speed-up over dense (timed in
the same run), and the wall time and peak RSS of ``regularize``.

    python benchmarks/dress_bench.py                                        # hidden 25%: direct and DReSS
    python benchmarks/dress_bench.py --rows hidden:0.1,hidden:0.25,hidden:0.5 --modes direct,dress
    python benchmarks/dress_bench.py --rows heads:0.34,mlp:0.3,layers:0.2 --modes direct
    python benchmarks/dress_bench.py --reg "--steps 200 --lambda 0.01"    # regularise options for every DReSS row
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, calibrated_base, popen_rss  # noqa: E402

DENSE_PPL = 14.59


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
    ap.add_argument("--out", type=Path, default=Path("runs/dress-bench"))
    args = ap.parse_args()

    paths = assets.fetch()
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
                       reg_options=args.reg if mode == "dress" else "")
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows, dense_params)
    out = args.out / "results.json"
    old = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(old + rows, indent=2))


def print_table(rows: list[dict], dense_params: int) -> None:
    direct = {(r["structure"], r["ratio"]): r["ppl"] for r in rows if r["mode"] == "direct"}
    print("\n| structure | ratio | mode | units | parameters | removed | ppl | ppl / direct | prefill × | decode × "
          "| regularize s | regularize RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        d = direct.get((r["structure"], r["ratio"]))
        print(f"| {r['structure']} | {r['ratio']} | {r['mode']} | {r['units']} | {r['parameters']:,} | "
              f"{r['removed']:.1%} | {r['ppl']:.2f} | {f(r['ppl'] / d if d else None, '.3f')} | "
              f"{f(r['prefill_speedup'], '.2f')} | {f(r['decode_speedup'], '.2f')} | {f(r['regularize_s'], '.0f')} | "
              f"{f(r['regularize_rss_mib'], '.0f')} |")
    print(f"\ndense: {dense_params:,} parameters, perplexity {DENSE_PPL} (BENCHMARK.md)")


if __name__ == "__main__":
    main()
