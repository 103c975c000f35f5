"""The only module that prints: progress bars and messages on stderr, tables and JSON on stdout.

Keeping stdout for results means ``llmprune ... --json | jq`` works while progress bars still show. Every string
that reaches this module is plain text -- paths, dataset names and recipe values are the user's, and rich markup
in them (``[bold]``, ``[/x]``) must print as typed, not style the output or crash the printer -- so styles are
applied here, to ``Text`` objects, never by markup inside the strings.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

err = Console(stderr=True)
out = Console()
_quiet = False


def set_quiet(quiet: bool) -> None:
    """In --json mode only the JSON document goes to stdout; messages still go to stderr."""
    global _quiet
    _quiet = quiet


def info(msg: str, *, lead: str | None = None) -> None:
    """A message on stderr; ``lead`` is printed bold before it (``step 2/5: ...``)."""
    err.print(Text.assemble((f"{lead}: ", "bold"), msg) if lead else Text(msg), highlight=False)


def warn(msg: str) -> None:
    err.print(Text.assemble(("warning:", "yellow"), " ", msg), highlight=False)


def error(msg: str) -> None:
    err.print(Text.assemble(("error:", "red"), " ", msg), highlight=False, soft_wrap=True)


_active: Progress | None = None  # the bar on screen: a progress opened inside another adds a line to it


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr; yields ``advance(n=1, **fields)``. Opened while another is showing (a step of a
    sweep), it is a second line of the same display, removed when it ends: rich shows one live display at a time."""
    global _active
    if _active is not None:
        outer = _active
        task = outer.add_task(description, total=total, note="")
        try:
            yield lambda n=1, note=None: outer.update(task, advance=n, **({"note": note} if note is not None else {}))
        finally:
            outer.remove_task(task)
        return
    bar = Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}", markup=False),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    with bar:
        task = bar.add_task(description, total=total, note="")
        _active = bar
        try:
            yield lambda n=1, note=None: bar.update(task, advance=n, **({"note": note} if note is not None else {}))
        finally:
            _active = None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No tables for the ``with`` body (the steps of a sweep); messages and progress still show."""
    global _quiet
    before, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = before


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    if _quiet:
        return
    t = Table(title=Text(title), title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(Text(c), justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[Text(fmt(v)) for v in r])
    out.print(t)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 1 else f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def number(v: Any, spec: str = ".3f") -> str:
    """A metric read back from a manifest or a results file, formatted with ``spec``: "–" where it is not a number
    (strict JSON writes a NaN or infinite value as null)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "–"
    return format(v, spec)


def emit_json(doc: dict[str, Any]) -> None:
    from llmprune.fsio import dumps

    sys.stdout.write(dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()
