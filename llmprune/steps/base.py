"""What a step is to the rest of the tool: its options class, its ``run``, and the ways its options arrive.

A step's options arrive three ways: a command line (the CLI builds the command from ``Step.specs``), a recipe's
``[[step]]`` table (``from_mapping``) and a sweep point's option list (``from_argv``). All three end in the same
options class, checked by the same ``run``: a recipe entry or a sweep point is its hand-typed command by construction.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llmprune.errors import UserError
from llmprune.options import OptionSpec, specs, strip_optional
from llmprune.steps import StepKind

if TYPE_CHECKING:
    from llmprune.workdir import Workdir


def _no_extra() -> list[OptionSpec]:
    return []


@dataclass(frozen=True)
class Step:
    """``kind``: the workdir step it is (None for the commands on top of the steps: ``run``, ``sweep``).
    ``extra``: options beyond the class's own (``prune``: every method's); ``build`` makes the options object from
    values by name (default: the class itself)."""

    name: str
    Options: type
    run: Callable[["Workdir", Any], dict[str, Any]]
    summary: str
    kind: StepKind | None = None
    extra: Callable[[], list[OptionSpec]] = _no_extra
    build: Callable[[dict[str, Any]], Any] | None = None

    def specs(self) -> list[OptionSpec]:
        return specs(self.Options) + self.extra()

    def options(self, values: dict[str, Any]) -> Any:
        """The options object from values by option name (absent: the declared default)."""
        return self.build(values) if self.build is not None else self.Options(**values)

    def lookup(self) -> dict[str, OptionSpec]:
        """Each option under its field name and under its long option without dashes (``lam`` and ``lambda``)."""
        out: dict[str, OptionSpec] = {}
        for o in self.specs():
            out[o.name] = o
            for s in (o.flag, *o.aliases):
                out[s[2:].replace("-", "_")] = o
        return out


# --- values from a recipe or an option list ---------------------------------------------------------------------
def convert(o: OptionSpec, value: Any, where: str, key: str | None = None) -> Any:
    """A recipe's TOML value (or an option list's string) as the option's declared type: what click does to a
    typed command line, spelled out for values that arrive typed."""
    typ, key = strip_optional(o.type), key or o.name
    if o.repeated:  # a list option: each value as its element type (a recipe may give one value or a list)
        element = OptionSpec(o.name, typing.get_args(typ)[0], None, o.help)
        return [convert(element, v, where, key) for v in (value if isinstance(value, list) else [value])]
    if typ is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: '{key}' is a flag; use true or false")
        return value
    if isinstance(value, bool):
        raise UserError(f"{where}: '{key}' takes a value, not {str(value).lower()}")
    try:
        if typ is int:
            if isinstance(value, float):
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
    except ValueError:
        what = "a whole number" if typ is int else "a number"
        raise UserError(f"{where}: '{key}' = {value!r} is not {what}") from None
    if typ is Path:
        return Path(str(value))
    return str(value)


def from_mapping(step: Step, mapping: dict[str, Any], where: str) -> Any:
    """The options of a recipe entry (keys: option names, dashes or underscores)."""
    known = step.lookup()
    values = {}
    for key, value in mapping.items():
        o = known.get(key.replace("-", "_"))
        if o is None:
            raise UserError(f"{where}: unknown option '{key}'; {step.name} takes {', '.join(sorted(known))}")
        values[o.name] = convert(o, value, where, key)
    return step.options(values)


def option_strings(o: OptionSpec) -> list[tuple[str, Any]]:
    """(option string, value it sets) for each spelling of ``o``: a boolean's ``--x``/``--no-x`` (one string when
    declared as a plain flag such as ``--full``), a value option's ``--x`` with None (the value follows)."""
    if not o.is_flag:
        return [(s, None) for s in (o.flag, *o.aliases)]
    if o.declared_flag and "/" in o.declared_flag:
        pos, neg = o.declared_flag.split("/")
        return [(pos, True), (neg, False)]
    if o.declared_flag:
        return [(o.declared_flag, True)]
    return [(o.flag, True), ("--no-" + o.flag[2:], False)]


def from_argv(step: Step, args: list[str], where: str) -> Any:
    """The options of an option list as typed after ``llmprune STEP WORK`` (``--name VALUE``, ``--name=VALUE``,
    ``--flag``, ``--no-flag``)."""
    flags = {s: (o, v) for o in step.specs() for s, v in option_strings(o)}
    values: dict[str, Any] = {}
    rest = list(args)
    while rest:
        token = rest.pop(0)
        name, eq, inline = token.partition("=")
        if name not in flags:
            raise UserError(f"{where}: {step.name} has no option {name}")
        o, flag_value = flags[name]
        if o.is_flag:
            values[o.name] = flag_value
            continue
        if not eq:
            if not rest:
                raise UserError(f"{where}: {name} needs a value")
            inline = rest.pop(0)
        value = convert(o, inline, where)
        values[o.name] = values.get(o.name, []) + value if o.repeated else value
    return step.options(values)


def to_argv(step: Step, mapping: dict[str, Any]) -> list[str]:
    """The option list a user would type for these values (a recipe's plan shows it)."""
    known = step.lookup()
    out: list[str] = []
    for key, value in mapping.items():
        o = known[key.replace("-", "_")]
        if o.is_flag:
            out += [s for s, v in option_strings(o) if v is bool(value)][:1]
        elif o.repeated:
            out += [x for v in (value if isinstance(value, list) else [value]) for x in (o.flag, str(v))]
        else:
            out += [o.flag, str(value)]
    return out
