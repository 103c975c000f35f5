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
import math
from typing import Any, Iterator

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import engine
from llmprune.stats import RowNorms
from llmprune.structured import Plan, Slice, check_supported, count_removed, geometry, slices

SELECTS = ("activation", "tail", "random")
NORMS = ("group", "l2", "l1")
SHRINKS = ("prox", "loss")
SELECT_WINDOWS = 16  # windows the activation scores are measured on: channel RMS is stable well before that


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
           batch_size: int = 4) -> torch.Tensor:
    """Importance of every unit on calibration data; lower is removed first. ``hidden``: [d], RMS of the residual
    stream summed over the block boundaries; ``heads``: [L, KV]; ``mlp``: [L, I]; ``layers``: [L]."""
    g = geometry(model)
    p = _arch.arch_for(model.config.model_type).parts
    acts = engine.capture(model, windows, batch_size, device)
    tokens = windows.numel()
    hidden = torch.zeros(g.hidden, dtype=torch.float64)
    per_block: list[torch.Tensor] = []
    influence: list[float] = []
    prev: engine.Activations | None = None

    def rms(a: engine.Activations) -> torch.Tensor:
        return (sum(h.float().pow(2).sum((0, 1)).double() for h in a.hidden) / tokens).sqrt().cpu()

    walk = engine.Walk(model, acts, device, f"scoring {structure}")
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


def _influence(a: engine.Activations, b: engine.Activations) -> float:
    vals = [block_influence(x, y) for x, y in zip(a.hidden, b.hidden)]
    return sum(vals) / len(vals)


def select(model: nn.Module, structure: str, ratio: float, how: str, windows: torch.Tensor | None,
           device: str = "cpu", seed: int = 0, batch_size: int = 4) -> Plan:
    """The units to remove: ``activation`` (lowest scores on calibration data), ``tail`` (the last indices; for
    blocks, the last ones before the final block, which every model needs), or ``random`` (seeded)."""
    check_supported(model, structure)
    g = geometry(model)
    n = count_removed(g, structure, ratio)
    per_block = structure in ("heads", "mlp")
    size = {"hidden": g.hidden, "heads": g.kv_heads, "mlp": g.mlp, "layers": g.layers}[structure]
    if how == "activation":
        assert windows is not None
        s = scores(model, structure, windows[:SELECT_WINDOWS], device, batch_size)
        rows = s if per_block else s.unsqueeze(0)
        removed = [sorted(torch.argsort(r, stable=True)[:n].tolist()) for r in rows]
    elif how == "tail":
        if structure == "layers":
            idx = list(range(size - 1 - n, size - 1))
        else:
            idx = list(range(size - n, size))
        removed = [idx] * (g.layers if per_block else 1)
    elif how == "random":
        gen = torch.Generator().manual_seed(seed)
        removed = [sorted(torch.randperm(size, generator=gen)[:n].tolist())
                   for _ in range(g.layers if per_block else 1)]
    else:
        raise ValueError(how)
    return Plan(structure, removed if per_block else removed[0], ratio, how,
                {"units": n, "of": size, **({"seed": seed} if how == "random" else {})})


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
               gap_tol: float = 0.01, norm_tol: float = 1e-3) -> dict[str, Any]:
    """Train the whole model with the LM loss while the plan's slices go to zero; returns the history with, at every
    evaluation, the held-out perplexity with and without the slices zeroed and their relative norm."""
    from llmprune.train import heldout_nll, train

    pen = Penalty(model, plan, norm)

    def measure(m: nn.Module, step: int) -> dict[str, Any]:
        nll = heldout_nll(m, holdout)
        with pen.zeroed():
            nll0 = heldout_nll(m, holdout)
        return {"relative_norm": round(pen.relative_norm(), 6), "ppl": round(math.exp(nll), 4),
                "ppl_zeroed": round(math.exp(nll0), 4), "gap": round(math.exp(nll0 - nll) - 1, 6)}

    before = {"step": 0, **measure(model, 0)}
    hist = train(
        model, train_windows, spec, device=device,
        extra_loss=(lambda m: pen.loss(lam)) if shrink == "loss" else None,
        after_step=(lambda m, step, lr: pen.shrink(lam)) if shrink == "prox" else None,
        evaluate=measure,
        stop=(lambda m: m["gap"] <= gap_tol and m["relative_norm"] <= norm_tol) if until_converged else None,
        description=f"regularizing {plan.structure}",
    )
    hist["evals"].insert(0, before)
    return hist
