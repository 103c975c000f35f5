"""The only module that prints: progress bars and messages on stderr, tables and JSON on stdout.

Keeping stdout for results means ``llmprune ... --json | jq`` works while progress bars still show. Every string
that reaches this module is plain text -- paths, dataset names and recipe values are the user's, and rich markup
in them (``[bold]``, ``[/x]``) must print as typed, not style the output or crash the printer -- so styles are
applied here, to ``Text`` objects, never by markup inside the strings.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from llmprune import __version__
from llmprune.fsio import dumps

err = Console(stderr=True)
out = Console()
_quiet = False
_json_events = False  # --json-progress: every message and progress line is a JSON object on stderr
LOG_EVERY_S, LOG_EVERY_FRACTION = 30.0, 0.1  # a long loop's line in a log: at least this often


def set_json_progress(on: bool) -> None:
    global _json_events
    _json_events = on


def _event(kind: str, **fields: Any) -> None:
    """One JSON object on stderr (``--json-progress``), flushed at once: a CI dashboard reads them as they come."""
    sys.stderr.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}, default=str) + "\n")
    sys.stderr.flush()


def set_quiet(quiet: bool) -> None:
    """In --json mode only the JSON document goes to stdout; messages still go to stderr."""
    global _quiet
    _quiet = quiet


def info(msg: str, *, lead: str | None = None) -> None:
    """A message on stderr; ``lead`` is printed bold before it (``step 2/5: ...``)."""
    if _json_events:
        return _event("info", message=msg, **({"lead": lead} if lead else {}))
    err.print(Text.assemble((f"{lead}: ", "bold"), msg) if lead else Text(msg), highlight=False)


def warn(msg: str) -> None:
    if _json_events:
        return _event("warning", message=msg)
    err.print(Text.assemble(("warning:", "yellow"), " ", msg), highlight=False)


def error(msg: str) -> None:
    if _json_events:
        return _event("error", message=msg)
    err.print(Text.assemble(("error:", "red"), " ", msg), highlight=False, soft_wrap=True)


_active: Progress | None = None  # the bar on screen: a progress opened inside another adds a line to it


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr; yields ``advance(n=1, note=None)``. Opened while another is showing (a step of a
    sweep), it is a second line of the same display, removed when it ends: rich shows one live display at a time.
    When stderr is not a terminal (a CI log, ``nohup``, ``| tee``) it is lines instead (``LogProgress``)."""
    global _active
    if _json_events or not err.is_terminal:
        lines = LogProgress(description, total)
        try:
            yield lines.advance
        finally:
            lines.close()
        return
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
    )
    with bar:
        task = bar.add_task(description, total=total, note="")
        _active = bar
        try:
            yield lambda n=1, note=None: bar.update(task, advance=n, **({"note": note} if note is not None else {}))
        finally:
            _active = None


def duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``12s``: the granularity a log reader wants."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class LogProgress:
    """A long loop's progress as lines: where it starts, then at least every ``LOG_EVERY_FRACTION`` of the loop or
    ``LOG_EVERY_S`` seconds (whichever comes first), and where it ends -- each with the count, the elapsed time and
    an estimate of what is left. Plain text, or JSON objects with ``--json-progress``."""

    def __init__(self, description: str, total: int):
        self.description, self.total = description, max(int(total), 0)
        self.done, self.note = 0, ""
        self.start = self.last_time = time.monotonic()
        self.last_done = 0
        self._line("start")

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        now = time.monotonic()
        step = max(1, int(self.total * LOG_EVERY_FRACTION)) if self.total else 1
        if self.done - self.last_done >= step or now - self.last_time >= LOG_EVERY_S:
            self._line("progress")
            self.last_time, self.last_done = now, self.done

    def close(self) -> None:
        if self.done != self.last_done or self.done == 0:
            self._line("end")

    def _line(self, kind: str) -> None:
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done and self.total >= self.done else None
        if _json_events:
            return _event("progress", task=self.description, phase=kind, done=self.done, total=self.total,
                          elapsed_s=round(elapsed, 1), eta_s=None if left is None else round(left, 1), note=self.note)
        pct = f" ({self.done / self.total:.0%})" if self.total else ""
        parts = [f"{self.description}: {self.done}/{self.total}{pct}", f"{duration(elapsed)} elapsed"]
        if left is not None and self.done < self.total:
            parts.append(f"about {duration(left)} left")
        if self.note:
            parts.append(self.note)
        err.print(Text(" · ".join(parts)), highlight=False, soft_wrap=True)


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
    """A command's JSON document on stdout, with the version of llmprune that wrote it."""
    sys.stdout.write(dumps({"llmprune_version": __version__, **doc}, indent=2, default=str) + "\n")
    sys.stdout.flush()
