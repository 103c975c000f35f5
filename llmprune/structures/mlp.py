"""``mlp``: MLP intermediate channels, per block (docs/methods.md, sections 8.2-8.4). Removing a channel at exactly
zero is exact."""

from __future__ import annotations

from typing import Any

from torch import nn

from llmprune import arch as _arch
from llmprune.structures.base import Contribution, Coupling, Geometry, Structure, Surgery, same_count


class MLP(Structure):
    name = "mlp"
    what = "MLP channels per block"
    order = 2
    per_block = True

    def units(self, g: Geometry) -> int:
        return g.mlp

    def couple(self, c: Coupling, removed: list[Any]) -> None:
        """An MLP channel: a row of the gate and up projections, a column of the down projection."""
        p, u = c.p, 0
        for i, chans in enumerate(removed):
            unit = list(range(u, u + len(chans)))
            u += len(chans)
            if p.mlp_in_fused:  # rows [gate (mlp); up (mlp)]
                c.add_module(c.blk(i, p.mlp_in[0]), 0, list(chans) + [c.g.mlp + ch for ch in chans], unit + unit,
                             bias=True)
            for lin in () if p.mlp_in_fused else p.mlp_in:
                c.add_module(c.blk(i, lin), 0, list(chans), unit, bias=True)
            c.add(f"{c.blk(i, p.mlp_out)}.weight", 1, list(chans), unit)

    def resize(self, model: nn.Module, removed: list[Any], g: Geometry, cfg: Any) -> Surgery:
        """The MLP width key (``arch.Parts.mlp_width``) shrinks."""
        r = same_count([len(x) for x in removed], "MLP channels")
        setattr(cfg, _arch.arch_for(model.config.model_type).parts.mlp_width, g.mlp - r)
        return Surgery()

    def scorer(self, g: Geometry, parts: _arch.Parts, tokens: int, device: str) -> Contribution:
        """What the down projection's input columns add to the residual stream."""
        return Contribution(parts.mlp_out, device)


KIND = MLP()
