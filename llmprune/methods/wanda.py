"""Wanda (Sun et al. 2023, arXiv 2306.11695): score ``|W_ij| * ||X_j||_2``, compared per output row.

``||X_j||`` comes from the block's own inputs, which the engine produces from the already pruned earlier blocks.
"""

from __future__ import annotations

import torch

from llmprune.masks import select
from llmprune.methods.base import BlockContext, Method
from llmprune.stats import RowNorms


def score(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * ||X_j||``."""
    return weight.abs().float() * norms.reshape(1, -1)


class Wanda(Method):
    name = "wanda"
    label = "Wanda"
    summary = "|W| * ||X||, compared per output row (Sun et al. 2023)"
    true_sequential = True

    @torch.no_grad()
    def prune_block(self, ctx: BlockContext) -> None:
        def prune_linear(lin, stat: RowNorms) -> None:
            w = lin.weight.data
            w[select(score(w, stat.norms("sum")), ctx.spec.pattern, ctx.spec.sparsity)] = 0

        ctx.prune_each_linear(RowNorms, prune_linear)


METHOD = Wanda()
