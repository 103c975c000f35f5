"""A parameter budget for structured removal (``--target-params``): the ratio of one structure that reaches it, or
for a combination (``--structure mlp+layers``) the split of the budget between its structures.

Counts come from shapes alone: each part's ``surgery.removal`` gives the smaller config, whose skeleton (meta
tensors, no memory) the next part is cut from, so a combination's count is exact even where the parts overlap (MLP
channels removed from a narrower hidden size take fewer parameters with them).

A combination's split is chosen by a cheap search: for each share of the removed parameters given to the coarsest
structure (``SHARES``; the finest fills the rest of the way to the target, see ``split_ratios``), the units
are selected on calibration data as a single structure would select them, removed from the model in memory, and
scored by the perplexity on held-out calibration windows (never the test split). The step records the split chosen
and every alternative with its score.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmprune import report
from llmprune.errors import UserError
from llmprune.stats import exp_nll
from llmprune.structures import STRUCTURES
from llmprune.surgery import removal
from llmprune.structured import (
    Plan,
    check_supported,
    count_removed_or_none,
    geometry,
    split_structures,
    tail_units,
    units_per_group,
)

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)  # a combination's candidate splits: the coarsest structure's share of the cut


def parse_budget(text: str, total: int) -> int:
    """``--target-params``: a count (``100M``, ``1.5B``, ``250000000``) or a fraction of the model (``0.75``)."""
    t = text.strip().upper().replace("_", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(t[-1:], 1.0)
    try:
        value = float(t[:-1] if scale != 1.0 else t)
    except ValueError:
        raise UserError(f"--target-params {text!r} is neither a count (100M, 1.5B) nor a fraction (0.75)") from None
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"--target-params must be positive, got {text}")
    target = round(value * total) if scale == 1.0 and value < 1 else round(value * scale)
    if target >= total:
        raise UserError(f"--target-params {text} is not below the model's {total:,} parameters")
    return target


def skeleton(config) -> nn.Module:
    """A model of ``config`` with meta tensors: names, shapes and the config, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return model


def count(model: nn.Module) -> int:
    from llmprune.modeling import param_count

    return param_count(model)


def after(model: nn.Module, plan: Plan) -> nn.Module:
    """The skeleton of the model ``surgery.remove`` would build from ``plan`` (a combination: part by part)."""
    for part in plan.parts:
        if part.n_units:
            model = skeleton(removal(model, part).config)
    return model


def params_after(model: nn.Module, plan: Plan) -> int:
    return count(after(model, plan))


def _tail(model: nn.Module, structure: str, n: int) -> Plan:
    """Some ``n`` units of ``structure`` (which ones does not change a count)."""
    g = geometry(model)
    idx = tail_units(g, structure, n)
    per_block = STRUCTURES[structure].per_block
    return Plan(structure, [idx] * g.layers if per_block else idx, n / units_per_group(g, structure))


def _valid(model: nn.Module, structure: str) -> list[int]:
    """The numbers of units of ``structure`` a ratio can remove (hidden channels go a multiple of the head count at
    a time; every token keeps its top-k experts: the kind's ``count`` and ``removable``)."""
    check_supported(model, structure)
    g = geometry(model)
    total = units_per_group(g, structure)
    valid = sorted({c for n in range(total) if (c := count_removed_or_none(g, structure, n / total)) is not None})
    return [n for n in valid if STRUCTURES[structure].removable(model.config, total, n)]


def _count_without(model: nn.Module, structure: str, n: int) -> int:
    return params_after(model, _tail(model, structure, n)) if n else count(model)


def ratio_for_budget(model: nn.Module, structure: str, target: int) -> tuple[float, int]:
    """The smallest ratio of one structure whose removal leaves at most ``target`` parameters, and that count. The
    count falls monotonically with the number of units: a bisection over the counts a ratio can give finds it."""
    valid = _valid(model, structure)
    total = units_per_group(geometry(model), structure)
    if not valid or _count_without(model, structure, valid[-1]) > target:
        most = valid[-1] if valid else 0
        raise UserError(f"--structure {structure} cannot reach {target:,} parameters: removing the most it can "
                        f"({most} of {total}) leaves {_count_without(model, structure, most):,}")
    lo, hi = 0, len(valid) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _count_without(model, structure, valid[mid]) <= target:
            hi = mid
        else:
            lo = mid + 1
    return valid[lo] / total, _count_without(model, structure, valid[lo])


def ratio_within(model: nn.Module, structure: str, goal: int) -> float:
    """The largest ratio of one structure whose removal leaves at least ``goal`` parameters (0 if none)."""
    valid = [0] + [n for n in _valid(model, structure) if n]
    lo, hi = 0, len(valid) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _count_without(model, structure, valid[mid]) >= goal:
            lo = mid
        else:
            hi = mid - 1
    return valid[lo] / units_per_group(geometry(model), structure)


def unit_cost(model: nn.Module, structure: str) -> float:
    """Parameters one unit of ``structure`` takes with it (the smallest removal a ratio can give, per unit)."""
    n = next((n for n in _valid(model, structure) if n), 0)
    return (count(model) - _count_without(model, structure, n)) / n if n else 0.0


def split_ratios(model: nn.Module, structures: list[str], target: int, share: float) -> dict[str, float] | None:
    """The ratios of a combination for one split. The structures go coarsest first (most parameters per unit):
    the coarsest removes at most ``share`` of the parameters to cut, each next one at most an equal part of what is
    left, and the finest fills the rest of the way to ``target`` (rounding up), so a coarse structure never
    overshoots the budget by a whole unit. None where the finest cannot reach the target."""
    total = count(model)
    order = sorted(structures, key=lambda s: -unit_cost(model, s))
    ratios: dict[str, float] = {}
    current = model
    for k, s in enumerate(order):
        if k == len(order) - 1:
            if count(current) <= target:
                ratios[s] = 0.0
                continue
            try:
                ratios[s], _ = ratio_for_budget(current, s, target)
            except UserError:
                return None
        else:
            left = count(current) - target
            portion = share * (total - target) if k == 0 else left / (len(order) - k)
            ratios[s] = ratio_within(current, s, round(count(current) - portion))
        if ratios[s]:
            current = after(current, _tail(current, s, round(ratios[s] * units_per_group(geometry(current), s))))
    return {s: ratios[s] for s in structures}


def search(model: nn.Module, structure: str, target: int, select_fn, holdout: torch.Tensor,
           device: str = "cpu", score_fn=None, scored_by: str = "removal") -> tuple[Plan, dict[str, Any]]:
    """The best split of ``target`` between the parts of ``structure`` (``a+b``): each candidate's units selected by
    ``select_fn(structure, ratio) -> Plan`` on the full model, removed in memory, scored by held-out perplexity on
    ``device`` -- or by ``score_fn(plan) -> (held-out NLL, parameters)`` (a short regularisation of a copy first,
    ``scored_by`` says how). Returns the chosen combined plan and the record of the search."""
    import time

    from llmprune.surgery import remove
    from llmprune.train import heldout_nll

    def by_removal(plan: Plan) -> tuple[float, int]:
        small = remove(model, plan).to(device)
        return heldout_nll(small, holdout), count(small)

    score_fn = score_fn or by_removal

    t0 = time.perf_counter()
    structures = split_structures(structure)
    tried: dict[tuple, dict[str, Any]] = {}
    plans: dict[str, dict[float, Plan]] = {s: {} for s in structures}
    for share in SHARES if len(structures) > 1 else (0.0,):
        ratios = split_ratios(model, structures, target, share)
        if ratios is None:
            continue
        key = tuple(ratios[s] for s in structures)
        if key in tried:
            continue
        parts = []
        for s in structures:
            if ratios[s]:
                if ratios[s] not in plans[s]:
                    plans[s][ratios[s]] = select_fn(s, ratios[s])
                parts.append(plans[s][ratios[s]])
        plan = combine(structure, parts)
        nll, params = score_fn(plan)
        tried[key] = {"share": share, "ratios": ratios, "parameters": params,
                      "heldout_ppl": round(exp_nll(nll), 4), "plan": plan}
        report.info(f"{structure} split {share:.2f}: " + ", ".join(f"{s} {r:.3f}" for s, r in ratios.items())
                    + f" -> {params:,} parameters, held-out perplexity {exp_nll(nll):.2f} ({scored_by})")
    if not tried:
        raise UserError(f"--structure {structure} cannot reach {target:,} parameters with any split")
    best = min(tried.values(), key=lambda t: (t["heldout_ppl"], -t["parameters"]))
    record = {"target": target, "scored_by": scored_by, "chosen": {k: v for k, v in best.items() if k != "plan"},
              "alternatives": [{k: v for k, v in t.items() if k != "plan"} for t in tried.values()],
              "search_s": round(time.perf_counter() - t0, 2)}
    return best["plan"], record


def combine(structure: str, parts: list[Plan]) -> Plan:
    """One plan of several structures (``structure`` names them all, even one whose part removes nothing)."""
    return Plan(structure, [p.to_json() for p in parts], 0.0, parts[0].select if parts else "")
