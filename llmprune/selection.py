"""Which units DReSS removes: the selection vocabulary and the unit scores it ranks by.

``activation`` (lowest on calibration data: the RMS of each hidden channel, a KV group's or an MLP channel's
contribution, ShortGPT's block influence; for experts REAP), ``reap`` and ``frequency`` (experts only), ``tail`` (the
last units; for blocks the last before the final block) and ``random`` (seeded). Scores measured on calibration data
do not depend on how many units go (``unit_scores`` once, ``select`` at any ratio), which the budget search uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import engine
from llmprune.errors import UserError
from llmprune.stats import RowNorms
from llmprune.structured import (
    STRUCTURES,
    Plan,
    check_supported,
    count_removed,
    geometry,
    split_structures,
    tail_units,
    units_per_group,
)


SELECTS = ("activation", "tail", "random", "reap", "frequency")


EXPERT_SELECTS = ("reap", "frequency")  # experts only; "activation" means reap there


SELECT_WINDOWS = 16  # windows the activation scores are measured on: channel RMS is stable well before that


def part_selection(part: str, select: str) -> str:
    """A combination's selection for one of its parts: an experts-only selection (reap, frequency) means
    ``activation`` for the parts that are not experts."""
    return select if select not in EXPERT_SELECTS or part == "experts" else "activation"


def check_choice(structure: str, select: str) -> None:
    if "+" in structure:
        for part in split_structures(structure):
            check_choice(part, part_selection(part, select))
        return
    if structure not in STRUCTURES:
        raise UserError(f"unknown structure '{structure}'; use one of: {', '.join(STRUCTURES)}, or several joined "
                        "by '+' with --target-params")
    if select not in SELECTS:
        raise UserError(f"unknown selection '{select}'; use one of: {', '.join(SELECTS)}")
    if select in EXPERT_SELECTS and structure != "experts":
        raise UserError(f"--select {select} scores experts; for --structure {structure} use activation, tail or random")


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """ShortGPT's block influence (Men et al. 2024, eq. 1): ``1 - mean_t cos(x_in_t, x_out_t)``. A block that
    barely turns the residual stream is the cheapest to remove."""
    cos = torch.nn.functional.cosine_similarity(x_in.float().flatten(0, -2), x_out.float().flatten(0, -2), dim=-1)
    return 1.0 - cos.mean().item()


def contribution(x_norms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """How much each input channel of an output projection adds to the residual stream: ``||X_j|| * ||W_:,j||``
    (the Wanda score summed over a column, Sun et al. 2023)."""
    return x_norms.float() * weight.detach().float().norm(dim=0)


@torch.no_grad()
def scores(model: nn.Module, structure: str, windows: torch.Tensor, device: str = "cpu",
           batch_size: int = 4, weights=None) -> torch.Tensor:
    """Importance of every unit on calibration data; lower is removed first. ``hidden``: [d], RMS of the residual
    stream summed over the block boundaries; ``heads``: [L, KV]; ``mlp``: [L, I]; ``layers``: [L]."""
    g = geometry(model)
    p = _arch.arch_for(model.config.model_type).parts
    acts = engine.capture(model, windows, batch_size, device, weights=weights)
    tokens = windows.numel()
    hidden = torch.zeros(g.hidden, dtype=torch.float64)
    per_block: list[torch.Tensor] = []
    influence: list[float] = []
    prev: engine.Activations | None = None

    def rms(a: engine.Activations) -> torch.Tensor:
        return (sum(h.float().pow(2).sum((0, 1)).double() for h in a.hidden) / tokens).sqrt().cpu()

    walk = engine.Walk(model, acts, device, f"scoring {structure}", weights=weights)
    for i, block, inputs in walk:
        if structure == "hidden":
            hidden += rms(inputs)
        elif structure == "layers" and prev is not None:
            influence.append(_influence(prev, inputs))
        elif structure in ("heads", "mlp"):
            name = p.o if structure == "heads" else p.mlp_out
            stats = engine.collect(block, inputs, device, RowNorms)
            c = contribution(stats[name].norms("sum"), _arch.get_module(block, name).weight).cpu()
            if structure == "heads":  # columns -> heads -> KV groups
                c = c.view(g.heads, g.head_dim).sum(1).view(g.kv_heads, g.rep).sum(1)
            per_block.append(c)
        prev = inputs
    if structure == "hidden":
        return (hidden + rms(walk.outputs)).float()
    if structure == "layers":
        influence.append(_influence(prev, walk.outputs))
        return torch.tensor(influence)
    return torch.stack(per_block)


def selection_of(structure: str, how: str) -> str:
    """The selection a plan records: for experts, ``activation`` is REAP (router weight x output norm)."""
    return "reap" if structure == "experts" and how == "activation" else how


def routing_renormalised(model: nn.Module) -> bool:
    """Whether the router renormalises its weights over the chosen top-k (then removing an expert a token does not
    choose leaves that token's output unchanged)."""
    key = _arch.arch_for(model.config.model_type).experts.renormalises
    return True if not key else bool(getattr(model.config, key, False))


def _influence(a: engine.Activations, b: engine.Activations) -> float:
    vals = [block_influence(x, y) for x, y in zip(a.hidden, b.hidden)]
    return sum(vals) / len(vals)


def measured_selection(structure: str, how: str) -> bool:
    """Whether ``how`` ranks the units of ``structure`` by scores measured on calibration data (which then do not
    depend on how many units are removed: ``unit_scores`` once, ``select`` at any ratio)."""
    return how == "activation" or (structure == "experts" and how in EXPERT_SELECTS)


@dataclass(frozen=True)
class Measured:
    """The scores a measured selection ranks by, for one structure and selection: one row per group (a block for
    per-block structures, one row otherwise; ``None`` for a block with no experts), and what the plan records."""
    structure: str
    selection: str
    rows: list[torch.Tensor | None]
    meta: dict[str, Any]


def unit_scores(model: nn.Module, structure: str, how: str, windows: torch.Tensor, device: str = "cpu",
                batch_size: int = 4, weights=None) -> Measured:
    """Measure what ``select`` ranks the units of ``structure`` by under selection ``how``."""
    how = selection_of(structure, how)
    if structure == "experts":
        from llmprune.reap import expert_stats

        st = expert_stats(model, windows[:SELECT_WINDOWS], device, batch_size, weights)
        rows = st.reap() if how == "reap" else st.frequency()
        return Measured(structure, how, list(rows),
                        {"scores": [None if r is None else [round(float(v), 6) for v in r] for r in rows],
                         "tokens": [None if t is None else t.tolist() for t in st.tokens]})
    s = scores(model, structure, windows[:SELECT_WINDOWS], device, batch_size, weights)
    return Measured(structure, how, list(s) if structure in ("heads", "mlp") else [s], {})


def select(model: nn.Module, structure: str, ratio: float, how: str, windows: torch.Tensor | None,
           device: str = "cpu", seed: int = 0, batch_size: int = 4, weights=None,
           measured: Measured | None = None) -> Plan:
    """The units to remove: ``activation`` (lowest scores on calibration data; for experts REAP, or ``frequency``),
    ``tail`` (the last indices; for blocks, the last ones before the final block, which every model needs), or
    ``random`` (seeded). ``measured``: ``unit_scores`` already taken for this structure and selection (a budget
    search selects at several ratios from one measurement)."""
    check_supported(model, structure)
    g = geometry(model)
    n = count_removed(g, structure, ratio)
    per_block = structure in ("heads", "mlp", "experts")
    size = units_per_group(g, structure)
    moe = [_arch.get_module(b, spec.path) is not None for b in _arch.blocks(model)] if (
        spec := _arch.arch_for(model.config.model_type).experts) else []
    meta: dict[str, Any] = {}
    if measured_selection(structure, how):
        assert windows is not None or measured is not None
        how = selection_of(structure, how)
        if measured is not None and (measured.structure, measured.selection) != (structure, how):
            raise ValueError(f"scores of {measured.structure}/{measured.selection} given for {structure}/{how}")
        m = measured or unit_scores(model, structure, how, windows, device, batch_size, weights)
        rows, meta = m.rows, m.meta
        removed = [[] if r is None else sorted(torch.argsort(r, stable=True)[:n].tolist()) for r in rows]
    elif how == "tail":
        removed = [tail_units(g, structure, n)] * (g.layers if per_block else 1)
    elif how == "random":
        gen = torch.Generator().manual_seed(seed)
        removed = [sorted(torch.randperm(size, generator=gen)[:n].tolist())
                   for _ in range(g.layers if per_block else 1)]
    else:
        raise ValueError(how)
    if structure == "experts":  # dense blocks of an MoE model (Qwen3-MoE's mlp_only_layers) have none to remove
        removed = [r if m else [] for r, m in zip(removed, moe)]
    return Plan(structure, removed if per_block else removed[0], ratio, how,
                {"units": n, "of": size, **({"seed": seed} if how == "random" else {}), **meta})
