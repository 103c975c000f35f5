"""DReSS (Feng et al. 2025, arXiv 2501.17905): regularise the parts that will be removed, then remove them.

Reconstruction (docs/methods.md, "DReSS"; no official code exists): a fixed set of units is chosen first
(``selection``: the paper has no importance step; ``activation`` selection is ours), then the whole model is trained
on a little data with the LM loss while the selected slices are driven to zero (``penalty``; the ``regularize`` step,
``regularization``), so their information migrates into the parts that stay. Removal (``surgery.remove``) is then
(nearly) free. The same machinery serves hidden channels (the paper), KV groups, MLP channels, whole blocks and MoE
experts. This module is the registered method -- the prune step that applies a regularised plan, or removes the
selected units directly on a workdir never regularised -- and the parameter-budget glue; its plan file is ``planfile``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from llmprune.errors import UserError
from llmprune.methods.base import Method
from llmprune.options import option
from llmprune.penalty import regularize
from llmprune.planfile import PlanRecord
from llmprune.selection import (
    EXPERT_SELECTS,
    SELECTS,
    Measured,
    check_choice,
    measured_selection,
    part_selection,
    routing_renormalised,
    select,
    selection_of,
    unit_scores,
)
from llmprune.structured import (
    STRUCTURES,
    Plan,
    align_ratio,
    check_supported,
    geometry,
    width_multiple_option,
)

if TYPE_CHECKING:
    from llmprune.workdir import Workdir

DEFAULT_STRUCTURE, DEFAULT_RATIO, DEFAULT_SELECT = "hidden", 0.25, "activation"


# --- selection ------------------------------------------------------------------------------------------------


def resolve_budget(model: nn.Module, structure: str, text: str) -> dict[str, Any]:
    """``--target-params`` as the ratio that reaches it: ``{"target", "ratio", "params"}`` (the count that ratio
    leaves, at most the target)."""
    from llmprune.budget import parse_budget, ratio_for_budget
    from llmprune.modeling import param_count

    target = parse_budget(text, param_count(model))
    ratio, params = ratio_for_budget(model, structure, target)
    return {"target": target, "ratio": ratio, "params": params}


def search_combination(model: nn.Module, structure: str, text: str, how: str, windows: torch.Tensor, device: str,
                       seed: int, holdout: int = 8, regularized=None) -> tuple[Plan, dict[str, Any]]:
    """A combination's plan for ``--target-params``: ``budget.search`` over the splits, each part selected as a
    single structure would be (on the windows before the last ``holdout``, which score the candidates).
    ``regularized``: a ``RegularizeOptions`` whose ``search_steps`` (> 0) regularise a copy of the model toward each
    candidate before it is removed and scored (``score_after_regularizing``); None: scored by direct removal."""
    from llmprune.budget import parse_budget, search
    from llmprune.modeling import param_count

    if windows.shape[0] <= holdout:
        raise UserError(f"a combination is chosen on {holdout} held-out calibration windows; this workdir has "
                        f"{windows.shape[0]} windows in all")
    fit, held = windows[:-holdout], windows[-holdout:]

    measured: dict[str, Measured] = {}  # per structure: its scores do not depend on the ratio, measure them once

    def select_fn(part: str, ratio: float) -> Plan:
        part_how = part_selection(part, how)
        if measured_selection(part, part_how) and part not in measured:
            measured[part] = unit_scores(model, part, part_how, fit, device)
        return select(model, part, ratio, part_how, fit, device, seed, measured=measured.get(part))

    score_fn, scored_by = None, "removal"
    if regularized is not None and regularized.search_steps:
        scored_by = f"regularize {regularized.search_steps} steps"

        def score_fn(plan: Plan) -> tuple[float, int]:
            return score_after_regularizing(model, plan, fit, held, regularized)

    return search(model, structure, parse_budget(text, param_count(model)), select_fn, held, device, score_fn,
                  scored_by)


def search_lambda(o) -> float:
    """The penalty of a candidate's short regularisation: the prox reaches zero within ``1 / lambda`` steps, so at
    least ``1.5 / N`` leaves the last third of the N steps to adapt to the units being gone (``o.lam`` if larger)."""
    return max(o.lam, 1.5 / o.search_steps) if o.shrink == "prox" else o.lam


def score_after_regularizing(model: nn.Module, plan: Plan, fit: torch.Tensor, held: torch.Tensor, o) -> tuple[float, int]:
    """(held-out NLL, parameters) of ``plan`` removed from a copy of ``model`` regularised ``o.search_steps`` steps
    toward it (LM loss, the step's other settings): what regularisation leaves, not what removal alone leaves.
    ``model`` itself is not touched."""
    import copy

    from llmprune.modeling import param_count
    from llmprune.surgery import remove
    from llmprune.train import TrainSpec, heldout_nll

    work = copy.deepcopy(model)
    spec = TrainSpec(steps=o.search_steps, lr=o.lr, batch_size=o.batch_size, grad_accum=o.grad_accum, seed=o.seed,
                     grad_checkpointing=o.grad_checkpointing, eval_every=o.search_steps, precision=o.precision)
    regularize(work, fit, held, plan, norm=o.norm, shrink=o.shrink, lam=search_lambda(o), spec=spec, device=o.device)
    small = remove(work, plan)
    del work
    return heldout_nll(small.to(o.device), held), param_count(small)


# --- the penalty and the shrink -------------------------------------------------------------------------------




# --- the registered method ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    # None: the regularised plan's value, else the default (a given value must agree with a regularised plan).
    structure: Optional[str] = option(None, f"DReSS: {', '.join(STRUCTURES)} (default: the regularised plan's, "
                                      f"else {DEFAULT_STRUCTURE}).")
    ratio: Optional[float] = option(None, "DReSS: fraction of the structure's units to remove (default: the "
                                    f"regularised plan's, else {DEFAULT_RATIO}).")
    select: Optional[str] = option(None, f"DReSS: {', '.join(SELECTS)} (default: the regularised plan's, else "
                                   f"{DEFAULT_SELECT}).")
    seed: int = option(0, "DReSS: seed of --select random.")
    target_params: Optional[str] = option(None, "DReSS: a parameter budget instead of --ratio: a count (100M, 1.5B) "
                                          "or a fraction of the model (0.75); the smallest ratio that reaches it.")
    width_multiple: int = width_multiple_option()


class DReSS(Method):
    name = "dress"
    label = "DReSS"
    summary = "structured removal of hidden channels, KV groups, MLP channels or blocks (Feng et al. 2025)"
    Options = Options
    exact_zeros = False  # the removed units are gone: nothing is left at zero
    structured = True

    def prune_workdir(self, ws: Workdir, options: Options, *, device: str, batch_size: int) -> dict[str, Any]:
        """Remove the units. After ``regularize`` they are the regularised ones; on a workdir never regularised
        they are selected the same way and removed directly (the key control of DReSS)."""
        from llmprune.current import load_current, open_current
        from llmprune.modeling import param_count

        pending = PlanRecord.pending(ws)
        planned = pending.plan if pending is not None else None
        structure, select_, ratio = _resolve(options, planned)
        combination = "+" in structure
        regularized = pending is not None
        params = dict(method="dress", structure=structure, ratio=ratio, select=select_, seed=options.seed,
                      device=device, regularized=regularized,
                      **({"target_params": options.target_params} if options.target_params is not None else {}),
                      **({"width_multiple": options.width_multiple} if options.width_multiple != 1 else {}))
        with ws.step("prune", params) as tx:
            ws.record_inputs(tx, "model")
            ws.record_inputs(tx, "calib")
            if regularized:
                ws.record_inputs(tx, "dress")
            lm, tok, weights = open_current(ws)  # the blocks stay in the shards; each tensor is cut in turn
            check_supported(lm, structure)
            budget = None
            if combination and planned is None:

                full, _ = load_current(ws)  # the search scores each split on the model in memory
                planned, budget = search_combination(full, structure, options.target_params, select_, ws.windows(),
                                                     device, options.seed)
                del full
                ratio = params["ratio"] = 0.0
            elif options.target_params is not None:
                budget = resolve_budget(lm, structure, options.target_params)
                ratio = params["ratio"] = budget["ratio"]  # recorded as the ratio it resolved to
            if planned is None and options.width_multiple != 1:
                ratio = params["ratio"] = align_ratio(geometry(lm), structure, ratio, options.width_multiple)
            t0 = time.perf_counter()
            if planned is None:
                windows = ws.windows() if select_ in ("activation", *EXPERT_SELECTS) else None
                planned = select(lm, structure, ratio, select_, windows, device, options.seed, batch_size,
                                 weights=weights)
            before_params, before_geom = param_count(lm), geometry(lm)
            exact = routing_renormalised(lm) if "experts" in structure.split("+") else None
            if exact is False:
                from llmprune import report

                report.warn(f"{lm.config.model_type}'s router does not renormalise over its top-k (norm_topk_prob "
                            "false): removing experts also raises the routing weights of the experts that stay")
            small, summ = _write_smaller(ws, lm, tok, weights, planned, tx.stage("model"))
            prune_s = time.perf_counter() - t0
            tx.step.metrics = {"prune_s": round(prune_s, 3), "plan": planned.to_json(), "units_removed": planned.n_units,
                               "zero_pattern": None,  # the units are gone: no zeros for a later step to keep
                               "parameters_before": before_params, **summ,
                               "geometry_before": before_geom.__dict__, "geometry": geometry(small).__dict__,
                               **({"routing_renormalised": exact} if exact is not None else {}),
                               **({"budget": budget} if budget is not None else {})}
            PlanRecord(planned, regularized, applied=True).write(tx)
        return {"method": "dress", "structure": structure, "ratio": ratio, "select": select_,
                "regularized": regularized, **tx.step.metrics}


def _resolve(options: Options, planned: Plan | None) -> tuple[str, str, float]:
    """``(structure, selection, ratio)`` the prune removes: what was given, else the regularised plan's, else the
    defaults; a given value that contradicts the plan, or a combination without a budget, is refused."""
    if planned is not None:
        for name, given, was in (("structure", options.structure, planned.structure),
                                 ("ratio", options.ratio, planned.ratio), ("select", options.select, planned.select)):
            if name == "select" and given is not None:
                given = selection_of(planned.structure, given)
            if given is not None and given != was:
                raise UserError(f"this workdir was regularised for --{name} {was}; prune with that "
                                f"(or regularise again for {given})")
    structure = options.structure or (planned.structure if planned else DEFAULT_STRUCTURE)
    select_ = options.select or (planned.select if planned else DEFAULT_SELECT)
    if options.ratio is not None and not 0 < options.ratio < 1:  # 0 would remove nothing yet record a step
        raise UserError(f"--ratio must be in (0, 1), got {options.ratio}")
    ratio = options.ratio if options.ratio is not None else (planned.ratio if planned else DEFAULT_RATIO)
    check_choice(structure, select_)
    if options.width_multiple != 1 and planned is not None:
        raise UserError("--width-multiple shapes the plan: give it to regularize (this workdir's plan is "
                        "regularised already)")
    if options.target_params is not None and (options.ratio is not None or planned is not None):
        raise UserError("--target-params chooses the ratio: give it instead of --ratio, and to regularize "
                        "(not to the prune that applies a regularised plan)")
    if "+" in structure and options.target_params is None and planned is None:
        raise UserError(f"--structure {structure} splits a parameter budget between its structures: give "
                        "--target-params (100M, or 0.75 of the model)")
    return structure, select_, ratio


def _write_smaller(ws: Workdir, lm: nn.Module, tok, weights, planned: Plan, out) -> tuple[nn.Module, dict[str, Any]]:
    """The smaller model in ``out`` -- shard by shard from a lazy model, else built in memory and saved -- and its
    summary (parameters, sparsity)."""
    import shutil

    from llmprune import evaluate
    from llmprune.modeling import save_model
    from llmprune.surgery import remove, remove_streamed

    if weights.lazy:
        small, counts = remove_streamed(weights, planned, out, ws.shard_size)
        tok.save_pretrained(out)
        if (ws.model_dir / "generation_config.json").is_file():
            shutil.copy2(ws.model_dir / "generation_config.json", out / "generation_config.json")
        return small, evaluate.summary(small, counts)
    small = remove(lm, planned)
    summ = evaluate.summary(small)
    save_model(small, tok, out, ws.shard_size)
    return small, summ


METHOD = DReSS()


# --- the regularize step ------------------------------------------------------------------------------------------


