"""``experts``: the routed experts of mixture-of-experts blocks, per block (docs/methods.md, sections 8.2, 8.3 and
8.8).

Removing experts cuts expert e out of the block's 3-D expert parameters and row e out of its router (a checkpoint
storing one tensor per expert has e's tensors dropped and the rest renumbered, as blocks are). It is exact for every
token that did not choose e when the router renormalises over its top-k (Mixtral, Qwen-MoE with
``norm_topk_prob``): the softmax over the chosen experts does not see the others. Without that renormalisation the
router's softmax runs over all experts, so removing one raises the weights of those that stay.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune.errors import UserError
from llmprune.reap import expert_stats
from llmprune.structures.base import COMMON_SELECTS, Coupling, Geometry, Structure, Surgery, same_count


def moe_blocks(model: nn.Module) -> list[bool]:
    """Which blocks have routed experts (Qwen3-MoE's ``mlp_only_layers`` are dense)."""
    spec = _arch.arch_for(model.config.model_type).experts
    return [_arch.get_module(b, spec.path) is not None for b in _arch.blocks(model)]


def renumbered(total: int, gone: list[int]) -> dict[int, int | None]:
    """Old expert index -> new one, or None for one that goes (the kept experts keep their order)."""
    kept = [e for e in range(total) if e not in set(gone)]
    return {e: (kept.index(e) if e in kept else None) for e in range(total)}


class Experts(Structure):
    name = "experts"
    what = "routed experts per MoE block"
    order = 3
    per_block = True
    own_selects = ("reap", "frequency")  # Lasby et al. 2025, and the routing-frequency baseline (section 8.8)
    selects = COMMON_SELECTS + own_selects
    activation = "reap"  # --select activation means REAP for experts
    # A router row at zero still gives its expert a logit of 0, which can win the top-k: zeroing is not removing
    # here, so DReSS measures its gap on the model with the experts removed.
    zeroing_removes = False

    def units(self, g: Geometry) -> int:
        return g.experts

    def groups(self, g: Geometry) -> int:
        """A group-limited router (DeepSeek-V3: ``n_group`` contiguous groups of experts; a token chooses among the
        best ``topk_group`` groups, each scored by its two best experts) needs every group the same size: the same
        number of experts goes from each. Not exact then even for tokens that chose none of them -- a group's score
        can change -- so DReSS measures the gap on the model with the experts removed, as it does for every router."""
        return g.expert_groups

    def count(self, g: Geometry, n: int) -> int:
        return g.expert_groups * math.floor(n / g.expert_groups + 0.5)

    def fewest(self, g: Geometry) -> float:
        # ``count`` removes any once half a group's worth is asked for (rounded up), the request itself rounded half up
        return math.ceil(g.expert_groups / 2) - 0.5

    def tail(self, g: Geometry, n: int) -> list[int]:
        """The last ``n / groups`` experts of every group."""
        size, per = g.experts // g.expert_groups, n // g.expert_groups
        return sorted(grp * size + i for grp in range(g.expert_groups) for i in range(size - per, size))

    def removable(self, config: Any, total: int, n: int) -> bool:
        return self._why_not(config, total, n) is None

    @staticmethod
    def _why_not(config: Any, total: int, n: int) -> str | None:
        """Every token keeps the top-k experts it is routed to; a group-limited router keeps two experts per group
        (it scores a group by its two best), and top-k experts within the groups it chooses."""
        spec = _arch.arch_for(config.model_type).experts
        k, groups = getattr(config, spec.top_k, 1) if spec else 1, _arch.expert_groups(config)
        if total - n < k:
            return f"removing {n} of {total} experts leaves fewer than the {k} each token is routed to"
        per, chosen = (total - n) // groups, getattr(config, "topk_group", 1) or 1
        if groups > 1 and (per < 2 or per * chosen < k):
            return (f"removing {n} of {total} experts leaves {per} in each of its {groups} expert groups: its router "
                    f"scores a group by its two best experts and takes {k} from the {chosen} groups it chooses")
        return None

    def missing(self, a: _arch.Arch, config: Any) -> str | None:
        return "it has no mixture-of-experts blocks" if a.experts is None else None

    def where_present(self, model: nn.Module, removed: list[Any]) -> list[Any]:
        # dense blocks of an MoE model (Qwen3-MoE's mlp_only_layers) have none to remove
        return [r if m else [] for r, m in zip(removed, moe_blocks(model))]

    def couple(self, c: Coupling, removed: list[Any]) -> None:
        """An expert: row e of both 3-D parameters (and of their biases), and of the router, go together."""
        spec, u = c.a.experts, 0
        for i, experts in enumerate(removed):
            unit = list(range(u, u + len(experts)))
            u += len(experts)
            for param in [p for p, _ in spec.params] + [b for _, b in spec.biases]:
                c.add(f"{c.blk(i, spec.path)}.{param}", 0, list(experts), unit)
            for cut in spec.router_cuts:  # parameters or buffers (``Coupling.add`` takes both; absent ones none)
                c.add(f"{c.blk(i, spec.router)}.{cut}", 0, list(experts), unit)

    def resize(self, model: nn.Module, removed: list[Any], g: Geometry, cfg: Any) -> Surgery:
        """The routed-expert count (``arch.Experts.count``) shrinks; the experts per token (``top_k``) stay."""
        r = same_count([len(x) for x, moe in zip(removed, moe_blocks(model)) if moe], "experts", "MoE block")
        size = g.experts // g.expert_groups
        for x in removed:
            per = [sum(1 for e in x if e // size == grp) for grp in range(g.expert_groups)]
            if len(set(per)) > 1:
                raise UserError(f"its router chooses among {g.expert_groups} groups of {size} experts: the same "
                                f"number must go from every group (asked: {per})")
        if (why := self._why_not(cfg, g.experts, r)) is not None:
            raise UserError(why)
        setattr(cfg, _arch.arch_for(model.config.model_type).experts.count, g.experts - r)
        return Surgery(experts={i: renumbered(g.experts, gone) for i, gone in enumerate(removed) if gone})

    def measure(self, model: nn.Module, how: str, windows: torch.Tensor, device: str, batch_size: int,
                weights) -> tuple[list[torch.Tensor | None], dict[str, Any]]:
        """REAP (router weight x output norm) or routing frequency, from one walk (``reap.expert_stats``)."""
        st = expert_stats(model, windows, device, batch_size, weights)
        rows = st.reap() if how == "reap" else st.frequency()
        return list(rows), {"scores": [None if r is None else [round(float(v), 6) for v in r] for r in rows],
                            "tokens": [None if t is None else t.tolist() for t in st.tokens]}


KIND = Experts()
