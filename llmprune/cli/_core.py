"""What every command shares: the session settings, the workdir argument and ``--json``, rendering."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from llmprune import report
from llmprune.workdir import Workdir


@dataclass
class Settings:
    """Set once per command line and handed to the workdir it opens (``llmprune run`` hands it on to the steps of
    a recipe): ``verify`` is off with ``llmprune --no-verify``."""

    verify: bool = True


def open_workdir(ctx: typer.Context, path: Path) -> Workdir:
    s = ctx.find_object(Settings) or Settings()
    return Workdir(path, verify=s.verify)


def exit_code(rv: Any) -> int:
    """What a command line run outside click's standalone mode returned, as an exit code: Typer turns Ctrl-C into
    Exit(130) and, outside standalone mode, *returns* that code instead of raising it."""
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


# --- options that several commands take -----------------------------------------------------------------------
WorkdirArg = Annotated[Path, typer.Argument(help="The working directory (safetensors shards + manifest.json).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout instead of tables.")]


# --- rendering --------------------------------------------------------------------------------------------------
def finish(result: dict[str, Any], as_json: bool, render: Callable[[], None]) -> None:
    """The command's result: a JSON document with ``--json``, else what ``render`` prints."""
    if as_json:
        report.emit_json(result)
    else:
        render()
