"""``heads``: KV groups -- a key/value head with the query heads that read it -- per block (docs/methods.md,
sections 8.2-8.4). Removing a group at exactly zero is exact."""

from __future__ import annotations

from typing import Any

from torch import nn

from llmprune import arch as _arch
from llmprune.structures.base import Contribution, Coupling, Geometry, Structure, Surgery, same_count


class Heads(Structure):
    name = "heads"
    what = "KV groups per block"
    order = 1
    per_block = True

    def units(self, g: Geometry) -> int:
        return g.kv_heads

    def couple(self, c: Coupling, removed: list[Any]) -> None:
        """A KV group: its key and value rows, the rows of every query head that reads it, their columns of o, and
        their entries of any per-head vector (``Parts.head_vectors``: gpt-oss's sinks)."""
        p, g, u = c.p, c.g, 0
        for i, groups in enumerate(removed):
            q_rows, kv_rows, q_unit, kv_unit, heads, head_unit = [], [], [], [], [], []
            for grp in groups:
                for h in range(grp * g.rep, (grp + 1) * g.rep):
                    q_rows += range(h * g.head_dim, (h + 1) * g.head_dim)
                    q_unit += [u] * g.head_dim
                    heads.append(h)
                    head_unit.append(u)
                kv_rows += range(grp * g.head_dim, (grp + 1) * g.head_dim)
                kv_unit += [u] * g.head_dim
                u += 1
            if p.qkv_fused:  # rows [q (heads x head_dim); k (kv x head_dim); v (kv x head_dim)]
                k_at, v_at = g.heads * g.head_dim, (g.heads + g.kv_heads) * g.head_dim
                c.add_module(c.blk(i, p.q), 0, q_rows + [k_at + r for r in kv_rows] + [v_at + r for r in kv_rows],
                             q_unit + kv_unit + kv_unit, bias=True)
            else:
                c.add_module(c.blk(i, p.q), 0, q_rows, q_unit, bias=True)
                c.add_module(c.blk(i, p.k), 0, kv_rows, kv_unit, bias=True)
                c.add_module(c.blk(i, p.v), 0, kv_rows, kv_unit, bias=True)
            c.add(f"{c.blk(i, p.o)}.weight", 1, q_rows, q_unit)
            for vector in p.head_vectors:
                c.add(c.blk(i, vector), 0, heads, head_unit)

    def resize(self, model: nn.Module, removed: list[Any], g: Geometry, cfg: Any) -> Surgery:
        """``num_attention_heads`` and ``num_key_value_heads`` shrink (the KV cache too)."""
        r = same_count([len(x) for x in removed], "KV groups")
        cfg.num_attention_heads = g.heads - r * g.rep
        cfg.num_key_value_heads = g.kv_heads - r
        return Surgery()

    def scorer(self, g: Geometry, parts: _arch.Parts, tokens: int, device: str) -> Contribution:
        """What o_proj's input columns add to the residual stream, summed per head, then per KV group."""
        def fold(c):  # columns -> heads -> KV groups
            return c.view(g.heads, g.head_dim).sum(1).view(g.kv_heads, g.rep).sum(1)

        return Contribution(parts.o, device, fold)


KIND = Heads()
