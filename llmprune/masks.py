"""Sparsity patterns and mask selection: pure functions of a score matrix.

A mask is a bool tensor shaped like the weight ``[out, in]`` where True marks a weight to remove.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.errors import UserError


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` (n = m = 0) or N:M: keep N of every M consecutive inputs in each row."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(text: str, sparsity: float | None) -> tuple[Pattern, float]:
    """The pattern and the sparsity it implies; a conflicting ``--sparsity`` is an error."""
    if text == "unstructured":
        s = 0.5 if sparsity is None else sparsity
        if not 0 < s < 1:  # 0 would prune nothing yet record a prune step
            raise UserError(f"--sparsity must be in (0, 1), got {s}")
        return Pattern(), s
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"unknown pattern '{text}'; use unstructured, 2:4, 4:8 or another N:M") from None
    if not 0 < n < m:
        raise UserError(f"pattern {text}: need 0 < N < M (N weights kept of every M)")
    implied = 1 - n / m
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise UserError(f"pattern {text} implies sparsity {implied:g}; drop --sparsity or pass {implied:g}")
    return Pattern(n, m), implied


def check_width(pattern: Pattern, width: int, name: str) -> None:
    if pattern.is_nm and width % pattern.m:
        raise UserError(f"pattern {pattern}: the input width {width} of {name} is not a multiple of {pattern.m}")


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the ``int(in * sparsity)`` lowest scores of every output row (Wanda's comparison group)."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the ``int(numel * sparsity)`` lowest scores of the whole matrix (the magnitude baseline's group)."""
    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every row and every group of ``m`` consecutive inputs, remove the ``m - n`` lowest scores."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, m - n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def select(score: torch.Tensor, pattern: Pattern, sparsity: float, per_row: bool = True) -> torch.Tensor:
    if pattern.is_nm:
        return nm_mask(score, pattern.n, pattern.m)
    return row_mask(score, sparsity) if per_row else layer_mask(score, sparsity)


def nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive inputs of every row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())
