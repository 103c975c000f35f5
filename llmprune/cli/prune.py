"""``llmprune prune``: the command of ``steps/prune.py`` (its general options there, each method's from the method's
declaration), and the tables it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune import report


def render(res: dict[str, Any], o: Any, workdir: Path) -> None:
    if "units_removed" in res:  # structured
        before, after = res["geometry_before"], res["geometry"]
        budget = res.get("budget")
        plan = res.get("plan") or {}
        split = ", ".join(f"{p['structure']} {p['ratio']:.0%}" for p in plan["removed"]) if "+" in res["structure"] \
            and isinstance(plan.get("removed"), list) else ""
        size = (f"to {budget['target']:,} parameters" if budget else f"{res['ratio']:.0%}") + (f" ({split})" if split else "")
        report.table(
            f"{res['method']} {res['structure']} {size} "
            f"({'regularised' if res['regularized'] else 'direct removal'}, {res['select']})",
            ["what", "before", "after"],
            [["parameters", res["parameters_before"], res["parameters"]]]
            + [[k, v, after[k]] for k, v in before.items() if v != after[k]]
            + [["time", "", f"{res['prune_s']:.1f} s"]])
        if budget and "alternatives" in budget:
            report.table("the budget's split (held-out calibration windows)", ["split", "parameters", "held-out ppl"],
                         [[", ".join(f"{s} {r:.3f}" for s, r in a["ratios"].items())
                           + (" (chosen)" if a == budget["chosen"] else ""), a["parameters"], a["heldout_ppl"]]
                          for a in budget["alternatives"]])
        return
    total = res["prune_s"] + res["propagate_s"] + res["capture_s"] + res.get("owl_s", 0.0)
    report.table(
        f"{res['method']} {res['pattern']} {res['target_sparsity']:.0%}: achieved sparsity", ["layer type", "sparsity"],
        [[k, f"{v:.2%}"] for k, v in res["sparsity"].items()] + [["prune time", f"{total:.1f} s"]])
    if "target_block_sparsity" in res:
        report.table("OWL: sparsity per block", ["block", "outlier ratio", "target", "achieved"],
                     [[i, f"{d:.4f}", f"{t:.2%}", f"{a:.2%}"] for i, (d, t, a) in
                      enumerate(zip(res["outlier_ratio"], res["target_block_sparsity"], res["block_sparsity"]))])

