"""Which experts of a mixture-of-experts block matter: REAP and routing frequency on calibration data.

REAP (router-weighted expert activation pruning; Lasby et al. 2025, arXiv 2510.13999): the score of expert e is the
mean, over the tokens routed to e, of ``g_e(x) * ||f_e(x)||_2`` -- the router's weight for e on that token (as the
model uses it, after any top-k renormalisation) times the norm of e's output. An expert that is rarely chosen, or
chosen with little weight, or that adds little when chosen, scores low and goes first. Frequency -- the number of
tokens that choose e -- is the simple baseline (docs/methods.md). An expert no calibration token chose scores 0
under both.

The statistics come from one block-by-block walk: each MoE block runs its experts expert by expert through their
views (``experts.routed``, proved equal to the model's own forward), so a hook on expert e's ``down_proj`` sees
exactly ``f_e(x)`` for the tokens routed to e, and the routed forward records the routing that chose them. (Llama 4
multiplies the router's weight into the experts' input: there ``f_e`` already carries it and the weight counted is 1.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import engine, experts


@dataclass
class ExpertStats:
    """Per MoE block (``None`` for a dense block): tokens routed to each expert, and the sum over them of
    ``g_e(x) * ||f_e(x)||``."""

    tokens: list[torch.Tensor | None]
    weighted_norm: list[torch.Tensor | None]

    def reap(self) -> list[torch.Tensor | None]:
        """The REAP score of every expert: the mean of ``g_e(x) * ||f_e(x)||`` over its tokens (0 without any)."""
        return [None if t is None else torch.where(t > 0, s / t.clamp(min=1), torch.zeros_like(s))
                for t, s in zip(self.tokens, self.weighted_norm)]

    def frequency(self) -> list[torch.Tensor | None]:
        return [None if t is None else t.double() for t in self.tokens]


def reap_terms(weights: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``g_e(x) * ||f_e(x)||_2`` for each of an expert's tokens: ``weights`` [n] its router weights, ``outputs`` [n, H]
    its outputs before they are weighted."""
    return weights.double() * outputs.double().norm(dim=-1)


def _observe(block: nn.Module, spec: _arch.Experts, n_experts: int) -> tuple[ExpertStats, list]:
    """Hooks on a routed block (inside ``experts.routed``) that add its routing and expert outputs to fresh
    counters; returns the counters (one block's) and the hook handles."""
    mod = _arch.get_module(block, spec.path)
    tokens = torch.zeros(n_experts, dtype=torch.long)
    total = torch.zeros(n_experts, dtype=torch.float64)

    def see_expert(e: int):
        def hook(_lin, _inputs, out):
            token_idx, weights = mod.__dict__[experts.ROUTING][e]  # what the routed forward gave this expert
            tokens[e] += token_idx.numel()
            total[e] += reap_terms(weights.detach(), out.detach()).sum().cpu()
        return hook

    views = experts.views(block, spec)
    down = spec.params[-1][0]  # the parameter whose output is the expert's output (down_proj)
    handles = [views[f"{spec.path}.{down}[{e}]"].register_forward_hook(see_expert(e)) for e in range(n_experts)]
    return ExpertStats([tokens], [total]), handles


@torch.no_grad()
def expert_stats(model: nn.Module, windows: torch.Tensor, device: str = "cpu", batch_size: int = 4,
                 weights=None) -> ExpertStats:
    """Routing counts and REAP sums of every expert of every MoE block over ``windows``, in one walk."""
    from llmprune.structured import geometry

    spec = _arch.arch_for(model.config.model_type).experts
    n = geometry(model).experts
    acts = engine.capture(model, windows, batch_size, device, weights=weights)
    out = ExpertStats([], [])
    walk = engine.Walk(model, acts, device, "routing experts", last_outputs=False, weights=weights)
    for _, block, inputs in walk:
        if spec is None or _arch.get_module(block, spec.path) is None:
            out.tokens.append(None)
            out.weighted_norm.append(None)
            continue
        with experts.routed(block, spec):
            stats, handles = _observe(block, spec, n)
            try:
                walk.next_inputs = engine.run_block(block, inputs, device)
            finally:
                for h in handles:
                    h.remove()
        out.tokens += stats.tokens
        out.weighted_norm += stats.weighted_norm
    return out
