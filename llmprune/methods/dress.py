"""DReSS (Feng et al. 2025, arXiv 2501.17905): regularise the parts that will be removed, then remove them.

Reconstruction (../shared/METHODS.md; no official code exists): a fixed set of units is chosen first (the paper has
no importance step; ``activation`` selection is ours), then the whole model is trained on a little data with the LM
loss while the selected slices are driven to zero, so their information migrates into the parts that stay. Removal
(``structured.remove``) is then (nearly) free. The same machinery serves hidden channels (the paper), KV groups, MLP
channels and whole blocks.

Two ways to drive the slices to zero, both scale-free (``lambda`` is relative to each unit's initial norm, so one
value means the same thing for every model size):

- ``prox`` (default, decoupled): after every optimiser step, a proximal step shrinks each unit's norm by
  ``lambda * its initial norm`` (soft-thresholding, Parikh & Boyd 2014, sec. 6.5). Reaches exact zeros in at most
  ``1 / lambda`` steps; Adam cannot stall it, which METHODS.md warns a loss-term penalty may do.
- ``loss``: ``LM loss + lambda * sum_u ||s_u|| / sum_u ||s_u^0||`` (the paper's formulation, normalised to start at
  ``lambda``), minimised by the optimiser together with the LM loss.

Norms: ``group`` -- one L2 norm per unit over all its slices in the model (group lasso, Yuan & Lin 2006);
``l2`` -- one L2 norm per slice (per tensor and unit, not squared); ``l1`` -- absolute values, element-wise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import engine, report
from llmprune.errors import UserError
from llmprune.methods.base import Method, option
from llmprune.stats import RowNorms, exp_nll
from llmprune.structured import (
    STRUCTURES,
    Plan,
    Slice,
    check_supported,
    count_removed,
    geometry,
    slices,
    split_structures,
    tail_units,
    units_per_group,
)

if TYPE_CHECKING:
    from llmprune.workdir import Transaction, Workdir

SELECTS = ("activation", "tail", "random", "reap", "frequency")
EXPERT_SELECTS = ("reap", "frequency")  # experts only; "activation" means reap there
NORMS = ("group", "l2", "l1")
SHRINKS = ("prox", "loss")
SELECT_WINDOWS = 16  # windows the activation scores are measured on: channel RMS is stable well before that
DEFAULT_STRUCTURE, DEFAULT_RATIO, DEFAULT_SELECT = "hidden", 0.25, "activation"


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


# --- selection ------------------------------------------------------------------------------------------------
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
    from llmprune.structured import remove
    from llmprune.train import TrainSpec, heldout_nll

    work = copy.deepcopy(model)
    spec = TrainSpec(steps=o.search_steps, lr=o.lr, batch_size=o.batch_size, grad_accum=o.grad_accum, seed=o.seed,
                     grad_checkpointing=o.grad_checkpointing, eval_every=o.search_steps)
    regularize(work, fit, held, plan, norm=o.norm, shrink=o.shrink, lam=search_lambda(o), spec=spec, device=o.device)
    small = remove(work, plan)
    del work
    return heldout_nll(small.to(o.device), held), param_count(small)


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


# --- the penalty and the shrink -------------------------------------------------------------------------------
class Penalty:
    """The plan's slices in a live model, their initial norms, and the two ways to drive them to zero."""

    def __init__(self, model: nn.Module, plan: Plan, norm: str = "group"):
        if norm not in NORMS:
            raise ValueError(norm)
        self.norm = norm
        self.plan = plan
        self.slices: list[Slice] = []
        self.params: list[nn.Parameter] = []
        seen: set[int] = set()
        for sl in slices(model, plan):  # tied tensors (embeddings / lm_head) are one parameter: count it once
            prm = model.get_parameter(sl.param)
            if id(prm) not in seen:
                seen.add(id(prm))
                self.slices.append(sl)
                self.params.append(prm)
        self.n_units = 1 + max((int(s.unit.max()) for s in self.slices), default=-1)
        with torch.no_grad():
            self.init = self.unit_norms().detach().clamp_min(1e-12)
            self.init_total = self._total_norm()
            # Entries per unit, for the element-wise (l1) threshold.
            self.count = torch.zeros(self.n_units)
            for sl, prm in zip(self.slices, self.params):
                per_row = self._rows(prm, sl).shape[1]
                self.count.index_add_(0, sl.unit, torch.full((len(sl.index),), float(per_row)))

    @staticmethod
    def _rows(prm: torch.Tensor, sl: Slice) -> torch.Tensor:
        """The slice as [positions, everything else]."""
        return prm.index_select(sl.dim, sl.index.to(prm.device)).movedim(sl.dim, 0).reshape(len(sl.index), -1)

    def unit_norms(self) -> torch.Tensor:
        """``group``: [units]; ``l2``: [slices, units] (zero where a slice has no part of a unit); ``l1``: [units]."""
        per: list[torch.Tensor] = []
        for sl, prm in zip(self.slices, self.params):
            rows = self._rows(prm, sl)
            val = rows.abs().sum(1) if self.norm == "l1" else rows.float().pow(2).sum(1)
            acc = torch.zeros(self.n_units, dtype=val.dtype, device=val.device).index_add(0, sl.unit.to(val.device), val)
            per.append(acc)
        stacked = torch.stack(per)
        if self.norm == "l1":
            return stacked.sum(0)
        if self.norm == "group":
            return stacked.sum(0).clamp_min(1e-30).sqrt()
        return stacked.clamp_min(1e-30).sqrt() * (stacked > 0)

    def _total_norm(self) -> float:
        sq = sum(self._rows(prm, sl).double().pow(2).sum().item() for sl, prm in zip(self.slices, self.params))
        return math.sqrt(sq)

    def relative_norm(self) -> float:
        """L2 norm of everything selected, relative to its value before regularisation (0 = ready to remove)."""
        with torch.no_grad():
            return self._total_norm() / max(self.init_total, 1e-30)

    def loss(self, lam: float) -> torch.Tensor:
        """The ``loss`` mode penalty: ``lambda * sum_u ||s_u|| / sum_u ||s_u^0||``."""
        norms = self.unit_norms()
        return lam * norms.sum() / self.init.to(norms.device).sum()

    @torch.no_grad()
    def shrink(self, lam: float) -> None:
        """One proximal step: every unit's norm shrinks by ``lam`` times its initial norm (to zero at most)."""
        if self.norm == "l1":
            thresh = lam * self.init / self.count.clamp_min(1)  # per entry: the unit's L1 shrinks by lam * init
            for sl, prm in zip(self.slices, self.params):
                rows = self._rows(prm, sl)
                t = thresh.to(rows.device)[sl.unit.to(rows.device)].unsqueeze(1).to(rows.dtype)
                self._write(prm, sl, rows.sign() * (rows.abs() - t).clamp_min(0))
            return
        norms = self.unit_norms()
        thresh = lam * self.init.to(norms.device)
        # A unit within float rounding of the threshold goes to exactly zero (it would keep ~1e-8 of its norm).
        scale = torch.where(norms <= thresh * (1 + 1e-5), 0.0, 1 - thresh / norms.clamp_min(1e-30))
        scales = [scale] * len(self.slices) if self.norm == "group" else list(scale)
        for sl, prm, sc in zip(self.slices, self.params, scales):
            rows = self._rows(prm, sl)
            self._write(prm, sl, rows * sc[sl.unit.to(sc.device)].unsqueeze(1).to(rows.dtype))

    @staticmethod
    def _write(prm: torch.Tensor, sl: Slice, rows: torch.Tensor) -> None:
        other = [n for i, n in enumerate(prm.shape) if i != sl.dim]
        rows = rows.reshape(len(sl.index), *other).movedim(0, sl.dim)
        prm.data.index_copy_(sl.dim, sl.index.to(prm.device), rows.to(prm.dtype))

    @contextlib.contextmanager
    def zeroed(self) -> Iterator[None]:
        """The model with the selected slices at zero, restored afterwards (to measure what removal costs)."""
        with torch.no_grad():
            saved = [self._rows(prm, sl).clone() for sl, prm in zip(self.slices, self.params)]
            for sl, prm in zip(self.slices, self.params):
                prm.data.index_fill_(sl.dim, sl.index.to(prm.device), 0)
        try:
            yield
        finally:
            with torch.no_grad():
                for sl, prm, rows in zip(self.slices, self.params, saved):
                    self._write(prm, sl, rows)


def regularize(model: nn.Module, train_windows: torch.Tensor, holdout: torch.Tensor, plan: Plan, *, norm: str,
               shrink: str, lam: float, spec, device: str = "cpu", until_converged: bool = False,
               gap_tol: float = 0.01, norm_tol: float = 1e-3, distiller=None, resume_dir=None,
               save_every: int = 0) -> dict[str, Any]:
    """Train the whole model with the LM loss (or, with ``distiller``, distilled from the dense teacher) while the
    plan's slices go to zero; returns the history with, at every evaluation, the held-out perplexity with and without
    the slices zeroed and their relative norm. With ``resume_dir`` it checkpoints every ``save_every`` steps and
    continues from a checkpoint found there (``train.train``); the penalty's reference norms are the model's as given,
    so a resumed run shrinks exactly as an uninterrupted one."""
    from llmprune.train import heldout_nll, train

    pen = Penalty(model, plan, norm)

    def measure(m: nn.Module, step: int) -> dict[str, Any]:
        nll = heldout_nll(m, holdout)
        if "experts" in plan.structure.split("+"):
            # A router row at zero still gives its expert a logit of 0, which can win the top-k: zeroing is not
            # removing here, so the gap is measured on the model with the experts removed.
            from llmprune.structured import remove

            nll0 = heldout_nll(remove(m, plan), holdout)
        else:
            with pen.zeroed():
                nll0 = heldout_nll(m, holdout)
        return {"relative_norm": round(pen.relative_norm(), 6), "ppl": round(exp_nll(nll), 4),
                "ppl_zeroed": round(exp_nll(nll0), 4), "gap": round(exp_nll(nll0 - nll) - 1, 6)}

    before = {"step": 0, **measure(model, 0)}
    hist = train(
        model, train_windows, spec, device=device,
        extra_loss=(lambda m: pen.loss(lam)) if shrink == "loss" else None,
        after_step=(lambda m, step, lr: pen.shrink(lam)) if shrink == "prox" else None,
        evaluate=measure,
        stop=(lambda m: m["gap"] <= gap_tol and m["relative_norm"] <= norm_tol) if until_converged else None,
        description=f"regularizing {plan.structure}", distiller=distiller, resume_dir=resume_dir,
        save_every=save_every,
    )
    hist["evals"].insert(0, before)
    return hist


# --- the plan file and its states -------------------------------------------------------------------------------
PLAN = "dress/plan.json"


@dataclass
class PlanRecord:
    """``WORK/dress/plan.json``: the units chosen and how far the workdir has gone with them. ``regularize`` writes
    it regularised and not applied; ``prune --method dress`` applies it (or, on a workdir never regularised, selects
    and applies in one go). Only a plan that is not yet applied is pending for the next prune."""

    plan: Plan
    regularized: bool
    applied: bool

    def write(self, tx: Transaction) -> None:
        d = tx.stage("dress")
        d.mkdir()
        (d / "plan.json").write_text(json.dumps({**self.plan.to_json(), "regularized": self.regularized,
                                                 "applied": self.applied}, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def pending(cls, ws: Workdir) -> PlanRecord | None:
        """The regularised plan the next ``prune --method dress`` must apply, checked against its hash; or None."""
        path = ws.path / PLAN
        if not path.is_file():
            return None
        ws.verify("dress")
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("applied"):
            return None
        plan = Plan.from_json({k: v for k, v in d.items() if k not in ("regularized", "applied")})
        return cls(plan, bool(d.get("regularized")), False)


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
        import shutil

        from llmprune import evaluate
        from llmprune.current import load_current, open_current
        from llmprune.modeling import param_count, save_model
        from llmprune.structured import remove, remove_streamed

        pending = PlanRecord.pending(ws)
        planned = pending.plan if pending is not None else None
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
        if options.target_params is not None and (options.ratio is not None or planned is not None):
            raise UserError("--target-params chooses the ratio: give it instead of --ratio, and to regularize "
                            "(not to the prune that applies a regularised plan)")
        combination = "+" in structure
        if combination and options.target_params is None and planned is None:
            raise UserError(f"--structure {structure} splits a parameter budget between its structures: give "
                            "--target-params (100M, or 0.75 of the model)")
        regularized = pending is not None
        params = dict(method="dress", structure=structure, ratio=ratio, select=select_, seed=options.seed,
                      device=device, regularized=regularized,
                      **({"target_params": options.target_params} if options.target_params is not None else {}))
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
            out = tx.stage("model")
            if weights.lazy:
                small, counts = remove_streamed(weights, planned, out, ws.shard_size)
                tok.save_pretrained(out)
                if (ws.model_dir / "generation_config.json").is_file():
                    shutil.copy2(ws.model_dir / "generation_config.json", out / "generation_config.json")
                summ = evaluate.summary(small, counts)
            else:
                small = remove(lm, planned)
                summ = evaluate.summary(small)
                save_model(small, tok, out, ws.shard_size)
            prune_s = time.perf_counter() - t0
            tx.step.metrics = {"prune_s": round(prune_s, 3), "plan": planned.to_json(), "units_removed": planned.n_units,
                               "parameters_before": before_params, **summ,
                               "geometry_before": before_geom.__dict__, "geometry": geometry(small).__dict__,
                               **({"routing_renormalised": exact} if exact is not None else {}),
                               **({"budget": budget} if budget is not None else {})}
            PlanRecord(planned, regularized, applied=True).write(tx)
        return {"method": "dress", "structure": structure, "ratio": ratio, "select": select_,
                "regularized": regularized, **tx.step.metrics}


METHOD = DReSS()


# --- the regularize step ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegularizeOptions:
    """What ``llmprune regularize`` was asked for; recorded as the step's parameters, in this order."""

    ratio: float = DEFAULT_RATIO
    structure: str = DEFAULT_STRUCTURE
    select: str = DEFAULT_SELECT
    norm: str = "group"
    shrink: str = "prox"
    lam: float = 0.02
    steps: int = 100
    until_converged: bool = False
    gap_tol: float = 0.01
    lr: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    holdout: int = 8
    eval_every: int = 25
    seed: int = 0
    grad_checkpointing: bool = False
    device: str = "cpu"
    distill: bool = False
    kd_temperature: float = 1.0
    kd_weight: float = 1.0
    teacher: Optional[str] = None
    target_params: Optional[str] = None  # a budget instead of the ratio (resolved in the step)
    search_steps: int = 0  # a combination's candidates scored after this many regularisation steps (0: by removal)
    dataset: Optional[str] = None  # training text (None: the calibration windows, which also choose the units)
    text_field: str = "text"
    seqlen: Optional[int] = None  # windows of the training text (None: the calibration's)
    teacher_steps: int = 0  # teacher correction before distilling (0: none)
    # Train on the calibration windows themselves. Default: fresh windows of the calibration text (as if it were
    # given as --dataset), which is what the record then names.
    calibration_windows: bool = False
    save_every: int = 25  # not a parameter of the result: a resumed run with another value is the same run

    def params(self) -> dict[str, Any]:
        p = dataclasses.asdict(self)
        del p["calibration_windows"]  # a record without a dataset trained on the calibration windows, as always
        del p["save_every"]
        if self.target_params is None:
            del p["target_params"]
        if not self.search_steps:  # scored by removal, as before the option existed
            del p["search_steps"]
        if self.dataset is None:  # trained on the calibration windows: recorded as before the option existed
            for k in ("dataset", "text_field", "seqlen"):
                del p[k]
        if not self.distill:  # the KD settings do not apply: a plain run records what it always did
            from llmprune.distill import KD_OPTIONS

            for k in ("distill", *KD_OPTIONS):
                del p[k]
        if not self.teacher_steps:  # recorded only when the teacher was corrected: older records stay as they were
            del p["teacher_steps"]
        return p

    def check(self) -> None:
        from llmprune.distill import check_options

        check_choice(self.structure, self.select)
        check_options(self.kd_temperature, self.kd_weight)
        if self.teacher is not None and not self.distill:
            raise UserError("--teacher names the model to distil from: add --distill")
        if self.norm not in NORMS:
            raise UserError(f"unknown --norm '{self.norm}'; use one of: {', '.join(NORMS)}")
        if self.shrink not in SHRINKS:
            raise UserError(f"unknown --shrink '{self.shrink}'; use one of: {', '.join(SHRINKS)}")
        if self.search_steps < 0:
            raise UserError(f"--search-steps must be >= 0, got {self.search_steps}")
        if self.calibration_windows and self.dataset is not None:
            raise UserError("--calibration-windows trains on the calibration windows, --dataset on another text's: "
                            "give one of them")
        if self.text_field != "text" and self.dataset is None:
            raise UserError("--text-field names the field of --dataset's records; give --dataset")
        if self.seqlen is not None and self.calibration_windows:
            raise UserError("--seqlen sets the windows of the training text; --calibration-windows trains on the "
                            "calibration windows as they are")
        if self.seqlen is not None and self.seqlen < 2:
            raise UserError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.search_steps and not ("+" in self.structure and self.target_params is not None):
            raise UserError("--search-steps scores the splits of a combination's budget: give --structure A+B "
                            "with --target-params")


def calibration_text(ws: Workdir, o: RegularizeOptions) -> tuple[str | None, RegularizeOptions, str | None]:
    """The default training text of ``regularize``: the calibration text, read again, so that training takes fresh
    windows of it (thousands on a real corpus) instead of the 64 calibration windows, which 100 steps pass over
    1.8 times and longer runs overfit (benchmarks/README.md: 23.59 against 25.69 test perplexity at the defaults on
    SmolLM2, 21.86 against 39.13 at 200 steps). Returns (text, the options naming it as --dataset, None), or
    (None, the options unchanged, why not) when the text cannot be read again (moved, or offline)."""
    from llmprune import data

    manifest = ws.manifest()
    source = manifest["calibration"]["source"]
    calibrate = next((s for s in manifest["steps"] if s["command"] == "calibrate"), None)
    field = (calibrate or {}).get("params", {}).get("text_field", "text")
    try:
        text = data.load_text(source, "calibration", field)
    except (UserError, OSError) as e:
        if o.seqlen is not None:
            raise UserError(f"--seqlen sets the windows of the calibration text, which cannot be read again ({e}); "
                            "give --dataset") from None
        return None, o, f"the calibration text cannot be read again ({e})"
    return text, dataclasses.replace(o, dataset=source, text_field=field), None


def stale_calibration_text(ws: Workdir, ids: torch.Tensor, windows: torch.Tensor) -> str | None:
    """Why the text read again is not the one ``calibrate`` cut its windows from (``None`` when it is): its windows
    are drawn again as calibrate drew them and compared token for token -- a changed file, or a relative path that
    now names another file, cannot pass."""
    from llmprune import data

    cal = ws.manifest()["calibration"]
    if ids.numel() != cal.get("source_tokens"):
        return f"the calibration text {cal['source']} has {ids.numel():,} tokens now, {cal.get('source_tokens'):,} " \
               "when calibrate read it"
    again = data.random_windows(ids, cal["samples"], cal["seqlen"], cal["seed"])
    if not torch.equal(again.to(windows.dtype), windows):
        return f"the calibration text {cal['source']} is not the text calibrate read"
    return None


def training_windows(ws: Workdir, lm: nn.Module, tok, text: str | None, windows: torch.Tensor,
                     o: RegularizeOptions, default_text: bool, fallback: str | None):
    """(training windows, held-out windows, the options as trained, why the calibration windows were used instead of
    the default text, or None). Fresh windows of ``text`` when there is one -- made before any search, so bad input
    fails first -- else the calibration ``windows``. The default text (``default_text``: the calibration text read
    again) falls back to the calibration windows when it is not the text calibrate read, or, cut into
    non-overlapping windows, gives no more of them than calibrate's overlapping ones; an explicit ``--seqlen`` is
    refused there instead of being ignored."""
    from llmprune import data
    from llmprune.train import split_holdout, text_windows

    if text is not None:
        seqlen = o.seqlen or ws.manifest()["calibration"]["seqlen"]
        ids = data.tokenize(tok, text)
        fallback = stale_calibration_text(ws, ids, windows) if default_text else None
        fresh = None if fallback else text_windows(lm, tok, ids, seqlen)  # a copy: the tokens are not kept
        if default_text and fresh is not None and o.seqlen is None and fresh.shape[0] <= windows.shape[0]:
            fallback = (f"the calibration text gives {fresh.shape[0]} fresh windows of {seqlen} tokens, no more than "
                        f"the {windows.shape[0]} calibration windows")
        if fallback and o.seqlen is not None:
            raise UserError(f"--seqlen sets the windows of the calibration text, but {fallback}; give --dataset")
        if not fallback:
            return (*split_holdout(fresh, o.holdout), o, None)
        o = dataclasses.replace(o, dataset=None, text_field="text")
    return (*split_holdout(windows, o.holdout), o, fallback)


def regularize_workdir(ws: Workdir, o: RegularizeOptions) -> dict[str, Any]:
    """The ``regularize`` step: choose the units, train the whole model while they are driven to zero, and record
    the plan as regularised and pending (``prune --method dress`` applies it)."""
    import resource

    from llmprune import data, distill, resume
    from llmprune.current import load_current
    from llmprune.modeling import save_model
    from llmprune.train import TrainSpec, passes, warn_repeated_windows

    started = time.time()
    text = data.load_text(o.dataset, "training", o.text_field) if o.dataset is not None else None  # fail fast
    fallback = None
    default_text = o.dataset is None and not o.calibration_windows
    if default_text:
        text, o, fallback = calibration_text(ws, o)
    with ws.step("regularize", o.params()) as tx:
        ws.record_inputs(tx, "model")
        ws.record_inputs(tx, "calib")
        lm, tok = load_current(ws, "float32")  # trained in fp32: AdamW on half-precision weights drifts
        check_supported(lm, o.structure)
        windows = ws.windows()
        train_w, hold, o, fallback = training_windows(ws, lm, tok, text, windows, o, default_text, fallback)
        del text
        tx.step.params = o.params()  # a fallback trained on the calibration windows: recorded without the text
        n_passes = passes(o.steps, o.batch_size, o.grad_accum, train_w.shape[0])
        budget = None
        combined = None
        if "+" in o.structure:
            if o.target_params is None:
                raise UserError(f"--structure {o.structure} splits a parameter budget between its structures: give "
                                "--target-params (100M, or 0.75 of the model)")
            combined, budget = search_combination(lm, o.structure, o.target_params, o.select, ws.windows(), o.device,
                                                  o.seed, o.holdout, regularized=o)
            tx.step.params["ratio"] = 0.0
        elif o.target_params is not None:
            budget = resolve_budget(lm, o.structure, o.target_params)
            o = dataclasses.replace(o, ratio=budget["ratio"])
            tx.step.params["ratio"] = o.ratio
        plan = combined or select(lm, o.structure, o.ratio, o.select, windows, o.device, o.seed)
        where = resume_dir(ws, o, tx.step.params, plan, train_w, hold) if o.save_every else None
        distiller, correction = None, None
        if o.distill:
            if o.teacher is None:
                ws.record_inputs(tx, distill.TEACHER)
            teacher, correction = distill.prepare_teacher(
                ws, o.teacher, lm, tok, train_w, hold, o.teacher_steps, where=where, keep=True, seed=o.seed,
                batch_size=o.batch_size, grad_accum=o.grad_accum, grad_checkpointing=o.grad_checkpointing,
                device=o.device)
            distiller = distill.Distiller(teacher, o.kd_temperature, o.kd_weight)
        if fallback is not None:  # only once the plan holds: a refused one needs no warning before it
            report.warn(f"training on the {train_w.shape[0]} calibration windows: {fallback}; give --dataset to "
                        "train on fresh windows of a text, or --calibration-windows to say so")
        if o.dataset is None:
            warn_repeated_windows(o.steps, n_passes, train_w.shape[0], "" if fallback else
                                  "; without --calibration-windows regularize trains on fresh windows of the "
                                  "calibration text")
        spec = TrainSpec(steps=o.steps, lr=o.lr, batch_size=o.batch_size, grad_accum=o.grad_accum, seed=o.seed,
                         grad_checkpointing=o.grad_checkpointing, eval_every=o.eval_every)
        hist = regularize(lm, train_w, hold, plan, norm=o.norm, shrink=o.shrink, lam=o.lam, spec=spec,
                          device=o.device, until_converged=o.until_converged, gap_tol=o.gap_tol, distiller=distiller,
                          resume_dir=where, save_every=o.save_every)
        last = hist["evals"][-1]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tx.step.metrics = {"plan": plan.to_json(), "units_removed": plan.n_units, **{k: last[k] for k in (
            "relative_norm", "ppl", "ppl_zeroed", "gap")}, "before": hist["evals"][0], "steps": hist["steps"],
            "stopped_early": hist["stopped_early"], "resumed_from": hist.get("resumed_from"),
            "train_s": hist["seconds"], "train_windows": train_w.shape[0],
            "trained_on": o.dataset if o.dataset is not None else "calibration windows",
            "passes": round(n_passes * hist["steps"] / o.steps, 3), **({"seqlen": train_w.shape[1]} if o.dataset else {}), "peak_rss_mib": round(peak, 1),
            "loss": hist["loss"], "evals": hist["evals"], **({"budget": budget} if budget else {}), **({"kd": hist["kd"], "final_kd": hist["final_kd"]}
                                                             if o.distill else {}),
            **({"teacher_correction": correction} if correction else {})}
        PlanRecord(plan, regularized=True, applied=False).write(tx)
        save_model(lm, tok, tx.stage("model"), ws.shard_size)
    resume.clear(ws.path, "regularize", where, started)  # with --save-every 0 too: older runs' are stale now
    return tx.step.metrics


def resume_dir(ws: Workdir, o: RegularizeOptions, params: dict[str, Any], plan: Plan, train_w: torch.Tensor,
               hold: torch.Tensor):
    """Where this run's checkpoint lives (``llmprune.resume``): keyed on the parameters as recorded, the model's and
    the calibration's files, the units chosen, the training and held-out windows themselves (whatever text made
    them) and the teacher -- a checkpoint resumes only the run that wrote it."""
    from llmprune import distill, resume

    folders = ("model", "calib", *((distill.TEACHER,) if o.distill and o.teacher is None else ()))
    teacher = resume.path_stamp(o.teacher) if o.distill and o.teacher else None
    return resume.checkpoint_dir(ws.path, "regularize", [
        params, resume.files_under(ws.manifest(), *folders), plan.to_json(), resume.tensor_digest(train_w),
        resume.tensor_digest(hold), teacher])
