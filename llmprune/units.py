"""A block's prunable units: every weight a method may zero, as a Linear -- an ``nn.Linear``, or one expert's slice of
a 3-D expert parameter (``llmprune.experts``) -- and the names they have in the model.

``arch.py`` is the table (where the blocks are, what is never pruned, where the experts live); this module reads a
block through it.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune import experts, sharding
from llmprune.arch import arch_for, arch_of_block, blocks, get_module


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The prunable weights of one block, by their name inside it, each as a Linear.

    An ``nn.Linear`` (``self_attn.q_proj``; a fused one, ``self_attn.qkv_proj``, is one weight), or one expert's
    slice of a 3-D expert parameter (``mlp.experts.gate_up_proj[3]``: a Linear whose weight is a view of that
    slice, so pruning it prunes the parameter). Routers and shared-expert gates (``never_prune``) are not in it.
    """
    a = arch_of_block(block)
    skip = tuple(a.never_prune) + ((a.experts.path,) if a.experts else ())
    out = {name: m for name, m in block.named_modules()
           if isinstance(m, nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip)}
    if a.experts is not None:
        out.update(experts.views(block, a.experts))
    return out


def described(block: nn.Module) -> set[str]:
    """Names (inside the block) of the parameters the table describes: prunable weights and their biases, the expert
    parameters, and the never-pruned modules' weights. Vectors (norms, biases) need no description."""
    a = arch_of_block(block)
    names = {f"{n}.{attr}" for n, m in block.named_modules() if isinstance(m, nn.Linear) for attr in ("weight", "bias")}
    for mod in a.never_prune:
        names |= {f"{mod}.{attr}" for attr, _ in (get_module(block, mod) or nn.Module()).named_parameters()}
    if a.experts is not None:
        names |= {f"{a.experts.path}.{p}" for p, _ in a.experts.params}
        names |= {f"{a.experts.path}.{b}" for _, b in a.experts.biases}
    return names


def undescribed(block: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """The block's parameters of two or more dimensions that the table does not describe: weights llmprune would not
    know how to prune, or what their input is -- a block holding one is refused, never pruned halfway."""
    known = described(block)
    return [(n, tuple(p.shape)) for n, p in block.named_parameters() if p.dim() >= 2 and n not in known]


def weight_of(model: nn.Module, name: str):
    """The weight tensor of a prunable weight's full name: a Linear's (``model.layers.0.self_attn.q_proj``) or one
    expert's slice of a 3-D parameter (``model.layers.0.mlp.experts.gate_up_proj[3]``, a view of it)."""
    if name.endswith("]"):
        base, _, e = name[:-1].rpartition("[")
        return experts.expert_weight(model.get_parameter(base).data, int(e), arch_for(model.config.model_type).experts)
    return model.get_submodule(name).weight


def linear_weight_names(model: nn.Module) -> set[str]:
    """Full names (as the model names them) of every parameter holding prunable weights, in every block: each
    Linear's weight, and each 3-D expert parameter."""
    a = arch_for(model.config.model_type)
    names = set()
    for i, block in enumerate(blocks(model)):
        for name in block_linears(block):
            base, _, rest = name.partition("[")
            names.add(f"{a.layers}.{i}.{base}" if rest else f"{a.layers}.{i}.{name}.weight")
    return names


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The zero pattern of every block Linear that has one (a pruned weight), by the Linear's full name."""
    masks = {}
    layers = arch_for(model.config.model_type).layers
    for i, block in enumerate(blocks(model)):
        for name, lin in block_linears(block).items():
            zeros = lin.weight.detach() == 0
            if zeros.any():
                masks[f"{layers}.{i}.{name}"] = zeros
    return masks


@torch.no_grad()
def reapply(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Zero the recorded pattern again; returns how many weights the merge had made non-zero."""
    changed = 0
    for name, mask in masks.items():
        w, start = sharding.local(weight_of(model, name))  # under FSDP: this process's rows of the weight
        # the masks are taken on the CPU; accelerate may have moved the model since
        mask = mask[start:start + w.shape[0]].to(w.device)
        changed += int((w[mask] != 0).sum())
        w.masked_fill_(mask, 0)
    return changed
