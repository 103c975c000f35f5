"""DReSS hyper-parameter ablation on the calibration split only (never the test split).

Every setting runs ``llmprune regularize`` on a copy of one calibrated workdir; the score is what ``regularize``
itself measures on its held-out calibration windows (``--holdout``, not trained on): the perplexity with the selected
units zeroed, i.e. of the model after removal. Step 0 of each run is the direct-removal control on the same windows.

    python benchmarks/dress_ablation.py                         # the default grid, 50 steps each (~6 min a setting)
    python benchmarks/dress_ablation.py --steps 100 --grid "lambda=0.01;lambda=0.02"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, append_results, calibrated_base, popen_rss  # noqa: E402

# One setting per entry: options that differ from the base options below.
GRID = [
    "lambda=0.04",
    "lambda=0.02",
    "lambda=0.04 lr=1e-4",
    "lambda=0.04 lr=2e-5",
    "lambda=0.04 norm=l2",
    "lambda=0.04 norm=l1",
    "lambda=0.04 select=random",
    "lambda=1 shrink=loss",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default=";".join(GRID), help="settings separated by ';', each 'key=value ...'")
    ap.add_argument("--base", default="structure=hidden ratio=0.25 lr=5e-5 norm=group select=activation shrink=prox")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--holdout", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("runs/dress-ablation"))
    args = ap.parse_args()

    paths = assets.fetch()
    base = calibrated_base(args.out, paths, args.samples, args.seqlen)
    rows = []
    for setting in args.grid.split(";"):
        opts = dict(kv.split("=") for kv in args.base.split())
        opts.update(dict(kv.split("=") for kv in setting.split()))
        wd = args.out / "run"
        if wd.exists():
            shutil.rmtree(wd)
        shutil.copytree(base, wd)
        flags = [x for k, v in opts.items() for x in (f"--{k}", v)]
        res, wall, rss = popen_rss([*LLMPRUNE, "regularize", str(wd), *flags, "--steps", str(args.steps),
                                    "--holdout", str(args.holdout), "--eval-every", str(args.steps)])
        first, last = res["before"], res["evals"][-1]
        row = dict(setting=setting, direct_ppl=first["ppl_zeroed"], dense_ppl=first["ppl"], ppl=last["ppl"],
                   ppl_removed=last["ppl_zeroed"], relative_norm=last["relative_norm"], wall_s=wall, rss_mib=rss,
                   final_loss=sum(res["loss"][-10:]) / 10)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nheld-out: the last {args.holdout} of {args.samples} calibration windows; {args.steps} steps; "
          f"base options: {args.base}")
    print("\n| setting | ppl after removal | ppl, units kept | relative norm | direct removal | train loss | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['ppl_removed']:.2f} | {r['ppl']:.2f} | {r['relative_norm']:.2g} | "
              f"{r['direct_ppl']:.2f} | {r['final_loss']:.3f} | {r['wall_s']:.0f} |")
    append_results(args.out, rows)


if __name__ == "__main__":
    main()
