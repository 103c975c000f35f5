"""Each command's signature, built from its step's option declarations: one typer option per declared option
(its flag, help, panel, default; choices shown and completed by the shell), so an option is declared once, in
its step, and the command line, the recipe loader and the checks agree by construction."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Callable

import typer

from llmprune.cli._core import JsonOpt, WorkdirArg, finish, open_workdir
from llmprune.options import OptionSpec
from llmprune.steps.base import Step

Render = Callable[[dict[str, Any], Any, Path], None]


def _completer(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    return lambda incomplete: [c for c in choices if c.startswith(incomplete)]


def parameter(o: OptionSpec) -> inspect.Parameter:
    """The typer option of one declared option."""
    extra: dict[str, Any] = {}
    if o.choices:
        extra.update(metavar="[" + "|".join(o.choices) + "]", autocompletion=_completer(o.choices))
    # Undeclared names are left to typer, which derives ``--x`` (and ``--x/--no-x`` for a boolean) from the field.
    decls = o.decls if o.declared_flag or o.aliases else ()
    info = typer.Option(*decls, help=o.help, rich_help_panel=o.panel, show_default=o.show_default, **extra)
    return inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY,
                             default=inspect.Parameter.empty if o.required else o.default,
                             annotation=Annotated[o.type, info])


def command(step: Step, render: Render, *, run: Callable[..., dict[str, Any]] | None = None,
            json_workdir: bool = True, after: Callable[[dict[str, Any]], None] | None = None) -> Callable[..., None]:
    """The typer command of ``step``: parse, build the options, ``run`` (default: the step's), print the result --
    JSON with ``--json``, else ``render(result, options, workdir)`` -- then ``after(result)`` (a sweep with failed
    points exits non-zero once its table is out)."""
    run = run or step.run

    def cmd(ctx: typer.Context, workdir: Path, as_json: bool = False, **values: Any) -> None:
        options = step.options(values)
        res = run(open_workdir(ctx, workdir), options)
        out = {"workdir": str(workdir), **res} if json_workdir else res
        finish(out, as_json, lambda: render(res, options, workdir))
        if after is not None:
            after(res)

    head = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
            inspect.Parameter("workdir", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=WorkdirArg)]
    params = head + [parameter(o) for o in step.specs()] + [
        inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOpt)]
    cmd.__signature__ = inspect.Signature(params)
    cmd.__annotations__ = {p.name: p.annotation for p in params}
    cmd.__doc__ = step.summary
    cmd.__name__ = step.name
    return cmd
