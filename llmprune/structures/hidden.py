"""``hidden``: residual-stream channels, the same in every block -- the structure the DReSS paper removes
(docs/methods.md, sections 8.2-8.4).

Removing hidden channels that are exactly zero is exact for RMSNorm models once the kept norms' effective scales
are multiplied by ``sqrt(d / d')`` (the RMS over d' channels is that much larger than over d), ``rms_norm_eps`` by
``d / d'``, and -- Gemma -- the embedding by the same factor, as its ``sqrt(hidden_size)`` multiplier shrinks
(``rescale``). LayerNorm models (OPT, Phi-2) are not exact: their mean and variance change with the width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import engine
from llmprune.errors import UserError
from llmprune.structures.base import Coupling, Geometry, Structure, Surgery, module_name


def nearest_width(total: int, n: int, heads: int) -> int:
    """The channels to remove when ``n`` are asked for: transformers' config validation (LlamaConfig) wants
    hidden_size to stay a multiple of the number of attention heads, even with an explicit head_dim, so the
    nearest such width is kept."""
    return total - heads * math.floor((total - n) / heads + 0.5)


def rescale(model: nn.Module, d: int, d_new: int) -> dict[str, tuple[float, float]]:
    """The affine maps ``v -> a v + b`` that make a model with ``d - d_new`` zero hidden channels removed compute
    the same function (RMSNorm models).

    Every RMSNorm over the hidden size sees an RMS ``f = sqrt(d / d_new)`` times larger once the zeros are gone, so
    its effective scale ``offset + w`` is multiplied by ``f``: ``w' = f w + offset (f - 1)`` (offset 1 for Gemma's
    ``(1 + w)``). An embedding scaled by ``sqrt(hidden_size)`` (Gemma) is scaled by ``sqrt(d_new)`` in the smaller
    model, so its values are multiplied by ``f``; a head tied to it is then ``f`` times larger as well, and the
    final norm's ``f`` cancels it."""
    a = _arch.arch_for(model.config.model_type)
    p = a.parts
    f = math.sqrt(d / d_new)
    norm = lambda factor: (factor, p.norm_offset * (factor - 1))  # noqa: E731
    out = {f"{a.layers}.{i}.{n}.weight": norm(f) for i in range(len(_arch.blocks(model))) for n in p.norms}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    emb = f if p.embed_scaled else 1.0
    out[f"{p.final_norm}.weight"] = norm(f / emb if tied else f)
    if p.embed_scaled:
        out[f"{p.embed}.weight"] = (emb, 0.0)
        if tied:  # the same tensor under the head's name (a model in memory lists both)
            out[f"{module_name(model, model.get_output_embeddings())}.weight"] = (emb, 0.0)
    return {k: v for k, v in out.items() if v != (1.0, 0.0)}


def rms(a: engine.Activations, tokens: int) -> torch.Tensor:
    """The RMS over all tokens of every channel of the hidden states ``a``."""
    return (sum(h.float().pow(2).sum((0, 1)).double() for h in a.hidden) / tokens).sqrt().cpu()


class _RMSAtBoundaries:
    """The RMS of the residual stream at every block boundary (each block's input, and the last block's output),
    summed over the boundaries."""

    def __init__(self, g: Geometry, tokens: int):
        self.total = torch.zeros(g.hidden, dtype=torch.float64)
        self.tokens = tokens

    def block(self, block: nn.Module, inputs: engine.Activations) -> None:
        self.total += rms(inputs, self.tokens)

    def result(self, outputs: engine.Activations) -> torch.Tensor:
        return (self.total + rms(outputs, self.tokens)).float()


class Hidden(Structure):
    name = "hidden"
    what = "hidden channels"
    order = 0
    per_block = False

    def units(self, g: Geometry) -> int:
        return g.hidden

    def count(self, g: Geometry, n: int) -> int:
        return nearest_width(g.hidden, n, g.heads)

    def fewest(self, g: Geometry) -> float:
        # Hidden channels go a multiple of the head count at a time, so the first rounding must pass half of it.
        return g.heads // 2 + 0.5

    def couple(self, c: Coupling, removed: list[Any]) -> None:
        """A hidden channel: a column of every input-side Linear and of the embeddings, a row of every output-side
        Linear and an entry of every norm."""
        p, idx = c.p, list(removed)
        unit = list(range(len(idx)))
        c.add(f"{p.embed}.weight", 1, idx, unit)
        c.add(f"{module_name(c.model, c.model.get_output_embeddings())}.weight", 1, idx, unit)
        c.add_module(p.final_norm, 0, idx, unit, bias=True)
        for i in range(c.g.layers):
            for lin in dict.fromkeys((p.q, p.k, p.v, *p.mlp_in)):  # a fused projection once
                c.add(f"{c.blk(i, lin)}.weight", 1, idx, unit)  # input side
            for lin in (p.o, p.mlp_out):
                c.add_module(c.blk(i, lin), 0, idx, unit, bias=True)  # output side, and its bias
            for norm in p.norms:
                c.add_module(c.blk(i, norm), 0, idx, unit, bias=True)

    def resize(self, model: nn.Module, removed: list[Any], g: Geometry, cfg: Any) -> Surgery:
        """``hidden_size`` shrinks; RMSNorm models are rescaled so that removing zero channels is exact."""
        d_new = g.hidden - len(removed)
        if d_new % g.heads:
            raise UserError(f"removing {len(removed)} hidden channels leaves {d_new}, not a multiple of the "
                            f"{g.heads} attention heads, which transformers' config validation requires")
        cfg.hidden_size = d_new
        out = Surgery()
        if _arch.arch_for(model.config.model_type).parts.rms_norm and removed:
            out.scale = rescale(model, g.hidden, d_new)
            # RMSNorm divides by sqrt(mean(x^2) + eps); the mean over d' channels is d/d' times larger, so eps
            # must grow by the same factor for the smaller model to compute exactly the same function.
            if getattr(cfg, "rms_norm_eps", None) is not None:
                cfg.rms_norm_eps = cfg.rms_norm_eps * g.hidden / d_new
        return out

    def scorer(self, g: Geometry, parts: _arch.Parts, tokens: int, device: str) -> _RMSAtBoundaries:
        return _RMSAtBoundaries(g, tokens)


KIND = Hidden()
