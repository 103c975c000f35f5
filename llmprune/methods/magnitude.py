"""Magnitude pruning: score ``|W|``, no data (Han et al. 2015; the baseline of the Wanda paper).

As in the reference implementation (locuslab/wanda ``prune_magnitude``), unstructured magnitude pruning compares
weights across the whole layer, not per output row; N:M compares within each group.
"""

from __future__ import annotations

import torch

from llmprune.masks import select
from llmprune.methods.base import BlockContext, Method


class Magnitude(Method):
    name = "magnitude"
    label = "magnitude"
    summary = "|W|, compared per layer; no data (the baseline)"
    needs_data = False

    @torch.no_grad()
    def prune_block(self, ctx: BlockContext) -> None:
        for lin in ctx.linears.values():
            w = lin.weight.data
            w.masked_fill_(select(w.abs(), ctx.spec.pattern, ctx.spec.sparsity, per_row=False), 0)


METHOD = Magnitude()
