"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): prune column by column with OBS weight updates.

Per Linear, with ``H = 2 X^T X / n`` (stats.Hessian), damped by ``damp * mean(diag H)``: take the upper Cholesky
factor of ``H^-1``, sweep the columns in blocks of ``blocksize``, choose the mask for each block (the lowest
``w^2 / [H^-1]_jj^2`` -- adaptive across the block for unstructured, per group for N:M), and spread each removed
weight's error over the columns not yet visited (Algorithm 1 of the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.errors import StepFailed
from llmprune.masks import Pattern
from llmprune.methods.base import BlockContext, Method
from llmprune.options import option, positive
from llmprune.stats import Hessian


@dataclass(frozen=True)
class Options:
    blocksize: int = option(128, "SparseGPT: columns per block.", check=positive)
    damp: float = option(0.01, "SparseGPT: damping, as a fraction of the mean Hessian diagonal.", check=positive)


def inverse_cholesky(H: torch.Tensor, damp: float, tries: int = 6, overwrite: bool = False) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``; raises the damping tenfold while it fails.

    A zero on the diagonal (an input that is always zero) becomes 1 first, so the factorisation exists.
    ``overwrite``: ``H`` may serve as the work matrix (its last user passes it): one copy fewer at the step's peak.
    """
    A = H if overwrite else H.clone()
    del H
    dead = torch.diag(A) == 0
    A[dead, dead] = 1
    diag = A.diagonal().clone()  # a retry damps afresh: the work matrix is damped in place
    mean_diag = torch.mean(diag).item()
    for _ in range(tries):
        # Damped on the diagonal (no identity matrix); the factor L is freed as soon as the inverse exists. At most
        # three matrices at once (A, the inverse, its factor): a 14336-input Hessian is 822 MB in fp32.
        A.diagonal().copy_(diag).add_(damp * mean_diag)
        try:
            Hinv = torch.cholesky_inverse(torch.linalg.cholesky(A))
            return torch.linalg.cholesky(Hinv, upper=True), damp
        except torch.linalg.LinAlgError:
            damp *= 10
    raise StepFailed(
        f"SparseGPT: the Hessian cannot be factorised even with damping {damp / 10:g}; "
        "use more calibration samples or a larger --damp"
    )


@torch.no_grad()
def prune_weight(
    W: torch.Tensor, H: torch.Tensor, pattern: Pattern, sparsity: float, blocksize: int = 128, damp: float = 0.01
) -> tuple[torch.Tensor, float]:
    """The pruned (and updated) weight, and the damping that was needed."""
    dead = torch.diag(H) == 0
    Hinv, used = inverse_cholesky(H, damp)
    return sweep(W, Hinv, dead, pattern, sparsity, blocksize), used


@torch.no_grad()
def sweep(W: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, pattern: Pattern, sparsity: float,
          blocksize: int = 128) -> torch.Tensor:
    """Algorithm 1's column sweep: ``W`` pruned with OBS updates from ``Hinv`` (``inverse_cholesky``'s factor);
    ``dead``: the inputs that are always zero (their weights are removed first)."""
    W = W.to(torch.float32, copy=True)
    rows, cols = W.shape
    W[:, dead] = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if pattern.is_nm:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            # Adaptive mask selection: the lowest OBS saliencies over the whole block of columns.
            sal = (W1**2 / d.reshape(1, -1) ** 2).flatten()
            mask1 = torch.zeros(sal.numel(), dtype=torch.bool, device=W.device)
            k = int(sal.numel() * sparsity)
            if k:
                mask1[torch.topk(sal, k, largest=False).indices] = True
            mask1 = mask1.view_as(W1)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                sal = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].reshape(1, -1) ** 2
                idx = torch.topk(sal, pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


class SparseGPT(Method):
    name = "sparsegpt"
    label = "SparseGPT"
    summary = "OBS weight updates from the Hessian of each Linear's inputs (Frantar & Alistarh 2023)"
    Options = Options
    true_sequential = True

    @torch.no_grad()
    def prune_block(self, ctx: BlockContext) -> None:
        opts: Options = ctx.spec.options

        def prune_linear(lin, stat: Hessian) -> None:
            # The statistic's last user hands its matrix to the factorisation, which damps it in place: that is
            # the step's memory peak, one Hessian smaller (the matrix is freed as soon as the factor exists).
            last = getattr(stat, "last_use", False)
            dead = torch.diag(stat.H) == 0
            Hinv, _ = inverse_cholesky(stat.take() if last else stat.H, opts.damp, overwrite=last)
            new = sweep(lin.weight.data, Hinv, dead, ctx.spec.pattern, ctx.spec.sparsity, opts.blocksize)
            del Hinv
            lin.weight.data.copy_(new.to(lin.weight.dtype))

        ctx.prune_each_linear(Hessian, prune_linear)


METHOD = SparseGPT()
