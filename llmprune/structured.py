"""Structured removal's plans and the verbs on them: hidden channels, attention heads (whole KV groups), MLP
channels, whole decoder blocks, and the routed experts of mixture-of-experts blocks. What each of these structure
kinds is -- its units, its limits, the slices that couple with it -- is its module in ``structures/``; this module
looks it up in the registry (``structures.STRUCTURES``).

A ``Plan`` names the units to remove. ``slices`` turns it into the exact parameter slices that couple with those
units (read from the architecture table, ``arch.Parts``). Three verbs share the slices, so they always agree:

- ``zero``: the dense model with the units switched off (the DReSS "zeroed" model, and the direct-removal control);
- the DReSS penalty and shrink (``penalty.py``), which act on the same slices during training;
- ``surgery.remove``: a physically smaller model built from a *standard* config (``surgery.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune.errors import UserError
from llmprune.structures import STRUCTURES as KINDS
from llmprune.structures.base import Coupling, Geometry, Slice, Structure, geometry, module_name

__all__ = ["STRUCTURES", "ORDER", "Plan", "Slice", "Geometry", "geometry", "kind", "units_per_group", "tail_units",
           "count_removed", "count_removed_or_none", "align_ratio", "width_multiple_option", "WIDTHS",
           "split_structures", "check_supported", "module_name", "slices", "zero"]

STRUCTURES = tuple(KINDS)  # the names, in the registry's order: hidden, heads, mlp, layers, experts
# A combination ("mlp+layers") removes its parts in this order. Each part's indices refer to the original model:
# hidden channels, KV groups, MLP channels and experts are independent index spaces, so removing one leaves the
# others' indices valid, and blocks go last, so the per-block lists still line up with the blocks.
ORDER = tuple(sorted(KINDS, key=lambda name: KINDS[name].order))


@dataclass
class Plan:
    """What to remove. ``removed`` is a list of channel / block indices for ``hidden`` and ``layers``, and one list
    per block (KV-group, MLP-channel or expert indices; empty for a block without experts) for ``heads``, ``mlp`` and
    ``experts``."""

    structure: str
    removed: list[Any]
    ratio: float = 0.0
    select: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"structure": self.structure, "ratio": self.ratio, "select": self.select, "removed": self.removed,
                **self.meta}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        meta = {k: v for k, v in d.items() if k not in ("structure", "ratio", "select", "removed")}
        return cls(d["structure"], d["removed"], d.get("ratio", 0.0), d.get("select", ""), meta)

    @property
    def parts(self) -> list["Plan"]:
        """The single-structure plans of a combination, in removal order (``[self]`` for a single structure)."""
        if "+" not in self.structure:
            return [self]
        return sorted((Plan.from_json(d) for d in self.removed), key=lambda p: ORDER.index(p.structure))

    @property
    def n_units(self) -> int:
        if "+" in self.structure:
            return sum(p.n_units for p in self.parts)
        if self.structure in KINDS and not KINDS[self.structure].per_block:
            return len(self.removed)
        return sum(len(r) for r in self.removed)


def kind(structure: str) -> Structure:
    """The kind named ``structure``; an error naming the known ones if there is none."""
    if structure not in KINDS:
        raise UserError(f"unknown structure '{structure}'; use one of: {', '.join(STRUCTURES)}")
    return KINDS[structure]


def units_per_group(g: Geometry, structure: str) -> int:
    """How many units one ratio applies to: hidden channels, KV groups per block, MLP channels per block, blocks,
    routed experts per MoE block."""
    return KINDS[structure].units(g)


def tail_units(g: Geometry, structure: str, n: int) -> list[int]:
    """The last ``n`` unit indices of ``structure``; for blocks, the last ones before the final block, which every
    model needs (``--select tail``, and any ``n`` units where only their number matters)."""
    return KINDS[structure].tail(g, n)


def count_removed(g: Geometry, structure: str, ratio: float) -> int:
    """Units removed for ``ratio``; an error if none would be left."""
    k = kind(structure)
    if not 0 <= ratio < 1:
        raise UserError(f"--ratio must be in [0, 1), got {ratio}")
    total = k.units(g)
    n = k.count(g, math.floor(ratio * total + 0.5))  # half up: Python's round() would take 0.5 of 2 KV groups to 0
    if n >= total:
        raise UserError(f"--ratio {ratio} would leave no {k.what} (there are {total})")
    if n == 0 and ratio > 0:
        # e.g. heads on a multi-query model (one KV group): a step that removes nothing must not pass for a success.
        smallest = math.ceil(k.fewest(g) / total * 1e4) / 1e4
        raise UserError(f"--ratio {ratio} removes none of the {total} {k.what}; "
                        + (f"the smallest ratio that removes any is {smallest:g}"
                           if count_removed_or_none(g, structure, smallest) else "none can be removed"))
    return n


WIDTHS = ("mlp", "hidden")  # the kinds whose removal leaves a width: --width-multiple aligns it


def width_multiple_option() -> int:
    """``--width-multiple``, declared once for ``regularize`` and ``prune --method dress``."""
    from llmprune.options import option, positive

    return option(1, "--structure mlp or hidden: keep the width a multiple of this, the nearest such width to what "
                  "--ratio or --target-params asks for (256: whole k-quant blocks in a GGUF file and kernel-friendly "
                  "shapes; docs/gguf.md).", check=positive)


def align_ratio(g: Geometry, structure: str, ratio: float, multiple: int) -> float:
    """The ratio whose removal keeps a width (MLP channels, hidden size) that is a multiple of ``multiple``: the
    multiple nearest the width ``ratio`` keeps (half up), at least one multiple, and for the hidden size also a
    multiple of the head count (``Hidden.count``). Odd widths cost more than their parameters in llama.cpp: a
    k-quant packs rows in blocks of 256, and a row that is not a whole number of them falls back to a wider type
    (benchmarks/README.md, "GGUF")."""
    if multiple == 1:
        return ratio
    if "+" in structure or structure not in WIDTHS:
        raise UserError(f"--width-multiple aligns one width: --structure {' or '.join(WIDTHS)}, not {structure}")
    step = math.lcm(multiple, g.heads) if structure == "hidden" else multiple
    total = kind(structure).units(g)
    kept = total - count_removed(g, structure, ratio)
    aligned = max(step, step * math.floor(kept / step + 0.5))
    if aligned >= total:
        raise UserError(f"--width-multiple {multiple}: the nearest such width to {kept} is {aligned} of {total}, "
                        "which removes nothing")
    return (total - aligned) / total


def count_removed_or_none(g: Geometry, structure: str, ratio: float) -> int | None:
    """``count_removed``, or None where that ratio is refused."""
    try:
        return count_removed(g, structure, ratio)
    except UserError:
        return None


def split_structures(structure: str) -> list[str]:
    """``"mlp+layers"`` -> ``["mlp", "layers"]``, each known and none twice."""
    names = structure.split("+")
    bad = [n for n in names if n not in STRUCTURES]
    if bad or len(set(names)) != len(names):
        raise UserError(f"--structure {structure}: use one of {', '.join(STRUCTURES)}, or several joined by '+' "
                        "(each once)")
    return names


def check_supported(model: nn.Module, structure: str) -> None:
    if "+" in structure:
        for part in split_structures(structure):
            check_supported(model, part)
        return
    a = _arch.arch_for(model.config.model_type)
    reason = dict(a.parts.cannot).get(structure)
    if structure in KINDS:
        reason = KINDS[structure].missing(a, model.config) or reason
    if reason:
        raise UserError(f"--structure {structure} is not possible for {model.config.model_type}: {reason}")


def slices(model: nn.Module, plan: Plan) -> list[Slice]:
    """Every parameter slice that belongs to the plan's units (each kind's ``couple``). Tied parameters appear
    under each of their names. A combination's parts are numbered one after the other (unit ids stay distinct for
    the group norms)."""
    if "+" in plan.structure:
        out, offset = [], 0
        for part in plan.parts:
            got = slices(model, part)
            out += [Slice(sl.param, sl.dim, sl.index, sl.unit + offset) for sl in got]
            offset += max((int(sl.unit.max()) + 1 for sl in got), default=0)
        return out
    k = kind(plan.structure)
    c = Coupling(model)
    k.couple(c, plan.removed)
    return c.out


@torch.no_grad()
def zero(model: nn.Module, plan: Plan) -> None:
    """Switch the plan's units off in place (the dense model with the removed parts at zero)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for sl in slices(model, plan):
        if sl.param in params:  # not a buffer: a router's correction bias is no weight to switch off
            params[sl.param].data.index_fill_(sl.dim, sl.index, 0)


