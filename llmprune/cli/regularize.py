"""``llmprune regularize``: DReSS's first step (``prune --method dress`` is the second); the step is
``steps/regularize.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune import report


def render(m: dict[str, Any], o: Any, workdir: Path) -> None:
    report.table(
        f"regularized {o.structure} {_size(m['plan'])} ({m['units_removed']} units, {o.select})", ["held-out", "before", "after"],
        [["perplexity", m["before"]["ppl"], m["ppl"]], ["perplexity, units zeroed", m["before"]["ppl_zeroed"],
          m["ppl_zeroed"]], ["relative norm of the units", m["before"]["relative_norm"], m["relative_norm"]],
         *([[f"teacher, corrected {c['steps']} steps", c["ppl_before"], c["ppl_after"]]]
           if (c := m.get("teacher_correction")) else []),
         ["steps", 0, f"{m['steps']} ({m['passes']:g} passes over {m['train_windows']} windows" + (
             f" of {m['trained_on']})" if m["trained_on"] != "calibration windows" else " of the calibration)")], ["time", "", f"{m['train_s']:.1f} s"]])


def _size(plan: dict) -> str:
    """A plan's ratio, or a combination's split (its parts' ratios; the combination's own ratio is 0)."""
    if "+" in plan["structure"]:
        return ", ".join(f"{p['structure']} {p['ratio']:.0%}" for p in plan["removed"])
    return f"{plan['ratio']:.0%}"

