"""Activation statistics of one Linear layer, accumulated batch by batch from its inputs.

Kept apart from the weight math so that one pass of the engine can feed any method.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn


def exp_nll(nll: float) -> float:
    """Perplexity from a mean next-token NLL: ``exp(nll)``, infinite where it overflows a float (an NLL past ~709,
    a model whose weights were destroyed) rather than raising, and NaN kept as NaN."""
    return math.exp(nll) if nll < 709.0 else (math.inf if nll == nll else nll)


class Stat(Protocol):
    """A statistic of one Linear's inputs, fed chunk by chunk by the engine (``x``: [batch, tokens, in] or [tokens, in])."""

    def add(self, x: torch.Tensor) -> None: ...


class RowNorms:
    """Squared L2 norm of every input feature over all calibration tokens: ``||X_j||^2`` (Wanda)."""

    def __init__(self, layer: nn.Linear):
        self.sumsq = torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)
        self.samples = 0

    def add(self, x: torch.Tensor) -> None:
        self.samples += x.shape[0] if x.dim() == 3 else 1
        # One fp32 copy, squared in place (the input itself is the layer's and must not change): a bf16 MLP input
        # of 4 x 512 tokens at 1B is 33 MB, 67 MB in fp32, and ``x.float().pow(2)`` held two such temporaries.
        x = x.reshape(-1, x.shape[-1]).to(torch.float32, copy=True)
        self.sumsq += x.pow_(2).sum(0).double()

    def norms(self, convention: str = "sum") -> torch.Tensor:
        """``sum``: ``||X_j||_2`` over all tokens (the paper's formula). ``mean``: the Wanda code's running mean
        of per-sample squared norms, square-rooted, i.e. ``||X_j||_2 / sqrt(samples)``. Same masks for Wanda."""
        sq = self.sumsq if convention == "sum" else self.sumsq / max(self.samples, 1)
        return sq.sqrt().float()


# Column-block width of the triangular Hessian update on the CPU: wide enough that each product stays a large GEMM,
# narrow enough that the skipped lower blocks are a real saving (the measurement: benchmarks/README.md, SparseGPT).
_TRI_BLOCK = 384


def add_xtx_upper(H: torch.Tensor, x: torch.Tensor, block: int = _TRI_BLOCK) -> None:
    """``H += x^T x`` on the upper block triangle only (diagonal blocks whole), in column blocks of ``block``.

    ``x^T x`` is symmetric, so the blocks below the diagonal repeat the ones above: with k blocks this computes
    (k + 1) / 2k of the product. ``mirror_upper_`` restores the whole matrix.
    """
    n = H.shape[0]
    k = max(1, round(n / block))
    edges = [n * i // k for i in range(k + 1)]
    for a, b in zip(edges, edges[1:]):
        H[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])


def mirror_upper_(H: torch.Tensor, block: int = _TRI_BLOCK) -> torch.Tensor:
    """In place, the whole symmetric matrix from the upper triangle of ``H`` (which ``add_xtx_upper`` fills): the
    strict lower triangle becomes the transpose of the strict upper one, so the result is exactly symmetric even
    where a diagonal block's own product is not, to rounding. Block by block: no full-size temporary (an 8B's
    14336-input Hessian is 822 MB in fp32, and building the mirror out of place held three more)."""
    n = H.shape[0]
    for a in range(0, n, block):
        b = min(a + block, n)
        H[b:, a:b].copy_(H[a:b, b:].T)
        D = H[a:b, a:b]
        D.copy_(torch.triu(D) + torch.triu(D, 1).T)
    return H


class Hessian:
    """``H = 2 X^T X / n`` over the calibration samples, as a running average (SparseGPT).

    On the CPU only the upper block triangle is accumulated (``add_xtx_upper``); the accumulation is most of
    SparseGPT's arithmetic (``tokens x in_features^2`` per Linear input), so that saves a quarter of it. On an
    accelerator one full product is kept: a few large GEMMs beat many small ones there.
    """

    def __init__(self, layer: nn.Linear):
        cols = layer.in_features
        self._H: torch.Tensor | None = torch.zeros(cols, cols, dtype=torch.float32, device=layer.weight.device)
        self._upper = self._H.device.type == "cpu"
        self._mirrored = False  # the lower triangle holds the mirror of the upper one (built once for q/k/v)
        self.samples = 0

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).to(torch.float32, copy=True)  # one temporary, scaled in place
        self._mirrored = False
        self._H *= self.samples / (self.samples + batch)
        self.samples += batch
        x.mul_((2 / self.samples) ** 0.5)
        if self._upper:
            add_xtx_upper(self._H, x)
        else:
            self._H.addmm_(x.T, x)

    @property
    def H(self) -> torch.Tensor:
        """The whole ``2 X^T X / n``; callers must not modify it (q/k/v share one statistic)."""
        if self._H is None:
            raise RuntimeError("this Hessian was handed over with take()")
        if self._upper and not self._mirrored:
            mirror_upper_(self._H)
            self._mirrored = True
        return self._H

    def take(self) -> torch.Tensor:
        """The whole matrix, handed over to its last user, which may overwrite it: one copy fewer at SparseGPT's
        factorisation, the step's memory peak."""
        H = self.H
        self._H = None
        return H
