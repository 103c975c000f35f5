"""``layers``: whole decoder blocks (docs/methods.md, sections 8.2-8.4). A block at zero is the identity, so
removing it is exact."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import engine
from llmprune.structures.base import Coupling, Geometry, Structure, Surgery


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """ShortGPT's block influence (Men et al. 2024, eq. 1): ``1 - mean_t cos(x_in_t, x_out_t)``. A block that
    barely turns the residual stream is the cheapest to remove."""
    cos = torch.nn.functional.cosine_similarity(x_in.float().flatten(0, -2), x_out.float().flatten(0, -2), dim=-1)
    return 1.0 - cos.mean().item()


def influence(a: engine.Activations, b: engine.Activations) -> float:
    """``block_influence`` from the inputs ``a`` to the outputs ``b`` of a block, averaged over the chunks."""
    vals = [block_influence(x, y) for x, y in zip(a.hidden, b.hidden)]
    return sum(vals) / len(vals)


class _Influence:
    """Each block's influence: its inputs against the next block's inputs (the last block: the walk's outputs)."""

    def __init__(self):
        self.values: list[float] = []
        self.prev: engine.Activations | None = None

    def block(self, block: nn.Module, inputs: engine.Activations) -> None:
        if self.prev is not None:
            self.values.append(influence(self.prev, inputs))
        self.prev = inputs

    def result(self, outputs: engine.Activations) -> torch.Tensor:
        self.values.append(influence(self.prev, outputs))
        return torch.tensor(self.values)


class Layers(Structure):
    name = "layers"
    what = "decoder blocks"
    order = 4  # last: the per-block lists of the parts removed before still line up with the blocks
    per_block = False
    drops_blocks = True

    def units(self, g: Geometry) -> int:
        return g.layers

    def tail(self, g: Geometry, n: int) -> list[int]:
        """The last ``n`` blocks before the final block, which every model needs."""
        return list(range(g.layers - 1 - n, g.layers - 1))

    def couple(self, c: Coupling, removed: list[Any]) -> None:
        """A block whose output projections are zero adds nothing to the residual stream: it is the identity. Those
        of its token mixer and its MLP -- or, in a mixture-of-experts block, every routed expert's down projection
        (and its bias) and the shared experts'."""
        spec = c.a.experts
        shared = spec.shared_out if spec is not None else ()
        for u, i in enumerate(removed):
            for lin in (c.p.o, *c.p.mixer_outs, c.p.mlp_out, *shared):
                name = c.blk(i, lin)
                if f"{name}.weight" not in c.params:  # a part this block does not hold (Qwen3.5: one of two mixers)
                    continue
                rows = c.params[f"{name}.weight"].shape[0]
                c.add_module(name, 0, list(range(rows)), [u] * rows, bias=True)
            if spec is not None:  # every expert of the block (dim 0 of its 3-D down projection), its bias too
                down = spec.params[-1][0]
                for param in (down, *(b for p, b in spec.biases if p == down)):
                    name = f"{c.blk(i, spec.path)}.{param}"
                    if name in c.params:  # a dense block of an MoE model has none
                        n = c.params[name].shape[0]
                        c.add(name, 0, list(range(n)), [u] * n)

    def keep_one(self, config: Any) -> tuple[set[int], str] | None:
        """A hybrid model keeps a full-attention block: transformers' Qwen3.5 cannot run on linear-attention blocks
        alone (its cache has no attention layer to size the mask by), and such a model has lost its only attention
        over the whole context."""
        types = list(getattr(config, "layer_types", None) or [])
        full = {i for i, t in enumerate(types) if t == "full_attention"}
        if full and any(t == "linear_attention" for t in types):
            return full, "a hybrid model must keep at least one full-attention block"
        return None

    def missing(self, a: _arch.Arch, config: Any) -> str | None:
        period = getattr(config, a.layer_period, None) if a.layer_period else None
        if period not in (None, 0, 1):
            return (f"its sparse blocks recur with a period of {period} blocks ({a.layer_period}), a pattern that "
                    "removing blocks would shift")
        return None

    def resize(self, model: nn.Module, removed: list[Any], g: Geometry, cfg: Any) -> Surgery:
        """``num_hidden_layers`` shrinks, the blocks that stay are renumbered and the config's per-block lists
        (``Arch.per_layer``: ``layer_types``, SmolLM3's ``no_rope_layers``) keep the survivors' entries; lists of
        block indices (``Arch.layer_indices``) keep the survivors', renumbered, and counts of leading blocks
        (``Arch.leading_blocks``) the survivors among them."""
        a = _arch.arch_for(model.config.model_type)
        gone = set(removed)
        keep = [i for i in range(g.layers) if i not in gone]
        new = {old: n for n, old in enumerate(keep)}
        cfg.num_hidden_layers = len(keep)
        for key in a.per_layer:
            if getattr(cfg, key, None):
                setattr(cfg, key, [getattr(cfg, key)[i] for i in keep])
        for key in a.layer_indices:
            if getattr(cfg, key, None) is not None:
                setattr(cfg, key, [new[i] for i in getattr(cfg, key) if i in new])
        for key in a.leading_blocks:
            if getattr(cfg, key, None) is not None:
                setattr(cfg, key, sum(1 for i in keep if i < getattr(cfg, key)))
        return Surgery(gone=gone, renumber=new)

    def scorer(self, g: Geometry, parts: _arch.Parts, tokens: int, device: str) -> _Influence:
        return _Influence()


KIND = Layers()
