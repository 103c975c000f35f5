"""The structure kinds of structured removal (DReSS): one module each, defining ``KIND`` (see ``base.Structure``);
one registry line each (docs/methods.md, section 8.2).

The module name is the kind's name: ``--structure mlp`` -> ``structures/mlp.py`` -> ``"mlp"`` here. The order is
the order of ``--structure``'s vocabulary in messages and help; a combination's removal order is each kind's
``order``.
"""

from __future__ import annotations

import importlib

from llmprune.structures.base import Geometry, Slice, Structure, geometry

_REGISTRY = (
    "hidden",
    "heads",
    "mlp",
    "layers",
    "experts",
)

STRUCTURES: dict[str, Structure] = {name: importlib.import_module(f"llmprune.structures.{name}").KIND
                                    for name in _REGISTRY}
for _name, _kind in STRUCTURES.items():
    assert _kind.name == _name, f"structures/{_name}.py defines KIND named {_kind.name!r}"

__all__ = ["STRUCTURES", "Geometry", "Slice", "Structure", "geometry"]
