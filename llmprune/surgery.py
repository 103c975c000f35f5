"""The surgery of structured removal: a physically smaller model, built from a *standard* config, so it loads with
plain ``AutoModelForCausalLM.from_pretrained`` -- no custom code, no pickle. ``structured.slices`` says which slices
couple with the units a ``Plan`` removes; this module cuts them out, in memory (``remove``) or shard by shard
(``remove_streamed``), and says what the smaller config is (``removal``, from the kind's ``Structure.resize``).

When removal is exact is each kind's: hidden channels need the RMSNorm rescale of ``structures/hidden.py`` (LayerNorm
models are not exact), experts a router that renormalises over its top-k (``structures/experts.py``); KV groups,
MLP channels and blocks at exactly zero are removed exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import units
from llmprune.structured import Plan, Slice, check_supported, geometry, kind, module_name, slices


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
    read): the slices of its units cut out, and its kind's ``resize`` of the config."""
    check_supported(model, plan.structure)
    a = _arch.arch_for(model.config.model_type)
    g = geometry(model)
    cfg = copy.deepcopy(model.config)
    k = kind(plan.structure)
    cuts: dict[str, list[Slice]] = {}
    if not k.drops_blocks:
        for sl in slices(model, plan):
            cuts.setdefault(sl.param, []).append(sl)
            for ours, theirs in a.renames:  # the same tensor under a checkpoint's own name (Mixtral's router)
                if ours in sl.param:
                    cuts.setdefault(sl.param.replace(ours, theirs), []).append(sl)
        cfg.head_dim = g.head_dim  # the attention width is no longer hidden_size // heads in general
    done = k.resize(model, plan.removed, g, cfg)
    return Removal(cfg, cuts, done.scale, done.gone, done.renumber, a.layers + ".", done.experts,
                   a.experts.disk_path if a.experts is not None else "")


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
