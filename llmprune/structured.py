"""Structured removal's vocabulary and coupling table: hidden channels, attention heads (whole KV groups), MLP
channels, whole decoder blocks, and the routed experts of mixture-of-experts blocks.

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

STRUCTURES = ("hidden", "heads", "mlp", "layers", "experts")
# A combination ("mlp+layers") removes its parts in this order. Each part's indices refer to the original model:
# hidden channels, KV groups, MLP channels and experts are independent index spaces, so removing one leaves the
# others' indices valid, and blocks go last, so the per-block lists still line up with the blocks.
ORDER = ("hidden", "heads", "mlp", "experts", "layers")


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
        if self.structure in ("hidden", "layers"):
            return len(self.removed)
        return sum(len(r) for r in self.removed)


@dataclass
class Slice:
    """Positions ``index`` along ``dim`` of parameter ``param`` belong to removed units; ``unit[i]`` is the unit
    (channel, KV group or block) of ``index[i]``, which the group norms of the DReSS penalty need."""

    param: str
    dim: int
    index: torch.Tensor
    unit: torch.Tensor


@dataclass(frozen=True)
class Geometry:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    experts: int = 0  # routed experts per mixture-of-experts block (0: a dense model)

    @property
    def rep(self) -> int:  # query heads per KV group
        return self.heads // self.kv_heads


def geometry(model: nn.Module) -> Geometry:
    c = model.config
    parts = _arch.arch_for(c.model_type).parts
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    spec = _arch.arch_for(c.model_type).experts
    experts = int(getattr(c, spec.count, 0) or 0) if spec is not None else 0
    return Geometry(c.hidden_size, c.num_hidden_layers, heads, kv, head_dim, getattr(c, parts.mlp_width), experts)


def units_per_group(g: Geometry, structure: str) -> int:
    """How many units one ratio applies to: hidden channels, KV groups per block, MLP channels per block, blocks,
    routed experts per MoE block."""
    return {"hidden": g.hidden, "heads": g.kv_heads, "mlp": g.mlp, "layers": g.layers, "experts": g.experts}[structure]


def tail_units(g: Geometry, structure: str, n: int) -> list[int]:
    """The last ``n`` unit indices of ``structure``; for blocks, the last ones before the final block, which every
    model needs (``--select tail``, and any ``n`` units where only their number matters)."""
    total = units_per_group(g, structure)
    return list(range(total - 1 - n, total - 1)) if structure == "layers" else list(range(total - n, total))


def count_removed(g: Geometry, structure: str, ratio: float) -> int:
    """Units removed for ``ratio``; an error if none would be left."""
    if structure not in STRUCTURES:
        raise UserError(f"unknown structure '{structure}'; use one of: {', '.join(STRUCTURES)}")
    if not 0 <= ratio < 1:
        raise UserError(f"--ratio must be in [0, 1), got {ratio}")
    total = units_per_group(g, structure)
    n = math.floor(ratio * total + 0.5)  # half up: Python's round() would take 0.5 of 2 KV groups to 0
    if structure == "hidden":
        # transformers' config validation (LlamaConfig) wants hidden_size to stay a multiple of the number of
        # attention heads, even with an explicit head_dim: keep the nearest such width.
        n = total - g.heads * math.floor((total - n) / g.heads + 0.5)
    what = {"hidden": "hidden channels", "heads": "KV groups per block", "mlp": "MLP channels per block",
            "layers": "decoder blocks", "experts": "routed experts per MoE block"}[structure]
    if n >= total:
        raise UserError(f"--ratio {ratio} would leave no {what} (there are {total})")
    if n == 0 and ratio > 0:
        # e.g. heads on a multi-query model (one KV group): a step that removes nothing must not pass for a success.
        # Hidden channels go a multiple of the head count at a time, so the first rounding must pass half of it.
        smallest = ((g.heads // 2 + 0.5) if structure == "hidden" else 0.5) / total
        raise UserError(f"--ratio {ratio} removes none of the {total} {what}; "
                        + (f"the smallest ratio that removes any is {math.ceil(smallest * 1e4) / 1e4:g}"
                           if count_removed_or_none(g, structure, math.ceil(smallest * 1e4) / 1e4) else
                           "none can be removed"))
    return n


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
    if structure == "experts" and a.experts is None:
        reason = "it has no mixture-of-experts blocks"
    if reason:
        raise UserError(f"--structure {structure} is not possible for {model.config.model_type}: {reason}")


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


class _Coupling:
    """The slices of one model being gathered: ``add`` a parameter's rows or columns, ``add_module`` a module's weight
    (and bias), ``blk`` a block's module name. What couples with each structure is one function below."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.a = _arch.arch_for(model.config.model_type)
        self.p = self.a.parts
        self.g = geometry(model)
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.out: list[Slice] = []

    def add(self, name: str, dim: int, index: list[int], unit: list[int]) -> None:
        if name in self.params and index:
            self.out.append(Slice(name, dim, torch.tensor(index, dtype=torch.long),
                                  torch.tensor(unit, dtype=torch.long)))

    def add_module(self, mod: str, dim: int, index: list[int], unit: list[int], bias: bool) -> None:
        self.add(f"{mod}.weight", dim, index, unit)
        if bias:
            self.add(f"{mod}.bias", 0, index, unit)

    def blk(self, i: int, name: str) -> str:
        return f"{self.a.layers}.{i}.{name}"


def _hidden(c: _Coupling, removed) -> None:
    """A hidden channel: a column of every input-side Linear and of the embeddings, a row of every output-side
    Linear and an entry of every norm."""
    p, idx = c.p, list(removed)
    unit = list(range(len(idx)))
    c.add(f"{p.embed}.weight", 1, idx, unit)
    c.add(f"{module_name(c.model, c.model.get_output_embeddings())}.weight", 1, idx, unit)
    c.add_module(p.final_norm, 0, idx, unit, bias=True)
    for i in range(c.g.layers):
        for lin in dict.fromkeys((p.q, p.k, p.v, *p.mlp_in)):  # a fused projection once
            c.add(f"{c.blk(i, lin)}.weight", 1, idx, unit)  # input side
        for lin in (p.o, p.mlp_out):
            c.add_module(c.blk(i, lin), 0, idx, unit, bias=True)  # output side, and its bias
        for norm in p.norms:
            c.add_module(c.blk(i, norm), 0, idx, unit, bias=True)


def _heads(c: _Coupling, removed) -> None:
    """A KV group: its key and value rows, the rows of every query head that reads it, and their columns of o."""
    p, g, u = c.p, c.g, 0
    for i, groups in enumerate(removed):
        q_rows, kv_rows, q_unit, kv_unit = [], [], [], []
        for grp in groups:
            for h in range(grp * g.rep, (grp + 1) * g.rep):
                q_rows += range(h * g.head_dim, (h + 1) * g.head_dim)
                q_unit += [u] * g.head_dim
            kv_rows += range(grp * g.head_dim, (grp + 1) * g.head_dim)
            kv_unit += [u] * g.head_dim
            u += 1
        if p.qkv_fused:  # rows [q (heads x head_dim); k (kv x head_dim); v (kv x head_dim)]
            k_at, v_at = g.heads * g.head_dim, (g.heads + g.kv_heads) * g.head_dim
            c.add_module(c.blk(i, p.q), 0, q_rows + [k_at + r for r in kv_rows] + [v_at + r for r in kv_rows],
                         q_unit + kv_unit + kv_unit, bias=True)
        else:
            c.add_module(c.blk(i, p.q), 0, q_rows, q_unit, bias=True)
            c.add_module(c.blk(i, p.k), 0, kv_rows, kv_unit, bias=True)
            c.add_module(c.blk(i, p.v), 0, kv_rows, kv_unit, bias=True)
        c.add(f"{c.blk(i, p.o)}.weight", 1, q_rows, q_unit)


def _mlp(c: _Coupling, removed) -> None:
    """An MLP channel: a row of the gate and up projections, a column of the down projection."""
    p, u = c.p, 0
    for i, chans in enumerate(removed):
        unit = list(range(u, u + len(chans)))
        u += len(chans)
        if p.mlp_in_fused:  # rows [gate (mlp); up (mlp)]
            c.add_module(c.blk(i, p.mlp_in[0]), 0, list(chans) + [c.g.mlp + ch for ch in chans], unit + unit,
                         bias=True)
        for lin in () if p.mlp_in_fused else p.mlp_in:
            c.add_module(c.blk(i, lin), 0, list(chans), unit, bias=True)
        c.add(f"{c.blk(i, p.mlp_out)}.weight", 1, list(chans), unit)


def _experts(c: _Coupling, removed) -> None:
    """An expert: row e of both 3-D parameters and of the router go together."""
    spec, u = c.a.experts, 0
    for i, experts in enumerate(removed):
        unit = list(range(u, u + len(experts)))
        u += len(experts)
        for param, _ in spec.params:
            c.add(f"{c.blk(i, spec.path)}.{param}", 0, list(experts), unit)
        c.add_module(c.blk(i, spec.router), 0, list(experts), unit, bias=True)


def _layers(c: _Coupling, removed) -> None:
    """A block whose two output projections are zero adds nothing to the residual stream: it is the identity."""
    for u, i in enumerate(removed):
        for lin in (c.p.o, c.p.mlp_out):
            name = c.blk(i, lin)
            rows = c.params[f"{name}.weight"].shape[0]
            c.add_module(name, 0, list(range(rows)), [u] * rows, bias=True)


_COUPLING = {"hidden": _hidden, "heads": _heads, "mlp": _mlp, "experts": _experts, "layers": _layers}


def slices(model: nn.Module, plan: Plan) -> list[Slice]:
    """Every parameter slice that belongs to the plan's units. Tied parameters appear under each of their names.
    A combination's parts are numbered one after the other (unit ids stay distinct for the group norms)."""
    if "+" in plan.structure:
        out, offset = [], 0
        for part in plan.parts:
            got = slices(model, part)
            out += [Slice(sl.param, sl.dim, sl.index, sl.unit + offset) for sl in got]
            offset += max((int(sl.unit.max()) + 1 for sl in got), default=0)
        return out
    if plan.structure not in _COUPLING:
        raise UserError(f"unknown structure '{plan.structure}'; use one of: {', '.join(STRUCTURES)}")
    c = _Coupling(model)
    _COUPLING[plan.structure](c, plan.removed)
    return c.out


@torch.no_grad()
def zero(model: nn.Module, plan: Plan) -> None:
    """Switch the plan's units off in place (the dense model with the removed parts at zero)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for sl in slices(model, plan):
        params[sl.param].data.index_fill_(sl.dim, sl.index, 0)


