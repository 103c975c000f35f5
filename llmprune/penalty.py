"""DReSS's penalty: drive the slices of the units chosen for removal to zero while the model trains, so their
information migrates into the parts that stay (Feng et al. 2025, arXiv 2501.17905; ``docs/methods.md``, "DReSS").

Two ways, both scale-free (``lambda`` is relative to each unit's initial norm, so one value means the same thing for
every model size):

- ``prox`` (default, decoupled): after every optimiser step, a proximal step shrinks each unit's norm by
  ``lambda * its initial norm`` (soft-thresholding, Parikh & Boyd 2014, sec. 6.5). Reaches exact zeros in at most
  ``1 / lambda`` steps; Adam cannot stall it, as it can a penalty added to the loss.
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

from llmprune import sharding
from llmprune.stats import exp_nll
from llmprune.structured import Plan, Slice, slices
from llmprune.structures import STRUCTURES


NORMS = ("group", "l2", "l1")
SHRINKS = ("prox", "loss")


class Penalty:
    """The plan's slices in a live model, their initial norms, and the two ways to drive them to zero."""

    def __init__(self, model: nn.Module, plan: Plan, norm: str = "group"):
        if norm not in NORMS:
            raise ValueError(norm)
        self.norm = norm
        self.plan = plan
        self.slices: list[Slice] = []
        self.names: list[str] = []
        seen: set[int] = set()
        params = dict(model.named_parameters(remove_duplicate=False))
        for sl in slices(model, plan):  # tied tensors (embeddings / lm_head) are one parameter: count it once
            prm = params.get(sl.param)  # None: a buffer cut with the unit (a router's correction bias), not trained
            if prm is not None and id(prm) not in seen:
                seen.add(id(prm))
                self.slices.append(sl)
                self.names.append(sl.param)
        self.bind(model)
        self.n_units = 1 + max((int(s.unit.max()) for s in self.slices), default=-1)
        with torch.no_grad():
            self.init = self.unit_norms().detach().clamp_min(1e-12)
            self.init_total = self._total_norm()
            # Entries per unit, for the element-wise (l1) threshold.
            self.count = torch.zeros(self.n_units)
            for sl, prm in zip(self.slices, self.params):
                per_row = prm.numel() // prm.shape[sl.dim]
                self.count.index_add_(0, sl.unit, torch.full((len(sl.index),), float(per_row)))

    def bind(self, model: nn.Module) -> "Penalty":
        """Act on ``model``'s parameters of the same names: the model trained may be a sharded twin of the one the
        penalty was measured on (``sharding``), whose parameters are other objects."""
        params = dict(model.named_parameters(remove_duplicate=False))
        self.params: list[nn.Parameter] = [params[n] for n in self.names]
        self.sharded = any(sharding.is_sharded(p) for p in self.params)
        return self

    @staticmethod
    def _rows(prm: torch.Tensor, sl: Slice) -> torch.Tensor:
        """The slice as [positions, everything else]."""
        return prm.index_select(sl.dim, sl.index.to(prm.device)).movedim(sl.dim, 0).reshape(len(sl.index), -1)

    def _parts(self) -> Iterator[tuple[Slice, torch.Tensor]]:
        """Each slice as ``(slice, rows)`` where rows is [positions, everything else]: the whole slice of a whole
        parameter (differentiable: the ``loss`` mode's gradient flows through it), or, of a sharded one, the
        positions of the rows this process holds (the slice re-indexed to them)."""
        for sl, prm in zip(self.slices, self.params):
            if not sharding.is_sharded(prm):
                yield sl, self._rows(prm, sl)
                continue
            t, start = sharding.local(prm)
            if sl.dim == 0:  # rows split across processes: this process's positions only
                mine = (sl.index >= start) & (sl.index < start + t.shape[0])
                sl = Slice(sl.param, 0, sl.index[mine] - start, sl.unit[mine])
            yield sl, self._rows(t, sl)

    def unit_norms(self) -> torch.Tensor:
        """``group``: [units]; ``l2``: [slices, units] (zero where a slice has no part of a unit); ``l1``: [units]."""
        per: list[torch.Tensor] = []
        for sl, rows in self._parts():
            val = rows.abs().sum(1) if self.norm == "l1" else rows.float().pow(2).sum(1)
            acc = torch.zeros(self.n_units, dtype=val.dtype, device=val.device).index_add(0, sl.unit.to(val.device), val)
            per.append(acc)
        stacked = sharding.sum_over_processes(torch.stack(per), self.sharded)
        if self.norm == "l1":
            return stacked.sum(0)
        if self.norm == "group":
            return stacked.sum(0).clamp_min(1e-30).sqrt()
        return stacked.clamp_min(1e-30).sqrt() * (stacked > 0)

    def _total_norm(self) -> float:
        sq = torch.zeros((), dtype=torch.float64)
        for _, rows in self._parts():
            sq += rows.double().pow(2).sum().cpu()
        return math.sqrt(sharding.sum_over_processes(sq, self.sharded).item())

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
            for (sl, rows), prm in zip(self._parts(), self.params):
                t = thresh.to(rows.device)[sl.unit.to(rows.device)].unsqueeze(1).to(rows.dtype)
                self._write(prm, sl, rows.sign() * (rows.abs() - t).clamp_min(0))
            return
        norms = self.unit_norms()
        thresh = lam * self.init.to(norms.device)
        # A unit within float rounding of the threshold goes to exactly zero (it would keep ~1e-8 of its norm).
        scale = torch.where(norms <= thresh * (1 + 1e-5), 0.0, 1 - thresh / norms.clamp_min(1e-30))
        scales = [scale] * len(self.slices) if self.norm == "group" else list(scale)
        for (sl, rows), prm, sc in zip(self._parts(), self.params, scales):
            self._write(prm, sl, rows * sc[sl.unit.to(sc.device)].unsqueeze(1).to(rows.dtype))

    @staticmethod
    def _write(prm: torch.Tensor, sl: Slice, rows: torch.Tensor) -> None:
        """Write ``rows`` (as ``_parts`` gave them: a sharded parameter's slice re-indexed to its local rows)."""
        t = sharding.local(prm)[0]
        other = [n for i, n in enumerate(t.shape) if i != sl.dim]
        rows = rows.reshape(len(sl.index), *other).movedim(0, sl.dim)
        t.index_copy_(sl.dim, sl.index.to(t.device), rows.to(t.dtype))

    @contextlib.contextmanager
    def zeroed(self) -> Iterator[None]:
        """The model with the selected slices at zero, restored afterwards (to measure what removal costs)."""
        with torch.no_grad():
            saved = [(sl, rows.clone()) for sl, rows in self._parts()]
            for (sl, _), prm in zip(saved, self.params):
                t = sharding.local(prm)[0]
                t.index_fill_(sl.dim, sl.index.to(t.device), 0)
        try:
            yield
        finally:
            with torch.no_grad():
                for (sl, rows), prm in zip(saved, self.params):
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
        pen.bind(m)
        nll = heldout_nll(m, holdout)
        if not all(STRUCTURES[s].zeroing_removes for s in plan.structure.split("+")):
            # A router row at zero still gives its expert a logit of 0, which can win the top-k: zeroing is not
            # removing here, so the gap is measured on the model with the experts removed.
            from llmprune.surgery import remove

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
        after_step=(lambda m, step, lr: pen.bind(m).shrink(lam)) if shrink == "prox" else None,
        evaluate=measure,
        stop=(lambda m: m["gap"] <= gap_tol and m["relative_norm"] <= norm_tol) if until_converged else None,
        description=f"regularizing {plan.structure}", distiller=distiller, resume_dir=resume_dir,
        save_every=save_every,
    )
    pen.bind(model)  # the model trained was a sharded twin under FSDP: its weights are back in ``model``
    hist["evals"].insert(0, before)
    return hist
