"""``llmprune branch``: a workdir's current state as a new workdir, to try alternatives side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmprune import report
from llmprune.cli._core import JsonOpt, WorkdirArg, finish, open_workdir


def branch(
    ctx: typer.Context,
    workdir: WorkdirArg,
    dest: Annotated[Path, typer.Argument(help="The new workdir (a new folder on the same filesystem).")],
    as_json: JsonOpt = False,
) -> None:
    """Copy a workdir's current state to a new workdir as hard links (no extra space: steps never modify a file in
    place), e.g. to prune it two ways and compare."""
    ws = open_workdir(ctx, workdir)
    ws.branch(dest)
    steps = ws.manifest()["steps"]
    res = {"workdir": str(workdir), "branch": str(dest), "steps": len(steps)}
    finish(res, as_json, lambda: report.info(f"{dest}: a branch of {workdir} after its {len(steps)} step(s)"))
