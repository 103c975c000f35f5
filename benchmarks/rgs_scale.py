"""Wanda++'s regional-gradient term against the activation term, Linear by Linear, on a real model's dense blocks.

The RGS score is ``(alpha * G + ||X_j||) * |W|``: how much ``alpha`` changes the masks depends on the scale of
``G`` against ``||X_j||``, and that scale moves with the calibration size (``||X_j||`` over all tokens grows like
the square root of their number, ``G`` does not) and the model's width. For every Linear of every block (walking
the *dense* model, so each block sees the dense inputs) this prints ``median(G) / median(||X_j||)`` and, for a list
of ``alpha``, the fraction of the 2:4 decisions that differ from Wanda's (``alpha`` = 0). ``G`` is checked against
an independent computation (``torch.func`` per-sample gradients of the same loss) on the first block.

    python benchmarks/rgs_scale.py WORKDIR [--windows 64] [--alphas 1,3,10,30,100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def main() -> None:
    from llmprune import units
    from llmprune import engine
    from llmprune.masks import Pattern, select
    from llmprune.methods import wandapp
    from llmprune.current import open_current
    from llmprune.workdir import Workdir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path, help="a calibrated workdir (its windows and its model)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--alphas", default="1,3,10,30,100")
    ap.add_argument("--save", default="", help="a name: results go to benchmarks/results/NAME.{json,md}")
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]

    ws = Workdir(args.workdir)
    lm, _, weights = open_current(ws, tokenizer=False)
    windows = ws.windows()[: args.windows]
    acts = engine.capture(lm, windows, 1, "cpu", weights=weights)
    rows = []
    two4 = Pattern(2, 4)
    walk = engine.Walk(lm, acts, "cpu", "RGS scale", last_outputs=False, weights=weights)
    for i, block, inputs in walk:
        dense = wandapp.DensePass(block, inputs, "cpu", keep_outputs=False, need_grads=True)
        if i == 0:
            check_against_func(block, inputs, dense.grads)
        norms = dense.norms(list(range(inputs.n_samples)), "sum")
        for name, lin in units.block_linears(block).items():
            w, g, x = lin.weight.data, dense.grads[name], norms[name]
            wanda = select(wandapp.rgs_score(w, None, x, 0.0), two4, 0.5)
            # k pruned weights swapped for k others differ in 2k places of N, and N / 2 are pruned: the share of
            # the pruned weights that changed is the share of places that differ.
            changed = {a: float((select(wandapp.rgs_score(w, g, x, a), two4, 0.5) != wanda).float().mean())
                       for a in alphas}
            rows.append(dict(block=i, linear=name, g_over_x=float(g.median() / x.median()),
                             g_median=float(g.median()), x_median=float(x.median()), changed=changed))
        print(json.dumps(rows[-1]), flush=True)
    table = render(rows, alphas, args)
    print(table)
    if args.save:
        out = Path(__file__).parent / "results"
        (out / f"{args.save}.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / f"{args.save}.md").write_text(table + "\n")


def check_against_func(block, acts, grads) -> None:
    """G from ``torch.func``: the gradient of ``||f(X_n)||_2`` for each sample by ``grad`` of a functional call,
    their RMS over the samples. Must match the method's own per-sample backward passes."""
    from torch.func import functional_call, grad

    from llmprune import units

    names = {n: lin for n, lin in units.block_linears(block).items()}
    pnames = {n: next(k for k, p in block.named_parameters() if p is lin.weight) for n, lin in names.items()}
    params = {k: p.detach() for k, p in block.named_parameters()}

    def loss(ws_, h, kw):
        out = functional_call(block, {**params, **ws_}, (h,), kw)
        return (out[0] if isinstance(out, tuple) else out).float().norm()

    sq = {n: torch.zeros_like(names[n].weight, dtype=torch.float32) for n in names}
    for h, kw in zip(acts.hidden, acts.kwargs):
        gs = grad(loss)({pnames[n]: names[n].weight.detach() for n in names}, h.float(), kw)
        for n in names:
            sq[n] += gs[pnames[n]].float() ** 2
    for n in names:
        ref = (sq[n] / max(acts.n_samples, 1)).sqrt()
        err = float((ref - grads[n]).abs().max() / ref.abs().max())
        if err > 1e-3:
            sys.exit(f"G of {n} differs from torch.func's by {err:.2e} (relative)")
    print("G checked against torch.func on block 0: every Linear within 1e-3", flush=True)


def render(rows, alphas, args) -> str:
    lines = [f"RGS scale on {args.workdir} ({args.windows} windows; ||X|| summed over all tokens, the paper's form).",
             "", "| linear | median G / median ‖X‖ (median over blocks) | "
             + " | ".join(f"2:4 choices changed, alpha {a:g}" for a in alphas) + " |",
             "|---|---|" + "---|" * len(alphas)]
    for name in dict.fromkeys(r["linear"] for r in rows):
        mine = [r for r in rows if r["linear"] == name]
        lines.append(f"| {name} | {statistics.median(r['g_over_x'] for r in mine):.3g} | "
                     + " | ".join(f"{statistics.mean(r['changed'][a] for r in mine):.1%}" for a in alphas) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
