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
        """A block whose two output projections are zero adds nothing to the residual stream: it is the
        identity."""
        for u, i in enumerate(removed):
            for lin in (c.p.o, *c.p.mixer_outs, c.p.mlp_out):
                name = c.blk(i, lin)
                if f"{name}.weight" not in c.params:  # a mixer this block does not hold (Qwen3.5: one of two)
                    continue
                rows = c.params[f"{name}.weight"].shape[0]
                c.add_module(name, 0, list(range(rows)), [u] * rows, bias=True)

    def keep_one(self, config: Any) -> tuple[set[int], str] | None:
        """A hybrid model keeps a full-attention block: transformers' Qwen3.5 cannot run on linear-attention blocks
        alone (its cache has no attention layer to size the mask by), and such a model has lost its only attention
        over the whole context."""
        types = list(getattr(config, "layer_types", None) or [])
        full = {i for i, t in enumerate(types) if t == "full_attention"}
        if full and any(t == "linear_attention" for t in types):
            return full, "a hybrid model must keep at least one full-attention block"
        return None

    def resize(self, model: nn.Module, removed: list[Any], g: Geometry, cfg: Any) -> Surgery:
        """``num_hidden_layers`` shrinks, the blocks that stay are renumbered and the config's per-block lists
        (``Arch.per_layer``: ``layer_types``, SmolLM3's ``no_rope_layers``) keep the survivors' entries."""
        gone = set(removed)
        keep = [i for i in range(g.layers) if i not in gone]
        cfg.num_hidden_layers = len(keep)
        for key in _arch.arch_for(model.config.model_type).per_layer:
            if getattr(cfg, key, None):
                setattr(cfg, key, [getattr(cfg, key)[i] for i in keep])
        return Surgery(gone=gone, renumber={old: new for new, old in enumerate(keep)})

    def scorer(self, g: Geometry, parts: _arch.Parts, tokens: int, device: str) -> _Influence:
        return _Influence()


KIND = Layers()
