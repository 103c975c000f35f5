"""Wanda++ hyper-parameter ablation on the calibration split only (never the test split).

The calibration split is cut in two on an article boundary: the first 90% gives the calibration windows (64 x 512 at
the protocol's random starts), the last 10% is the tuning slice, scored by perplexity over non-overlapping windows.
Each setting runs ``llmprune prune --method wandapp`` (2:4 by default) on a copy of one calibrated workdir.

    python benchmarks/wandapp_ablation.py                                   # alpha sweep, RGS only (~5 min each)
    python benchmarks/wandapp_ablation.py --grid "alpha=10 ro_iters=5;alpha=10 ro_iters=5 ro_lr=3e-6"
    python benchmarks/wandapp_ablation.py --model gemma3-270m --grid "alpha=0 ro_step=relative ro_lr=3e-3"
    python benchmarks/wandapp_ablation.py --grid "alpha=100 ro_iters=0 true_sequential=true" --save smollm2-rgs-seq

Rows accumulate in ``OUT/results.json``; ``--save NAME`` also writes this run's rows and table under
benchmarks/results/ as ``NAME-DATE.{json,md}``.

Both models share the protocol's calibration text, so their tuning slices are the same articles. ``--method`` tunes
another method the same way (OWL's lambda and M over Wanda, for one); a pattern such as ``0.6`` is that unstructured
sparsity:

    python benchmarks/wandapp_ablation.py --method wanda --pattern 0.6 --grid "defaults;owl_lambda=0.02;owl_m=3"

A setting ``method=NAME`` runs that method instead, so a baseline is timed in the same run:

    python benchmarks/wandapp_ablation.py --grid "method=wanda;defaults;ro_dtype=bf16" --save smollm2-wandapp-bf16
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, append_results, calibrated_base, popen_rss, save_results  # noqa: E402

# alpha = 0 with RO off is Wanda's score exactly (a test checks it): the row every other one is read against.
GRID = ["alpha=0 ro_iters=0", "alpha=3 ro_iters=0", "alpha=10 ro_iters=0", "alpha=30 ro_iters=0",
        "alpha=100 ro_iters=0"]


def split_calibration(calib: Path, tune_fraction: float = 0.1) -> tuple[Path, Path]:
    """(fit, tune) text files cut from the calibration split on an article boundary; cached next to it."""
    fit, tune = calib.with_name("wiki-calib-fit.txt"), calib.with_name("wiki-calib-tune.txt")
    if not (fit.is_file() and tune.is_file()):
        articles = calib.read_text(encoding="utf-8").split("\n\n")
        cut = int(len(articles) * (1 - tune_fraction))
        fit.write_text("\n\n".join(articles[:cut]), encoding="utf-8")
        tune.write_text("\n\n".join(articles[cut:]), encoding="utf-8")
    return fit, tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default=";".join(GRID), help="settings separated by ';', each 'key=value ...'")
    ap.add_argument("--pattern", default="2:4", help="unstructured, N:M, or an unstructured sparsity such as 0.6")
    ap.add_argument("--method", default="wandapp")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--tune-windows", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None, help="default: runs/wandapp-ablation[-MODEL]")
    ap.add_argument("--model", choices=assets.MODELS, default=assets.MODELS[0])
    ap.add_argument("--save", default="", help="also save this run's rows and table as benchmarks/results/NAME-DATE.*")
    args = ap.parse_args()
    if args.out is None:
        args.out = Path("runs/wandapp-ablation" + ("" if args.model == assets.MODELS[0] else f"-{args.model}"))
    shape = (["--pattern", "unstructured", "--sparsity", args.pattern] if args.pattern[:1].isdigit() and ":" not in
             args.pattern else ["--pattern", args.pattern])

    paths = assets.fetch(model=args.model)
    fit, tune = split_calibration(Path(paths["calib"]))
    base = calibrated_base(args.out, {**paths, "calib": str(fit)}, args.samples, args.seqlen)
    evalargs = ["--dataset", str(tune), "--seqlen", str(args.seqlen), "--max-windows", str(args.tune_windows)]
    dense, _, _ = popen_rss([*LLMPRUNE, "eval", str(base), *evalargs])
    print(json.dumps({"dense_tune_ppl": dense["perplexity"]}), flush=True)
    rows = []
    for setting in args.grid.split(";"):
        # "defaults" (or an empty setting): the method with no options, the row the others are read against
        opts = dict(kv.split("=") for kv in setting.split() if kv != "defaults")
        # method=NAME runs that method instead (e.g. Wanda's row, timed in the same run as Wanda++'s)
        method = opts.pop("method", args.method)
        wd = args.out / "run"
        if wd.exists():
            shutil.rmtree(wd)
        shutil.copytree(base, wd)
        # key=true is a switch (true_sequential=true -> --true-sequential)
        flags = [x for k, v in opts.items()
                 for x in ((f"--{k.replace('_', '-')}",) if v == "true" else (f"--{k.replace('_', '-')}", v))]
        res, wall, rss = popen_rss([*LLMPRUNE, "prune", str(wd), "--method", method, *shape, *flags])
        ev, _, _ = popen_rss([*LLMPRUNE, "eval", str(wd), *evalargs])
        row = dict(model=args.model, method=method, setting=setting, pattern=args.pattern,
                   tune_ppl=ev["perplexity"], windows=ev["windows"],
                   prune_s=res["capture_s"] + res["prune_s"] + res["propagate_s"] + res.get("owl_s", 0.0), rss_mib=rss)
        rows.append(row)
        print(json.dumps(row), flush=True)
    caption = (f"{args.model}, {args.method} at {args.pattern}; tuning slice: the last 10% of the calibration split's "
               f"articles, {rows[0]['windows'] if rows else 0} windows of {args.seqlen}; dense {dense['perplexity']:.2f}; "
               f"calibration: {args.samples} x {args.seqlen} from the rest")
    table = (f"| {args.method} setting ({args.pattern}) | tuning-slice perplexity | prune s | peak RSS MiB |\n"
             "|---|---|---|---|\n" + "\n".join(f"| {r['setting']} | {r['tune_ppl']:.2f} | {r['prune_s']:.0f} | "
                                              f"{r['rss_mib']:.0f} |" for r in rows))
    print("\n" + caption)
    if args.save:
        save_results(Path(__file__).parent / "results", args.save,
                     [dict(r, dense_tune_ppl=dense["perplexity"]) for r in rows], caption, table)
    else:
        print("\n" + table)
    append_results(args.out, rows)


if __name__ == "__main__":
    main()
