"""One command per workdir step, built from the step's declarations (``_build.command``) with the table its module
in ``cli/`` prints -- or, for a step without one, a table of the result's values."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from llmprune import report
from llmprune.cli._build import Render, command
from llmprune.cli.calibrate import render as calibrate_table
from llmprune.cli.eval_ import render as eval_table
from llmprune.cli.export import render as export_table
from llmprune.cli.prune import render as prune_table
from llmprune.cli.recover import render as recover_table
from llmprune.cli.regularize import render as regularize_table
from llmprune.steps.registry import STEPS

TABLES: dict[str, Render] = {"calibrate": calibrate_table, "regularize": regularize_table, "prune": prune_table,
                             "recover": recover_table, "eval": eval_table, "export": export_table}
NO_WORKDIR_KEY = {"export"}  # its JSON document is about the folder it wrote


def values_table(name: str) -> Render:
    """The table of a step without one of its own: each scalar of its result."""
    def render(res: dict[str, Any], o: Any, workdir: Path) -> None:
        report.table(f"{name} {workdir}", ["what", "value"],
                     [[k, v] for k, v in res.items() if isinstance(v, (str, int, float, bool)) or v is None])
    return render


def table(name: str) -> Render:
    return TABLES.get(name) or values_table(name)


def step_command(name: str) -> Callable[..., None]:
    return command(STEPS[name], table(name), json_workdir=name not in NO_WORKDIR_KEY)
