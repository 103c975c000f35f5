"""Which units DReSS removes: the selection vocabulary and the unit scores it ranks by.

``activation`` (lowest on calibration data: the RMS of each hidden channel, a KV group's or an MLP channel's
contribution, ShortGPT's block influence; for experts REAP), ``reap`` and ``frequency`` (experts only), ``tail`` (the
last units; for blocks the last before the final block) and ``random`` (seeded). Scores measured on calibration data
do not depend on how many units go (``unit_scores`` once, ``select`` at any ratio), which the budget search uses.
What each score is belongs to its kind (``structures/``: ``Structure.scorer``, or ``measure`` for its own
selections); this module ranks by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import engine
from llmprune.errors import UserError
from llmprune.structures import STRUCTURES
from llmprune.structures.base import COMMON_SELECTS
from llmprune.structured import Plan, check_supported, count_removed, geometry, split_structures


# Every kind takes the common selections; these are the ones only some kind takes and measures itself (experts:
# REAP and frequency, and "activation" means REAP there).
EXPERT_SELECTS = tuple(dict.fromkeys(s for k in STRUCTURES.values() for s in k.own_selects))
SELECTS = COMMON_SELECTS + EXPERT_SELECTS


SELECT_WINDOWS = 16  # windows the activation scores are measured on: channel RMS is stable well before that


def _listed(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}"


def part_selection(part: str, select: str) -> str:
    """A combination's selection for one of its parts: a selection only some kinds take (reap and frequency:
    experts) means ``activation`` for the parts that do not take it."""
    return select if select not in EXPERT_SELECTS or select in STRUCTURES[part].selects else "activation"


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
    if select not in STRUCTURES[structure].selects:
        owners = " or ".join(name for name, k in STRUCTURES.items() if select in k.selects)
        raise UserError(f"--select {select} scores {owners}; for --structure {structure} use "
                        f"{_listed(STRUCTURES[structure].selects)}")


@torch.no_grad()
def scores(model: nn.Module, structure: str, windows: torch.Tensor, device: str = "cpu",
           batch_size: int = 4, weights=None) -> torch.Tensor:
    """Importance of every unit on calibration data, from one walk of the dense model; lower is removed first.
    ``hidden``: [d], RMS of the residual stream summed over the block boundaries; ``heads``: [L, KV]; ``mlp``:
    [L, I]; ``layers``: [L] (each kind's ``Structure.scorer``)."""
    g = geometry(model)
    p = _arch.arch_for(model.config.model_type).parts
    acts = engine.capture(model, windows, batch_size, device, weights=weights)
    scorer = STRUCTURES[structure].scorer(g, p, windows.numel(), device)
    walk = engine.Walk(model, acts, device, f"scoring {structure}", weights=weights)
    for _, block, inputs in walk:
        scorer.block(block, inputs)
    return scorer.result(walk.outputs)


def selection_of(structure: str, how: str) -> str:
    """The selection a plan records: what ``activation`` means for the kind (for experts REAP: router weight x
    output norm). A combination records what it was given."""
    k = STRUCTURES.get(structure)
    return k.activation if k is not None and how == "activation" else how


def routing_renormalised(model: nn.Module) -> bool:
    """Whether the router renormalises its weights over the chosen top-k (then removing an expert a token does not
    choose leaves that token's output unchanged)."""
    key = _arch.arch_for(model.config.model_type).experts.renormalises
    return True if not key else bool(getattr(model.config, key, False))


def measured_selection(structure: str, how: str) -> bool:
    """Whether ``how`` ranks the units of ``structure`` by scores measured on calibration data (which then do not
    depend on how many units are removed: ``unit_scores`` once, ``select`` at any ratio)."""
    return how == "activation" or how in STRUCTURES[structure].own_selects


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
    """Measure what ``select`` ranks the units of ``structure`` by under selection ``how``: the kind's own
    measurement for its own selections, else the ``activation`` walk (``scores``)."""
    how = selection_of(structure, how)
    k = STRUCTURES[structure]
    if how in k.own_selects:
        rows, meta = k.measure(model, how, windows[:SELECT_WINDOWS], device, batch_size, weights)
        return Measured(structure, how, rows, meta)
    s = scores(model, structure, windows[:SELECT_WINDOWS], device, batch_size, weights)
    return Measured(structure, how, list(s) if k.per_block else [s], {})


def take(order: list[int], n: int, keep: tuple[set[int], str] | None, groups: int = 1, size: int = 0) -> list[int]:
    """The first ``n`` units of ``order`` (most removable first), passing over any whose removal would leave none of
    ``keep``'s set (``Structure.keep_one``), and, with ``groups`` contiguous groups of the ``size`` units, any beyond
    ``n / groups`` from one group (``Structure.groups``); a ``UserError`` if fewer than ``n`` can go."""
    chosen: list[int] = []
    per = [0] * groups
    for u in order:
        if len(chosen) == n:
            break
        grp = u // (size // groups) if groups > 1 else 0
        if (keep is None or u not in keep[0] or not keep[0] <= {*chosen, u}) and per[grp] < n // groups:
            chosen.append(u)
            per[grp] += 1
    if len(chosen) < n:
        raise UserError(f"cannot remove {n} units: {keep[1] if keep else 'too few'}")
    return sorted(chosen)


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
    k = STRUCTURES[structure]
    groups = g.layers if k.per_block else 1  # one list of units per block, or one for the model
    size = k.units(g)
    keep = k.keep_one(model.config)
    balance = k.groups(g)  # units that must go evenly from equal groups (a group-limited router's experts)
    meta: dict[str, Any] = {}
    if measured_selection(structure, how):
        assert windows is not None or measured is not None
        how = selection_of(structure, how)
        if measured is not None and (measured.structure, measured.selection) != (structure, how):
            raise ValueError(f"scores of {measured.structure}/{measured.selection} given for {structure}/{how}")
        m = measured or unit_scores(model, structure, how, windows, device, batch_size, weights)
        rows, meta = m.rows, m.meta
        removed = [[] if r is None else take(torch.argsort(r, stable=True).tolist(), n, keep, balance, size)
                   for r in rows]
    elif how == "tail":
        removed = [take(k.tail(g, n), n, keep, balance, size)] * groups
    elif how == "random":
        gen = torch.Generator().manual_seed(seed)
        removed = [take(torch.randperm(size, generator=gen).tolist(), n, keep, balance, size) for _ in range(groups)]
    else:
        raise ValueError(how)
    removed = k.where_present(model, removed)
    return Plan(structure, removed if k.per_block else removed[0], ratio, how,
                {"units": n, "of": size, **({"seed": seed} if how == "random" else {}), **meta})
