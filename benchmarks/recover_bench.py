"""LoRA recovery on the real model of docs/benchmarks.md: prune, then `llmprune recover` on the calibration split, with the
test perplexity before and after, the held-out curve (steps vs perplexity), the cost (seconds, peak RSS), and a
check that every pruned weight of the merged model is still exactly zero.

    python benchmarks/recover_bench.py                                  # Wanda 2:4, 150 steps
    python benchmarks/recover_bench.py --prune "--method dress --ratio 0.25" --steps 150
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, calibrated_base, popen_rss  # noqa: E402


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prune", default="--method wanda --pattern 2:4")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--recover", default="", help="extra options for `llmprune recover`")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("runs/recover-bench"))
    args = ap.parse_args()

    paths = assets.fetch()
    base = calibrated_base(args.out, paths, args.samples, args.seqlen)
    wd = args.out / "run"
    if wd.exists():
        shutil.rmtree(wd)
    shutil.copytree(base, wd)
    evalargs = ["--dataset", paths["test"], "--seqlen", str(args.seqlen)]
    popen_rss([*LLMPRUNE, "prune", str(wd), *args.prune.split()])
    pruned = weights(wd / "model")
    before, _, _ = popen_rss([*LLMPRUNE, "eval", str(wd), *evalargs])
    rec, wall, rss = popen_rss([*LLMPRUNE, "recover", str(wd), "--steps", str(args.steps), *args.recover.split()])
    after, _, _ = popen_rss([*LLMPRUNE, "eval", str(wd), *evalargs])
    merged = weights(wd / "model")
    # Exact zeros: every weight that was zero after pruning is zero after the merge, to the last one.
    lost = sum(int((merged[k][pruned[k] == 0] != 0).sum()) for k in pruned if k.endswith("proj.weight"))
    zeros_before = sum(int((pruned[k] == 0).sum()) for k in pruned if k.endswith("proj.weight"))
    row = dict(prune=args.prune, steps=rec["steps"], test_ppl_before=before["perplexity"],
               test_ppl_after=after["perplexity"], change=after["perplexity"] / before["perplexity"] - 1,
               recover_s=wall, train_s=rec["train_s"], peak_rss_mib=rss, zeros_before=zeros_before, zeros_lost=lost,
               sparsity_after=rec.get("sparsity", {}).get("all"), heldout_curve=rec["curve"],
               ppl_adapter=rec["ppl_adapter"], ppl_remasked=rec.get("ppl_remasked"))
    print(json.dumps(row), flush=True)
    print(f"\n{args.prune} + LoRA recovery ({rec['steps']} steps, {rec['trainable_parameters']:,} trainable):")
    print("\n| | test perplexity |\n|---|---|")
    print(f"| after pruning | {before['perplexity']:.2f} |\n| after recovery (merged, re-masked) | "
          f"{after['perplexity']:.2f} ({row['change']:+.1%}) |")
    print("\n| step | held-out perplexity (calibration windows) |\n|---|---|")
    for e in [{"step": 0, "ppl": rec["ppl_before"]}, *rec["curve"]]:
        print(f"| {e['step']} | {e['ppl']:.2f} |")
    print(f"\nrecover: {wall:.0f} s wall ({rec['train_s']:.0f} s training), peak RSS {rss:.0f} MiB; "
          f"zeros after pruning {zeros_before:,}, non-zero after the merge {lost}")
    (args.out / "results.json").write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
