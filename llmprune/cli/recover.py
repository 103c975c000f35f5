"""``llmprune recover``: recovery fine-tuning (the step is ``steps/recover.py``) and the table it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune import report
from llmprune.steps.recover import LORA_DEFAULTS


def render(m: dict[str, Any], o: Any, workdir: Path) -> None:
    rank = LORA_DEFAULTS["rank"] if o.rank is None else o.rank
    how = ("all weights" if o.full else f"LoRA r={rank}") + (", distilled" if o.distill else "")
    report.table(f"recovered {workdir} ({how})", ["what", "value"], _rows(m, o.full, o.merge, o.distill))


def _rows(m: dict, full: bool, merge: bool, distill: bool) -> list[list]:
    """The table of a finished recovery: perplexities before and after (merged, re-zeroed), sparsity, cost."""
    rows = [["held-out perplexity before", m["ppl_before"]],
            ["after training" if full else "with the adapter", m["ppl_after" if full else "ppl_adapter"]]]
    if distill:
        rows.append(["KD loss (last steps)", m["final_kd"]])
    if m.get("teacher_correction"):
        c = m["teacher_correction"]
        rows.append([f"teacher, corrected {c['steps']} steps", f"{c['ppl_before']} -> {c['ppl_after']} held-out "
                     f"perplexity ({c['seconds']:.0f} s" + (", kept from the interrupted run)" if c.get("reused") else ")")])
    if full:
        rows.append(["sparsity", f"{m['sparsity']['all']:.2%} (before {m['sparsity_before']['all']:.2%})"])
    if merge and not full:
        rows += [["merged", m["ppl_merged"]], [f"merged, {m['weights_remasked']:,} weights re-zeroed", m["ppl_remasked"]],
                 ["sparsity", f"{m['sparsity']['all']:.2%} (before {m['sparsity_before']['all']:.2%})"]]
    return rows + [["steps", m["steps"]], ["time", f"{m['train_s']:.1f} s"]]

