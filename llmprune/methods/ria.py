"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language
Models"): relative importance times activations.

Score ``S_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ^ a`` with ``a = 0.5``: a weight counts
relative to the other weights of its output row and of its input column, so a channel whose weights are all large
(an outlier channel) does not win every comparison, and the activation norm enters damped by the exponent.

As in the authors' code (``lib/prune.py``, ``prune_ria``), unstructured sparsity compares the scores of the whole
layer (``--compare layer``; ``row`` is Wanda's per-output-row group, their ``--per_outneuron``), and N:M compares
within each group of M inputs of a row. Their channel permutation for N:M (heuristic reallocation plus linear sum
assignment) is not implemented: it yields an N:M pattern only in a permuted input order, which a standard checkpoint
cannot express without permuting the activations at inference.

Statistics as Wanda's: ``||X_j||`` over all calibration tokens, from the block's own inputs (``sum`` or ``mean``
scale the score uniformly, so the masks are the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.methods.base import ScoreMethod
from llmprune.options import non_negative, option


@dataclass(frozen=True)
class Options:
    act_power: float = option(0.5, "RIA: exponent a of ||X_j|| in the score.", check=non_negative)
    compare: str = option("layer", "RIA, unstructured: compare scores across the whole layer (the paper's code) or "
                          "per output row (Wanda's group).", choices=("layer", "row"))


def score(weight: torch.Tensor, norms: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """``S_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j|| ^ a`` (RIA eq. 2 with the activations)."""
    w = weight.abs().float()
    # A row or column of zeros has no relative importance to give: its weights score 0, not NaN.
    row = w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    col = w.sum(0, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return (w / row + w / col) * norms.float().reshape(1, -1).pow(power)


class RIA(ScoreMethod):
    name = "ria"
    label = "RIA"
    summary = "relative importance of each weight in its row and column, times ||X||^0.5 (Zhang et al. 2024)"
    Options = Options

    def score(self, weight: torch.Tensor, norms: torch.Tensor, options: Options) -> torch.Tensor:
        return score(weight, norms, options.act_power)

    def per_row(self, options: Options) -> bool:
        return options.compare == "row"


METHOD = RIA()
