"""``llmprune sweep``: a grid of prune configurations from one calibrated workdir, evaluated, tabled and plotted (the
command on top of the steps is ``steps/sweep.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune import report
from llmprune.cli._build import command
from llmprune.errors import UserError
from llmprune.steps import sweep


def render(res: dict[str, Any], o: Any, workdir: Path) -> None:
    report.table(
        f"sweep of {workdir}: {len(res['ran'])} ran, {len(res['skipped'])} done before, {len(res['failed'])} failed "
        f"→ {res['results']}", ["point", "perplexity", "parameters", "sparsity", "tasks mean", "prefill ×", "status"],
        [[r["name"], r.get("perplexity", "–"), r.get("parameters", "–"),
          "–" if r.get("achieved_sparsity") is None else f"{r['achieved_sparsity']:.2%}",
          "–" if r.get("tasks_mean") is None else f"{r['tasks_mean']:.4f}",
          r.get("prefill_speedup") or "–", r["status"] if r["status"] == "done" else f"failed: {r['error']}"]
         for r in res["rows"]])


def refuse_failed(res: dict[str, Any]) -> None:
    """A sweep with failed points exits non-zero, once its table (or JSON) is out."""
    if res["failed"]:
        raise UserError(f"{len(res['failed'])} of {len(res['rows'])} points failed ({', '.join(res['failed'])}); the "
                        f"others are in {res['results']}")


sweep_ = command(sweep.STEP, render, after=refuse_failed)
