"""Wanda (Sun et al. 2023, arXiv 2306.11695): score ``|W_ij| * ||X_j||_2``, compared per output row.

``||X_j||`` comes from the block's own inputs, which the engine produces from the already pruned earlier blocks.
"""

from __future__ import annotations

import torch

from llmprune.methods.base import ScoreMethod


def score(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * ||X_j||``."""
    # One fp32 temporary, transformed in place (``abs`` is exact, so the order changes no bit).
    return weight.to(torch.float32, copy=True).abs_().mul_(norms.reshape(1, -1))


class Wanda(ScoreMethod):
    name = "wanda"
    label = "Wanda"
    summary = "|W| * ||X||, compared per output row (Sun et al. 2023)"

    def score(self, weight: torch.Tensor, norms: torch.Tensor, options) -> torch.Tensor:
        return score(weight, norms)


METHOD = Wanda()
