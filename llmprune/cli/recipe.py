"""``llmprune run``: a whole pipeline from a recipe (``steps/recipe.py``), each step's table printed as the step's
own command prints it."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from llmprune import report
from llmprune.cli._build import command
from llmprune.cli.commands import table
from llmprune.steps import recipe


def render(res: dict[str, Any], o: Any, workdir: Path) -> None:
    if res.get("dry_run"):
        report.table(f"plan for {workdir} from {o.recipe}", ["#", "step", "action", "options"],
                     [[p["step"], p["command"], p["why"], " ".join(p["argv"])] for p in res["plan"]])
        return
    ran = res["ran"]
    report.table(f"{workdir}: recipe {o.recipe} done", ["#", "step", "result"],
                 [[p["step"], p["command"], next((f"ran in {r['seconds']:.1f} s" for r in ran if r["step"] == p["step"]),
                                                 "skipped (done)")] for p in res["plan"]])


def _show(workdir: Path, command_name: str, res: dict[str, Any], options: Any) -> None:
    table(command_name)(res, options, workdir)


def _run(ws, o) -> dict[str, Any]:
    return recipe.run(ws, o, partial(_show, ws.path))


run_recipe = command(recipe.STEP, render, run=_run)
