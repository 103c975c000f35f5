"""Options, declared once: a dataclass field made with ``option()`` is a command-line option, a recipe key and a
recorded parameter at the same time.

The ``prune`` method options (``methods/*.py``) and every step's options class (``steps/*.py``) are declared here;
the CLI builds each command's signature from the declarations (``cli/_build.py``), the recipe loader accepts exactly
the declared names, and ``check`` runs the per-value checks, so a value is refused with the same line however it
arrived.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from llmprune.errors import UserError

REQUIRED: Any = dataclasses.MISSING  # an option without a default must be given


def option(default: Any = REQUIRED, help: str = "", *, check: Callable[[Any], str | None] | None = None,
           choices: tuple[str, ...] = (), flag: str | None = None, panel: str | None = None,
           strict: bool = True, show_default: bool = True, cli: bool = True, aliases: tuple[str, ...] = ()) -> Any:
    """One option as a dataclass field.

    ``check(value)`` returns what is wrong with a given value (``"must be positive"``) or None; ``choices`` are the
    values it may take (shown in ``--help`` and completed by the shell); ``flag`` overrides the option string
    (default: the field name with dashes, ``ro_lr`` -> ``--ro-lr``; ``"--full"`` makes a boolean a plain flag without
    ``--no-full``, ``"--masked/--no-masked"`` names both); ``aliases``: older spellings still accepted (an
    option renamed never loses its old name); ``panel`` groups it in ``--help``; ``strict=False``: the choices are shown but the value is
    checked by the step (``--dtype BF16`` is a bfloat16 too). ``cli=False``: a field
    the step fills itself, never an option."""
    return field(default=default, metadata={"help": help, "check": check, "choices": tuple(choices), "strict": strict, "flag": flag, "aliases": tuple(aliases),
                                            "panel": panel, "show_default": show_default, "cli": cli})


@dataclass(frozen=True)
class OptionSpec:
    """One option as the CLI, the recipe loader and the checks see it."""

    name: str  # the field name: ``ro_lr``
    type: Any
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    declared_flag: str | None = None
    panel: str | None = None
    show_default: bool = True
    strict: bool = True  # the value must be one of ``choices``
    aliases: tuple[str, ...] = ()  # older option strings, still accepted

    @property
    def flag(self) -> str:
        """The long option string (the positive one of a ``--x/--no-x`` pair)."""
        return (self.declared_flag or "--" + self.name.replace("_", "-")).split("/")[0]

    @property
    def decls(self) -> tuple[str, ...]:
        """The option strings as click declares them."""
        return ((self.declared_flag,) if self.declared_flag else ("--" + self.name.replace("_", "-"),)) + self.aliases

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def is_flag(self) -> bool:
        return strip_optional(self.type) is bool

    @property
    def repeated(self) -> bool:
        """An option given once per value (``--dataset a --dataset b``): a list."""
        return typing.get_origin(strip_optional(self.type)) is list


def specs(options_cls: type) -> list[OptionSpec]:
    """The options of a class declared with ``option()``, in declaration order (fields with ``cli=False`` left out)."""
    hints = typing.get_type_hints(options_cls)
    return [OptionSpec(f.name, hints[f.name], f.default, f.metadata.get("help", ""), f.metadata.get("choices", ()),
                       f.metadata.get("check"), f.metadata.get("flag"), f.metadata.get("panel"),
                       f.metadata.get("show_default", True), f.metadata.get("strict", True),
                       f.metadata.get("aliases", ()))
            for f in dataclasses.fields(options_cls) if f.metadata.get("cli", True)]


def strip_optional(typ: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    return args[0] if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(args) == 1 else typ


def check_value(o: OptionSpec, v: Any) -> None:
    """A given value against its declaration: one of the choices, and what ``check`` says (None: not given)."""
    if v is None:
        return
    if o.choices and o.strict and v not in o.choices:
        raise UserError(f"unknown {o.flag} '{v}'; use one of: {', '.join(o.choices)}")
    problem = o.check(v) if o.check else None
    if problem:
        raise UserError(f"{o.flag} {problem}, got {v}")


def check_all(options: Any) -> None:
    """Every declared value of ``options`` checked, in declaration order."""
    for o in specs(type(options)):
        check_value(o, getattr(options, o.name))


# --- the checks options share -----------------------------------------------------------------------------------
# NaN compares false to everything, so a check written ``v <= 0`` would let it through: each test says what holds.
def positive(v: Any) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be positive"


def non_negative(v: Any) -> str | None:
    return None if math.isfinite(v) and v >= 0 else "must be >= 0"


def at_least_two(v: Any) -> str | None:
    return None if v >= 2 else "must be at least 2"


def fraction_open(v: Any) -> str | None:
    """A fraction of units to remove: 0 would remove nothing, 1 everything."""
    return None if math.isfinite(v) and 0 < v < 1 else "must be in (0, 1)"


def check_device(device: str) -> str:
    """The device a step runs on: ``auto`` is CUDA when torch sees a CUDA device, else the CPU; ``cuda`` and
    ``cuda:N`` need one. Returned as resolved (a step records where it ran, not ``auto``)."""
    if device == "cpu":
        return device
    if device == "auto" or device.startswith("cuda"):
        import torch  # only when a CUDA device is asked about: `--help` and CPU runs never pay for the probe

        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available")
        return device
    raise UserError(f"unknown --device '{device}'; use auto, cpu, cuda or cuda:N")


# --- options several steps share (each declared here, once) ----------------------------------------------------
def text_field_option() -> str:
    return option("text", "Text field of .jsonl/.json/.parquet and hf: sources.")


def device_option(what: str = "where each block runs") -> str:
    return option("auto", f"auto (CUDA when present, else the CPU), cpu, cuda or cuda:N: {what}; recorded as "
                  "resolved.", panel=DEVICE_PANEL)


def batch_option(default: int = 4, what: str = "Windows per forward pass.") -> int:
    return option(default, what, check=positive, panel=DEVICE_PANEL)


def precision_option() -> str:
    return option("auto", "auto (bf16 on CUDA, fp32 on the CPU), fp32 or bf16: the passes under bf16 autocast, the "
                  "weights and optimizer state kept in fp32; recorded as resolved.",
                  choices=("auto", "fp32", "bf16"), strict=False, panel=DEVICE_PANEL)


def schedule_option() -> str:
    return option("constant", "Learning-rate schedule: constant, or cosine (a linear warmup over the first 10% of "
                  "the steps, then a cosine decay to zero).", choices=("constant", "cosine"))


def memory_check_option() -> bool:
    return option(True, "Estimate the step's peak memory before loading anything (recorded) and refuse a step "
                  "that would not fit, naming what would.", flag="--memory-check/--no-memory-check",
                  panel=DEVICE_PANEL)


def grad_checkpointing_option() -> bool:
    return option(False, "Trade compute for activation memory.", panel=DEVICE_PANEL)


DEVICE_PANEL = "Device and memory"
