"""Activation statistics of one Linear layer, accumulated batch by batch from its inputs.

Kept apart from the weight math so that one pass of the engine can feed any method.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


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
        x = x.reshape(-1, x.shape[-1]).float()
        self.sumsq += x.pow(2).sum(0).double()

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
    (k + 1) / 2k of the product. ``symmetric_from_upper`` restores the whole matrix.
    """
    n = H.shape[0]
    k = max(1, round(n / block))
    edges = [n * i // k for i in range(k + 1)]
    for a, b in zip(edges, edges[1:]):
        H[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])


def symmetric_from_upper(H: torch.Tensor) -> torch.Tensor:
    """The whole symmetric matrix from the upper triangle of ``H`` (which ``add_xtx_upper`` fills): mirrored, so
    the result is exactly symmetric even where a diagonal block's own product is not, to rounding."""
    return torch.triu(H) + torch.triu(H, 1).T


class Hessian:
    """``H = 2 X^T X / n`` over the calibration samples, as a running average (SparseGPT).

    On the CPU only the upper block triangle is accumulated (``add_xtx_upper``); the accumulation is most of
    SparseGPT's arithmetic (``tokens x in_features^2`` per Linear input), so that saves a quarter of it. On an
    accelerator one full product is kept: a few large GEMMs beat many small ones there.
    """

    def __init__(self, layer: nn.Linear):
        cols = layer.in_features
        self._H = torch.zeros(cols, cols, dtype=torch.float32, device=layer.weight.device)
        self._upper = self._H.device.type == "cpu"
        self._full: torch.Tensor | None = None  # the mirrored matrix, built once for every Linear that shares it
        self.samples = 0

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self._full = None
        self._H *= self.samples / (self.samples + batch)
        self.samples += batch
        x = x * (2 / self.samples) ** 0.5
        if self._upper:
            add_xtx_upper(self._H, x)
        else:
            self._H.addmm_(x.T, x)

    @property
    def H(self) -> torch.Tensor:
        """The whole ``2 X^T X / n``; callers must not modify it (q/k/v share one statistic)."""
        if not self._upper:
            return self._H
        if self._full is None:
            self._full = symmetric_from_upper(self._H)
        return self._full
