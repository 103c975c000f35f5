"""Activation statistics of one Linear layer, accumulated batch by batch from its inputs.

Kept apart from the weight math so that one pass of the engine can feed any method.
"""

from __future__ import annotations

import torch
from torch import nn


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


class Hessian:
    """``H = 2 X^T X / n`` over the calibration samples, as a running average (SparseGPT)."""

    def __init__(self, layer: nn.Linear):
        cols = layer.in_features
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=layer.weight.device)
        self.samples = 0

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.H *= self.samples / (self.samples + batch)
        self.samples += batch
        x = x * (2 / self.samples) ** 0.5
        self.H.addmm_(x.T, x)
