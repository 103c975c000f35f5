"""The pruning methods: one module each, defining ``METHOD`` (see ``base.Method``); one registry line each.

The module name is the method's name: ``prune --method wandapp`` -> ``methods/wandapp.py`` -> ``"wandapp"`` here.
The order is the order of the help text.
"""

from __future__ import annotations

import importlib

from llmprune.methods.base import Method

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
