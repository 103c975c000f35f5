"""OWL: outlier-weighted layer-wise sparsity (Yin et al., ICML 2024, arXiv 2310.05175).

One global sparsity ``s`` becomes one sparsity per decoder block: a block whose Wanda scores hold more outliers keeps
more of its weights. For block ``l`` the outlier ratio ``D_l`` is the fraction of the scores ``|W_ij| * ||X_j||`` of
all its prunable weights that exceed ``M`` times their mean (``M`` = 5 in the paper). The ratios are min-max scaled
to a spread of ``2 * lambda`` and centred, so ``s_l = s - (scaled_l - mean(scaled))`` (what the paper's
``[s - lambda, s + lambda]`` range amounts to in its code), the mean weighted by the blocks' prunable weights so that
the model as a whole is still ``s`` sparse. Paper: LLaMA-7B at 70% unstructured, Wanda 85.77 -> OWL + Wanda 24.55
(WikiText-2), with ``lambda`` = 0.08 and ``M`` = 5.

The ratios are measured on the *dense* model, in one pass of the calibration windows before pruning starts (the
paper's order; each block runs once, its statistics and outputs together): a block's outliers are a property of the
trained model, not of what earlier pruning did to it. They use Wanda's score whatever the method (the paper's
definition; magnitude, SparseGPT and Wanda++ get the same per-block targets as Wanda), so OWL needs calibration
windows even for magnitude.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmprune import engine
from llmprune.units import block_linears
from llmprune.errors import UserError
from llmprune.methods.wanda import score
from llmprune.stats import RowNorms

DEFAULT_M = 5.0


@dataclass(frozen=True)
class Settings:
    """What OWL was asked for: ``lam``, the spread of the block sparsities (``--owl-lambda``), and ``m``, the
    outlier threshold in multiples of a block's mean score (``--owl-m``). Handed to ``pruning.prune_model``."""

    lam: float
    m: float = DEFAULT_M


def check(sparsity: float, lam: float, m: float) -> None:
    """Refuse, before any pass, a lambda whose spread could push a block outside [0, 1): a block's sparsity moves
    by at most ``2 * lambda`` from ``s`` (one block at one end of the scaled range, the mean at the other)."""
    if not (lam > 0 and m > 0):
        raise UserError(f"--owl-lambda and --owl-m must be positive, got {lam} and {m}")
    room = min(sparsity, 1 - sparsity) / 2
    if lam > room:
        raise UserError(f"--owl-lambda {lam} could move a block's sparsity by up to {2 * lam:.2f}, past 0 or 1 at "
                        f"--sparsity {sparsity}; use at most {room:.3f}")


def outlier_ratio(scores: Iterable[torch.Tensor], m: float) -> float:
    """``D``: the fraction of all the scores (of every prunable weight of one block) above ``m`` times their mean.

    ``scores`` is iterated twice (their sum, then the count above the threshold) instead of concatenated: given a
    re-iterable that makes each Linear's scores on demand (``block_ratio``), only one Linear's scores exist at
    a time -- a 70B block's scores together are 3 GB of fp32."""
    total, count = 0.0, 0
    for s in scores:
        total += float(s.sum(dtype=torch.float64))
        count += s.numel()
    if count == 0:
        return 0.0
    threshold = m * total / count
    return sum(int((s > threshold).sum()) for s in scores) / count


def block_sparsities(ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lam: float) -> list[float]:
    """``s_l = s - (r_l - mean_w(r))`` with ``r`` the ratios min-max scaled to ``[0, 2 * lambda]`` and ``mean_w``
    weighted by ``sizes`` (each block's prunable weights): the weighted mean of the result is exactly ``s``. Equal
    ratios (or one block) give ``s`` everywhere."""
    d = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = d.max() - d.min() if len(d) else torch.tensor(0.0)
    if len(d) < 2 or spread <= 0:
        return [float(sparsity)] * len(d)
    r = (d - d.min()) / spread * (2 * lam)
    centred = r - (r * w).sum() / w.sum()
    return [float(v) for v in sparsity - centred]


def block_ratio(block: nn.Module, stats: dict, m: float) -> tuple[float, int]:
    """One block's outlier ratio from its Linears' input norms (``RowNorms``), and its number of prunable weights."""
    linears = block_linears(block)
    # An expert no calibration token reached has no norms: its scores would all be zero; it is left out of D
    # (its weights still count in the block's size, which sets the block's share of the budget).
    fed = [(lin.weight.data, stats[n].norms("sum")) for n, lin in linears.items() if n in stats]

    class Scores:  # each Linear's scores made when iterated, never all held at once
        def __iter__(self):
            return (score(w, x) for w, x in fed)

    return outlier_ratio(Scores(), m), sum(lin.weight.numel() for lin in linears.values())


def dense_ratios(model: nn.Module, acts: engine.Activations, device: str, m: float,
                 weights=None) -> tuple[list[float], list[int]]:
    """Every block's outlier ratio and size, walking the unpruned model over the calibration windows."""
    ratios: list[float] = []
    sizes: list[int] = []
    walk = engine.Walk(model, acts, device, "OWL outlier ratios", last_outputs=False, weights=weights)
    for _, block, inputs in walk:
        # The statistics and the next block's inputs in one pass: the dense block does not change in between
        # (two passes, as a pruning step needs, made this walk cost as much as a whole Wanda prune).
        stats, walk.next_inputs = engine.collect_and_run(block, inputs, device, RowNorms)
        d, n = block_ratio(block, stats, m)
        ratios.append(d)
        sizes.append(n)
    return ratios, sizes
