"""The surgery of structured removal: a physically smaller model, built from a *standard* config, so it loads with
plain ``AutoModelForCausalLM.from_pretrained`` -- no custom code, no pickle. ``structured.slices`` says which slices
couple with the units a ``Plan`` removes; this module cuts them out, in memory (``remove``) or shard by shard
(``remove_streamed``), and says what the smaller config is (``removal``).

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
from llmprune.structured import Plan, Slice, check_supported, geometry, module_name, slices


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
            out[f"{module_name(model, model.get_output_embeddings())}.weight"] = (emb, 0.0)
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
    return {f"{module_name(model, model.get_output_embeddings())}.weight"}
