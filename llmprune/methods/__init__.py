"""The pruning methods: one module each, defining ``METHOD`` (see ``base.Method``); one registry line each.

The module name is the method's name: ``prune --method wandapp`` -> ``methods/wandapp.py`` -> ``"wandapp"`` here.
The order is the order of the help text.
"""

from __future__ import annotations

import importlib

from llmprune.methods.base import Method
from llmprune.options import OptionSpec, specs as option_specs

_REGISTRY = (
    "magnitude",
    "wanda",
    "sparsegpt",
    "wandapp",
    "ria",
    "dress",
)

METHODS: dict[str, Method] = {name: importlib.import_module(f"llmprune.methods.{name}").METHOD for name in _REGISTRY}
for _name, _method in METHODS.items():
    assert _method.name == _name, f"methods/{_name}.py defines METHOD named {_method.name!r}"


def method_options() -> dict[str, list[tuple[str, OptionSpec]]]:
    """Every method option by name, with the (method, declaration) pairs that declare it, in registry order: the
    one union that ``prune``'s options, the recipe loader and the "belongs to another method" check read. Methods
    may share an option (``seed``) only with the same type."""
    out: dict[str, list[tuple[str, OptionSpec]]] = {}
    for name, m in METHODS.items():
        for o in option_specs(m.Options):
            if name_clash := [n for n, other in out.get(o.name, []) if other.type != o.type]:
                raise TypeError(f"option {o.flag}: {name_clash} declare it another type than {name} ({o.type})")
            out.setdefault(o.name, []).append((name, o))
    return out
