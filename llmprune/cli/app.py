"""The ``llmprune`` app: wires the commands (one per workdir step, built from ``steps.registry.STEPS``; ``status``,
``run`` and ``sweep``) and the global options; nothing else."""

from __future__ import annotations

import sys
import warnings
from typing import Annotated

import typer

from llmprune import __version__, report
from llmprune.cli._errors import guarded
from llmprune.cli._core import Settings, exit_code
from llmprune.cli.branch import branch
from llmprune.cli.commands import step_command
from llmprune.cli.recipe import run_recipe
from llmprune.cli.status import status
from llmprune.cli.sweep import sweep_
from llmprune.methods import METHODS
from llmprune.steps.registry import STEPS

HELP = (f"Prune causal language models ({', '.join(m.label for m in METHODS.values())}) through a working "
        "directory.")

app = typer.Typer(name="llmprune", help=HELP, no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=True, context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        import torch
        import transformers

        report.out.print(f"llmprune {__version__} (torch {torch.__version__}, transformers {transformers.__version__})",
                         highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    ctx: typer.Context,
    no_verify: Annotated[bool, typer.Option("--no-verify", envvar="LLMPRUNE_NO_VERIFY", help="Skip the SHA-256 check of the workdir's files before a step reads them (huge models); every step run so records `inputs_verified: false` in the manifest.")] = False,
    json_progress: Annotated[bool, typer.Option("--json-progress", help="Progress, messages and errors as JSON objects on stderr, one per line (for CI dashboards).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version of llmprune (and of torch and transformers) and exit.")] = False,
) -> None:
    """The global options; each may also come after the subcommand (``llmprune prune WORK --no-verify``)."""
    report.set_json_progress(json_progress)
    settings = ctx.ensure_object(Settings)
    if no_verify:  # the steps of a recipe inherit it from `llmprune --no-verify run`
        settings.verify = False


for _name in STEPS:  # calibrate, regularize, prune, recover, eval, export
    app.command(_name)(step_command(_name))
app.command()(status)
app.command()(branch)
app.command("run")(run_recipe)
app.command("sweep")(sweep_)


def invoke(args: list[str], settings: Settings | None = None) -> int:
    """Run one command line through the app; its exit code (``_core.exit_code``)."""
    return exit_code(app(args=args, prog_name="llmprune", standalone_mode=False, obj=settings or Settings()))


GLOBAL_FLAGS = ("--no-verify", "--json-progress")


def hoist_globals(args: list[str]) -> list[str]:
    """The global flags moved before the subcommand wherever they were typed (click takes them only there); a
    ``--`` ends the options."""
    end = args.index("--") if "--" in args else len(args)
    flags = [a for a in args[:end] if a in GLOBAL_FLAGS]
    return flags + [a for i, a in enumerate(args) if i >= end or a not in GLOBAL_FLAGS]


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every error into one line on stderr and an exit code (see ``_errors``); with
    ``--json`` an error is also a JSON document on stdout (``{"error": ..., "exit_code": ...}``)."""
    args = hoist_globals(sys.argv[1:] if argv is None else list(argv))
    as_json = "--json" in args
    report.set_quiet(as_json)
    report.set_json_progress("--json-progress" in args)  # before parsing: a usage error is an event too
    # Deprecation notices of the libraries underneath are for their developers, not for llmprune's users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    on_error = (lambda msg, code: report.emit_json({"error": msg, "exit_code": code})) if as_json else None
    return guarded(lambda: invoke(args), on_error)


def main() -> None:
    sys.exit(run())
