"""What every command shares: the session settings, the option aliases, the checks of option values, rendering."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from llmprune import report
from llmprune.errors import UserError
from llmprune.workdir import Workdir


@dataclass
class Settings:
    """Set once per command line and handed to every workdir it opens (and, by ``llmprune run``, to the steps of a
    recipe): ``verify`` is off with ``llmprune --no-verify``; ``recipe`` tags each step with its recipe entry."""

    verify: bool = True
    recipe: Optional[dict[str, Any]] = None


def open_workdir(ctx: typer.Context, path: Path) -> Workdir:
    s = ctx.find_object(Settings) or Settings()
    return Workdir(path, verify=s.verify, recipe=s.recipe)


def exit_code(rv: Any) -> int:
    """What a command line run outside click's standalone mode returned, as an exit code: Typer turns Ctrl-C into
    Exit(130) and, outside standalone mode, *returns* that code instead of raising it."""
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def invoke_sibling(ctx: typer.Context, args: list[str], settings: Settings) -> int:
    """Run another command line of this same app (a recipe's step, a sweep's point): the root command of ``ctx`` is
    the app itself, so a command that replays others needs no import of the module that wires them."""
    root = ctx.find_root().command
    return exit_code(root.main(args=args, prog_name="llmprune", standalone_mode=False, obj=settings))


# --- options that several commands take -----------------------------------------------------------------------
WorkdirArg = Annotated[Path, typer.Argument(help="The working directory (safetensors shards + manifest.json).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout instead of tables.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N: where each block runs.")]
BatchOpt = Annotated[int, typer.Option(help="Windows per forward pass.")]
TextFieldOpt = Annotated[str, typer.Option(help="Text field of .jsonl/.json/.parquet and hf: sources.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the data order (and of --select random).")]
GradCkptOpt = Annotated[bool, typer.Option(help="Trade compute for activation memory.")]
DistillOpt = Annotated[bool, typer.Option("--distill", help="Train on the KL divergence from the dense teacher's next-token distribution (the workdir's teacher/, or --teacher).")]
KdTemperatureOpt = Annotated[Optional[float], typer.Option(help="--distill: softmax temperature T of both distributions (the loss is scaled by T^2; default 1).")]
KdWeightOpt = Annotated[Optional[float], typer.Option(help="--distill: the KD share of the loss, in (0, 1]; the rest is the LM loss (default 1).")]
TeacherOpt = Annotated[Optional[str], typer.Option(help="--distill: the teacher, a Hub id, safetensors folder or .gguf file (default: the workdir's teacher/, kept by calibrate).")]


# --- checks of option values ------------------------------------------------------------------------------------
def check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available")
        return device
    raise UserError(f"unknown --device '{device}'; use cpu, cuda or cuda:N")


def positive(**values: int | float) -> None:
    """``--name must be a positive number`` for the first value that is not (NaN and infinity included: NaN
    compares false to everything, so a check written ``v <= 0`` lets it through)."""
    for name, v in values.items():
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")


# --- rendering --------------------------------------------------------------------------------------------------
def finish(result: dict[str, Any], as_json: bool, render: Callable[[], None]) -> None:
    """The command's result: a JSON document with ``--json``, else what ``render`` prints."""
    if as_json:
        report.emit_json(result)
    else:
        render()
