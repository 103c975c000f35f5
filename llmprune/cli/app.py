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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version of llmprune (and of torch and transformers) and exit.")] = False,
) -> None:
    settings = ctx.ensure_object(Settings)
    if no_verify:  # the steps of a recipe inherit it from `llmprune --no-verify run`
        settings.verify = False


for _name in STEPS:  # calibrate, regularize, prune, recover, eval, export
    app.command(_name)(step_command(_name))
app.command()(status)
app.command("run")(run_recipe)
app.command("sweep")(sweep_)


def invoke(args: list[str], settings: Settings | None = None) -> int:
    """Run one command line through the app; its exit code (``_core.exit_code``)."""
    return exit_code(app(args=args, prog_name="llmprune", standalone_mode=False, obj=settings or Settings()))


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every error into one line on stderr and an exit code (see ``_errors``)."""
    args = sys.argv[1:] if argv is None else argv
    report.set_quiet("--json" in args)
    # Deprecation notices of the libraries underneath are for their developers, not for llmprune's users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    return guarded(lambda: invoke(args))


def main() -> None:
    sys.exit(run())
