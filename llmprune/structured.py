"""Structured removal: hidden channels, attention heads (whole KV groups), MLP channels, whole decoder blocks, and
the routed experts of mixture-of-experts blocks.

A ``Plan`` names the units to remove. ``slices`` turns it into the exact parameter slices that couple with those
units (read from the architecture table, ``arch.Parts``). Three verbs share the slices, so they always agree:

- ``zero``: the dense model with the units switched off (the DReSS "zeroed" model, and the direct-removal control);
- the DReSS penalty and shrink (``penalty.py``), which act on the same slices during training;
- ``remove``: a physically smaller model built from a *standard* config, so it loads with plain
  ``AutoModelForCausalLM.from_pretrained`` -- no custom code, no pickle.

Removing hidden channels that are exactly zero is exact for RMSNorm models once the kept norms' effective scales
are multiplied by ``sqrt(d / d')`` (the RMS over d' channels is that much larger than over d), ``rms_norm_eps`` by
``d / d'``, and -- Gemma -- the embedding by the same factor, as its ``sqrt(hidden_size)`` multiplier shrinks
(``_hidden_rescale``). LayerNorm models (OPT, Phi-2) are not exact: their mean and variance change with the width.

Removing experts cuts expert e out of the block's 3-D expert parameters and row e out of its router (a checkpoint
storing one tensor per expert has e's tensors dropped and the rest renumbered, as blocks are). It is exact for every
token that did not choose e when the router renormalises over its top-k (Mixtral, Qwen-MoE with
``norm_topk_prob``): the softmax over the chosen experts does not see the others. Without that renormalisation the
router's softmax runs over all experts, so removing one raises the weights of those that stay.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import units
from llmprune.errors import UserError

STRUCTURES = ("hidden", "heads", "mlp", "layers", "experts")
# A combination ("mlp+layers") removes its parts in this order. Each part's indices refer to the original model:
# hidden channels, KV groups, MLP channels and experts are independent index spaces, so removing one leaves the
# others' indices valid, and blocks go last, so the per-block lists still line up with the blocks.
ORDER = ("hidden", "heads", "mlp", "experts", "layers")


@dataclass
class Plan:
    """What to remove. ``removed`` is a list of channel / block indices for ``hidden`` and ``layers``, and one list
    per block (KV-group, MLP-channel or expert indices; empty for a block without experts) for ``heads``, ``mlp`` and
    ``experts``."""

    structure: str
    removed: list[Any]
    ratio: float = 0.0
    select: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"structure": self.structure, "ratio": self.ratio, "select": self.select, "removed": self.removed,
                **self.meta}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Plan":
        meta = {k: v for k, v in d.items() if k not in ("structure", "ratio", "select", "removed")}
        return cls(d["structure"], d["removed"], d.get("ratio", 0.0), d.get("select", ""), meta)

    @property
    def parts(self) -> list["Plan"]:
        """The single-structure plans of a combination, in removal order (``[self]`` for a single structure)."""
        if "+" not in self.structure:
            return [self]
        return sorted((Plan.from_json(d) for d in self.removed), key=lambda p: ORDER.index(p.structure))

    @property
    def n_units(self) -> int:
        if "+" in self.structure:
            return sum(p.n_units for p in self.parts)
        if self.structure in ("hidden", "layers"):
            return len(self.removed)
        return sum(len(r) for r in self.removed)


@dataclass
class Slice:
    """Positions ``index`` along ``dim`` of parameter ``param`` belong to removed units; ``unit[i]`` is the unit
    (channel, KV group or block) of ``index[i]``, which the group norms of the DReSS penalty need."""

    param: str
    dim: int
    index: torch.Tensor
    unit: torch.Tensor


@dataclass(frozen=True)
class Geometry:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    experts: int = 0  # routed experts per mixture-of-experts block (0: a dense model)

    @property
    def rep(self) -> int:  # query heads per KV group
        return self.heads // self.kv_heads


def geometry(model: nn.Module) -> Geometry:
    c = model.config
    parts = _arch.arch_for(c.model_type).parts
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    spec = _arch.arch_for(c.model_type).experts
    experts = int(getattr(c, spec.count, 0) or 0) if spec is not None else 0
    return Geometry(c.hidden_size, c.num_hidden_layers, heads, kv, head_dim, getattr(c, parts.mlp_width), experts)


def units_per_group(g: Geometry, structure: str) -> int:
    """How many units one ratio applies to: hidden channels, KV groups per block, MLP channels per block, blocks,
    routed experts per MoE block."""
    return {"hidden": g.hidden, "heads": g.kv_heads, "mlp": g.mlp, "layers": g.layers, "experts": g.experts}[structure]


def tail_units(g: Geometry, structure: str, n: int) -> list[int]:
    """The last ``n`` unit indices of ``structure``; for blocks, the last ones before the final block, which every
    model needs (``--select tail``, and any ``n`` units where only their number matters)."""
    total = units_per_group(g, structure)
    return list(range(total - 1 - n, total - 1)) if structure == "layers" else list(range(total - n, total))


def count_removed(g: Geometry, structure: str, ratio: float) -> int:
    """Units removed for ``ratio``; an error if none would be left."""
    if structure not in STRUCTURES:
        raise UserError(f"unknown structure '{structure}'; use one of: {', '.join(STRUCTURES)}")
    if not 0 <= ratio < 1:
        raise UserError(f"--ratio must be in [0, 1), got {ratio}")
    total = units_per_group(g, structure)
    n = math.floor(ratio * total + 0.5)  # half up: Python's round() would take 0.5 of 2 KV groups to 0
    if structure == "hidden":
        # transformers' config validation (LlamaConfig) wants hidden_size to stay a multiple of the number of
        # attention heads, even with an explicit head_dim: keep the nearest such width.
        n = total - g.heads * math.floor((total - n) / g.heads + 0.5)
    what = {"hidden": "hidden channels", "heads": "KV groups per block", "mlp": "MLP channels per block",
            "layers": "decoder blocks", "experts": "routed experts per MoE block"}[structure]
    if n >= total:
        raise UserError(f"--ratio {ratio} would leave no {what} (there are {total})")
    if n == 0 and ratio > 0:
        # e.g. heads on a multi-query model (one KV group): a step that removes nothing must not pass for a success.
        # Hidden channels go a multiple of the head count at a time, so the first rounding must pass half of it.
        smallest = ((g.heads // 2 + 0.5) if structure == "hidden" else 0.5) / total
        raise UserError(f"--ratio {ratio} removes none of the {total} {what}; "
                        + (f"the smallest ratio that removes any is {math.ceil(smallest * 1e4) / 1e4:g}"
                           if count_removed_or_none(g, structure, math.ceil(smallest * 1e4) / 1e4) else
                           "none can be removed"))
    return n


def count_removed_or_none(g: Geometry, structure: str, ratio: float) -> int | None:
    """``count_removed``, or None where that ratio is refused."""
    try:
        return count_removed(g, structure, ratio)
    except UserError:
        return None


def split_structures(structure: str) -> list[str]:
    """``"mlp+layers"`` -> ``["mlp", "layers"]``, each known and none twice."""
    names = structure.split("+")
    bad = [n for n in names if n not in STRUCTURES]
    if bad or len(set(names)) != len(names):
        raise UserError(f"--structure {structure}: use one of {', '.join(STRUCTURES)}, or several joined by '+' "
                        "(each once)")
    return names


def check_supported(model: nn.Module, structure: str) -> None:
    if "+" in structure:
        for part in split_structures(structure):
            check_supported(model, part)
        return
    a = _arch.arch_for(model.config.model_type)
    reason = dict(a.parts.cannot).get(structure)
    if structure == "experts" and a.experts is None:
        reason = "it has no mixture-of-experts blocks"
    if reason:
        raise UserError(f"--structure {structure} is not possible for {model.config.model_type}: {reason}")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def slices(model: nn.Module, plan: Plan) -> list[Slice]:
    """Every parameter slice that belongs to the plan's units. Tied parameters appear under each of their names.
    A combination's parts are numbered one after the other (unit ids stay distinct for the group norms)."""
    if "+" in plan.structure:
        out, offset = [], 0
        for part in plan.parts:
            got = slices(model, part)
            out += [Slice(sl.param, sl.dim, sl.index, sl.unit + offset) for sl in got]
            offset += max((int(sl.unit.max()) + 1 for sl in got), default=0)
        return out
    a = _arch.arch_for(model.config.model_type)
    p = a.parts
    g = geometry(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    out: list[Slice] = []

    def add(name: str, dim: int, index: list[int], unit: list[int]) -> None:
        if name in params and index:
            out.append(Slice(name, dim, torch.tensor(index, dtype=torch.long), torch.tensor(unit, dtype=torch.long)))

    def add_module(mod: str, dim: int, index: list[int], unit: list[int], bias: bool) -> None:
        add(f"{mod}.weight", dim, index, unit)
        if bias:
            add(f"{mod}.bias", 0, index, unit)

    blk = lambda i, name: f"{a.layers}.{i}.{name}"  # noqa: E731
    s = plan.structure
    if s == "hidden":
        idx = list(plan.removed)
        unit = list(range(len(idx)))
        add(f"{p.embed}.weight", 1, idx, unit)
        add(f"{_module_name(model, model.get_output_embeddings())}.weight", 1, idx, unit)
        add_module(p.final_norm, 0, idx, unit, bias=True)
        for i in range(g.layers):
            for lin in dict.fromkeys((p.q, p.k, p.v, *p.mlp_in)):  # a fused projection once
                add(f"{blk(i, lin)}.weight", 1, idx, unit)  # input side
            for lin in (p.o, p.mlp_out):
                add_module(blk(i, lin), 0, idx, unit, bias=True)  # output side, and its bias
            for norm in p.norms:
                add_module(blk(i, norm), 0, idx, unit, bias=True)
    elif s == "heads":
        u = 0
        for i, groups in enumerate(plan.removed):
            q_rows, kv_rows, q_unit, kv_unit = [], [], [], []
            for grp in groups:
                for h in range(grp * g.rep, (grp + 1) * g.rep):
                    q_rows += range(h * g.head_dim, (h + 1) * g.head_dim)
                    q_unit += [u] * g.head_dim
                kv_rows += range(grp * g.head_dim, (grp + 1) * g.head_dim)
                kv_unit += [u] * g.head_dim
                u += 1
            if p.qkv_fused:  # rows [q (heads x head_dim); k (kv x head_dim); v (kv x head_dim)]
                k_at, v_at = g.heads * g.head_dim, (g.heads + g.kv_heads) * g.head_dim
                add_module(blk(i, p.q), 0, q_rows + [k_at + r for r in kv_rows] + [v_at + r for r in kv_rows],
                           q_unit + kv_unit + kv_unit, bias=True)
            else:
                add_module(blk(i, p.q), 0, q_rows, q_unit, bias=True)
                add_module(blk(i, p.k), 0, kv_rows, kv_unit, bias=True)
                add_module(blk(i, p.v), 0, kv_rows, kv_unit, bias=True)
            add(f"{blk(i, p.o)}.weight", 1, q_rows, q_unit)
    elif s == "mlp":
        u = 0
        for i, chans in enumerate(plan.removed):
            unit = list(range(u, u + len(chans)))
            u += len(chans)
            if p.mlp_in_fused:  # rows [gate (mlp); up (mlp)]
                add_module(blk(i, p.mlp_in[0]), 0, list(chans) + [g.mlp + c for c in chans], unit + unit, bias=True)
            for lin in () if p.mlp_in_fused else p.mlp_in:
                add_module(blk(i, lin), 0, list(chans), unit, bias=True)
            add(f"{blk(i, p.mlp_out)}.weight", 1, list(chans), unit)
    elif s == "experts":
        # Expert e is row e of both 3-D parameters and of the router: they go together.
        spec = a.experts
        u = 0
        for i, experts in enumerate(plan.removed):
            unit = list(range(u, u + len(experts)))
            u += len(experts)
            for param, _ in spec.params:
                add(f"{blk(i, spec.path)}.{param}", 0, list(experts), unit)
            add_module(blk(i, spec.router), 0, list(experts), unit, bias=True)
    elif s == "layers":
        # A block whose two output projections are zero adds nothing to the residual stream: it is the identity.
        for u, i in enumerate(plan.removed):
            for lin in (p.o, p.mlp_out):
                name = blk(i, lin)
                rows = params[f"{name}.weight"].shape[0]
                add_module(name, 0, list(range(rows)), [u] * rows, bias=True)
    else:
        raise UserError(f"unknown structure '{s}'; use one of: {', '.join(STRUCTURES)}")
    return out


@torch.no_grad()
def zero(model: nn.Module, plan: Plan) -> None:
    """Switch the plan's units off in place (the dense model with the removed parts at zero)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for sl in slices(model, plan):
        params[sl.param].data.index_fill_(sl.dim, sl.index, 0)


def _keep(size: int, removed: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[removed] = False
    return mask.nonzero().squeeze(1)


@dataclass
class Removal:
    """What removing a plan's units does, tensor by tensor: the new ``config``, and for each tensor of the old model
    its new name (blocks renumbered; ``None`` for a tensor that goes) and its new value (the kept slices, RMSNorm
    weights and scaled embeddings rescaled). The same object serves a model in memory (``remove``) and one streamed from its shards
    (``remove_streamed``), so both give the same tensors."""

    config: Any
    cuts: dict[str, list[Slice]]  # parameter name -> the slices of it that go
    scale: dict[str, tuple[float, float]]  # parameter name -> (a, b): its kept values v become a * v + b
    gone: set[int]  # removed blocks
    renumber: dict[int, int]  # old block index -> new, for blocks that stay
    prefix: str  # dotted path of the blocks, with a trailing dot
    # Removed experts, for checkpoints that keep one tensor per expert (``{disk_path}.{e}.{source}.weight``):
    # block -> {old expert index: new one, or None for one that goes}, and the disk path inside a block.
    experts: dict[int, dict[int, int | None]] = field(default_factory=dict)
    expert_disk: str = ""

    def rename(self, name: str) -> str | None:
        if not name.startswith(self.prefix) or not (self.gone or self.experts):
            return name
        i, rest = name[len(self.prefix):].split(".", 1)
        if self.experts:
            table = self.experts.get(int(i))
            head = self.expert_disk + "."
            if table and rest.startswith(head) and rest[len(head):].split(".", 1)[0].isdigit():
                e, tail = rest[len(head):].split(".", 1)
                new = table[int(e)]
                return None if new is None else f"{self.prefix}{i}.{head}{new}.{tail}"
            return name
        return None if int(i) in self.gone else f"{self.prefix}{self.renumber[int(i)]}.{rest}"

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        out = list(shape)
        for sl in self.cuts.get(name, ()):
            out[sl.dim] -= len(sl.index)
        return tuple(out)

    def apply(self, name: str, t: torch.Tensor) -> torch.Tensor:
        for sl in self.cuts.get(name, ()):
            t = t.index_select(sl.dim, _keep(t.shape[sl.dim], sl.index).to(t.device)).clone()
        if name in self.scale:
            a, b = self.scale[name]
            t = t * a + b if b else t * a
        return t


def removal(model: nn.Module, plan: Plan) -> Removal:
    """The ``Removal`` of ``plan`` from ``model`` (which may be a skeleton: only names, shapes and the config are
    read)."""
    check_supported(model, plan.structure)
    a = _arch.arch_for(model.config.model_type)
    g = geometry(model)
    cfg = copy.deepcopy(model.config)
    s = plan.structure
    cuts: dict[str, list[Slice]] = {}
    scale: dict[str, tuple[float, float]] = {}
    gone: set[int] = set()
    renumber: dict[int, int] = {}
    experts: dict[int, dict[int, int | None]] = {}
    if s == "layers":
        gone = set(plan.removed)
        keep = [i for i in range(g.layers) if i not in gone]
        renumber = {old: new for new, old in enumerate(keep)}
        cfg.num_hidden_layers = len(keep)
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [cfg.layer_types[i] for i in keep]
    else:
        for sl in slices(model, plan):
            cuts.setdefault(sl.param, []).append(sl)
            for ours, theirs in a.renames:  # the same tensor under a checkpoint's own name (Mixtral's router)
                if ours in sl.param:
                    cuts.setdefault(sl.param.replace(ours, theirs), []).append(sl)
        cfg.head_dim = g.head_dim  # the attention width is no longer hidden_size // heads in general
        if s == "hidden":
            d_new = g.hidden - len(plan.removed)
            if d_new % g.heads:
                raise UserError(f"removing {len(plan.removed)} hidden channels leaves {d_new}, not a multiple of the "
                                f"{g.heads} attention heads, which transformers' config validation requires")
            cfg.hidden_size = d_new
            if a.parts.rms_norm and plan.removed:
                scale = _hidden_rescale(model, g.hidden, d_new)
                # RMSNorm divides by sqrt(mean(x^2) + eps); the mean over d' channels is d/d' times larger, so eps
                # must grow by the same factor for the smaller model to compute exactly the same function.
                if getattr(cfg, "rms_norm_eps", None) is not None:
                    cfg.rms_norm_eps = cfg.rms_norm_eps * g.hidden / d_new
        elif s == "heads":
            r = len(plan.removed[0]) if plan.removed else 0
            if any(len(x) != r for x in plan.removed):
                raise UserError("a standard config needs the same number of KV groups removed in every block")
            cfg.num_attention_heads = g.heads - r * g.rep
            cfg.num_key_value_heads = g.kv_heads - r
        elif s == "mlp":
            r = len(plan.removed[0]) if plan.removed else 0
            if any(len(x) != r for x in plan.removed):
                raise UserError("a standard config needs the same number of MLP channels removed in every block")
            setattr(cfg, a.parts.mlp_width, g.mlp - r)
        elif s == "experts":
            counts = {len(x) for x, block in zip(plan.removed, _arch.blocks(model))
                      if _arch.get_module(block, a.experts.path) is not None}
            if len(counts) > 1:
                raise UserError("a standard config needs the same number of experts removed in every MoE block")
            r = counts.pop() if counts else 0
            if g.experts - r < getattr(cfg, "num_experts_per_tok", 1):
                raise UserError(f"removing {r} of {g.experts} experts leaves fewer than the {cfg.num_experts_per_tok} "
                                "each token is routed to")
            setattr(cfg, a.experts.count, g.experts - r)
            for i, gone_e in enumerate(plan.removed):
                if gone_e:
                    kept = [e for e in range(g.experts) if e not in set(gone_e)]
                    experts[i] = {e: (kept.index(e) if e in kept else None) for e in range(g.experts)}
    return Removal(cfg, cuts, scale, gone, renumber, a.layers + ".", experts,
                   a.experts.disk_path if a.experts is not None else "")


def _hidden_rescale(model: nn.Module, d: int, d_new: int) -> dict[str, tuple[float, float]]:
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
            out[f"{_module_name(model, model.get_output_embeddings())}.weight"] = (emb, 0.0)
    return {k: v for k, v in out.items() if v != (1.0, 0.0)}


def _no_init_weights():
    """transformers' context that skips weight initialisation (its home moved in 5.x), or a no-op."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            import contextlib

            return contextlib.nullcontext()
    return no_init_weights()


@torch.no_grad()
def remove(model: nn.Module, plan: Plan) -> nn.Module:
    """A new, physically smaller model without the plan's units, built from a standard config."""
    from transformers import AutoModelForCausalLM

    if "+" in plan.structure:
        for part in plan.parts:
            model = remove(model, part)
        return model
    r = removal(model, plan)
    sd = {}
    for key, t in model.state_dict().items():
        new_key = r.rename(key)
        if new_key is not None:
            sd[new_key] = r.apply(key, t)
    first = next(model.parameters())
    # Built where the model is, without the random initialisation that every tensor loaded next overwrites (the
    # bulk of the cost of each candidate the budget search and a DReSS measurement remove); the check below
    # proves nothing is left unloaded.
    with torch.device(first.device), _no_init_weights():
        new = AutoModelForCausalLM.from_config(r.config, dtype=first.dtype)
    missing, unexpected = new.load_state_dict(sd, strict=False)
    # Tied output embeddings may be absent from either side; anything else is a bug in the slicing table.
    missing = [k for k in missing if k not in _tied_names(new)]
    unexpected = [k for k in unexpected if k not in _tied_names(model)]
    if missing or unexpected:
        raise RuntimeError(f"structured removal left tensors unmatched: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if getattr(r.config, "tie_word_embeddings", False):
        new.tie_weights()
    return new.eval()


@torch.no_grad()
def remove_streamed(lazy, plan: Plan, out, max_shard_size: str) -> Any:
    """``remove`` for a model in its shards (``lazy.Lazy``): each tensor is read, cut and written in turn, so the
    peak is one tensor; the shards follow ``--max-shard-size``. Writes the new config; returns the new model's
    skeleton (checked to be covered exactly by what was written) and the exact zeros of its prunable Linears
    (``evaluate.block_zeros`` counts, for its summary)."""
    from transformers.utils.hub import convert_file_size_to_int

    from llmprune import report
    from llmprune.lazy import Lazy
    from llmprune.shards import Planned, ShardWriter, plan_shards, shard_names

    if "+" in plan.structure:  # one part at a time, each from the previous part's shards
        import shutil

        parts, source, tmp = plan.parts, lazy, []
        try:
            for k, part in enumerate(parts):
                last = k == len(parts) - 1
                dest = out if last else out.with_name(f"{out.name}.part{k}")
                small, counts = remove_streamed(source, part, dest, max_shard_size)
                if not last:
                    tmp.append(dest)
                    source = Lazy(dest, error=RuntimeError)
            return small, counts
        finally:
            for d in tmp:
                shutil.rmtree(d, ignore_errors=True)
    r = removal(lazy.model, plan)
    entries = lazy.shards.entries
    order = [(n, r.rename(n)) for n in lazy.order()]
    order = [(old, new) for old, new in order if new is not None]
    planned = [Planned(new, entries[old].dtype, r.shape(old, entries[old].shape)) for old, new in order]
    size = convert_file_size_to_int(int(max_shard_size) if max_shard_size.isdigit() else max_shard_size)
    shards = plan_shards(planned, size)
    writer = ShardWriter(out, dict(zip(shard_names(len(shards)), shards)))
    zeros: dict[str, tuple[int, int]] = {}
    try:
        with report.progress(f"removing {plan.structure}", total=len(order)) as advance:
            for old, new in order:
                t = r.apply(old, lazy.shards.get(old))
                zeros[new] = (int((t == 0).sum()), t.numel())
                if t.dim() == 3:  # a 3-D expert parameter stored whole: its experts are counted one by one
                    for e in range(t.shape[0]):
                        zeros[f"{new}[{e}]"] = (int((t[e] == 0).sum()), t[e].numel())
                writer.put(new, t)
                advance()
        writer.close()
    finally:
        writer.abort()
    r.config.save_pretrained(out)
    small = Lazy(out, error=RuntimeError)  # a tensor the table missed is a bug, never a model with random weights
    prefix = r.prefix
    counts = {}
    for name in sorted(units.linear_weight_names(small.model)):
        i, rest = name[len(prefix):].split(".", 1)
        if name in small.parts:  # a 3-D expert parameter stored one tensor per expert and source
            for e, sources in enumerate(small.parts[name]):
                counts[f"{i}.{rest}[{e}]"] = tuple(map(sum, zip(*(zeros[k] for k in sources))))
        elif name.endswith(".weight"):
            counts[f"{i}.{rest.removesuffix('.weight')}"] = zeros[name]
        else:
            for e in range(small.model.get_parameter(name).shape[0]):
                counts[f"{i}.{rest}[{e}]"] = zeros[f"{name}[{e}]"]
    return small.model, counts


def _tied_names(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {f"{_module_name(model, model.get_output_embeddings())}.weight"}

