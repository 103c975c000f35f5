"""Mixture-of-experts weights as prunable units: one expert's 2-D slice of a 3-D parameter, seen as a Linear.

transformers 5 stores a block's routed experts as ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` and runs
them in one fused (grouped) kernel, so no per-expert module exists whose input a hook could see. Two things here make
every method work on them unchanged (docs/methods.md, "Mixture-of-experts"):

- ``views``: expert e's slice of each parameter as an ``nn.Linear`` whose weight *is* that slice (a view: pruning
  it prunes the parameter; transposed where the parameter is stored ``[E, in, out]``, as gpt-oss and Llama 4 store
  it), named ``mlp.experts.gate_up_proj[e]``. ``units.block_linears`` lists them with the
  block's ordinary Linears.
- ``routed``: for the duration of a pruning pass, the experts' forward is replaced by the same computation expert by
  expert through those views, so each view's hooks see exactly the tokens routed to its expert (and ``down_proj[e]``
  sees e's activation on them) and gradients reach them. The table's ``forward`` says which computation that is;
  ``tests/test_moe.py`` proves the replacement equal to the model's own forward.

An expert that receives no calibration token has no statistics: the methods fall back to magnitude for it and the
step reports how many did (``methods.base.BlockContext.fallback``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from llmprune.arch import Experts, arch_of_block, get_module

_ROUTED = "_llmprune_views"  # instance attribute of an experts module while ``routed``: its registered views
# Instance attribute of an experts module while ``routed``: ``{e: (token rows, router weights)}`` of its last forward,
# the rows it gave expert e and the weight the router gave e on each (``reap`` reads it).
ROUTING = "_llmprune_routing"


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return lin


def expert_weight(p: torch.Tensor, e: int, spec: Experts) -> torch.Tensor:
    """Expert e's weight in a Linear's orientation ``[out, in]``: a view of the 3-D parameter either way."""
    return p[e].t() if spec.transposed else p[e]


def views(block: nn.Module, spec: Experts) -> dict[str, nn.Linear]:
    """``{"mlp.experts.gate_up_proj[e]": Linear, ...}`` for every expert and parameter of the block (empty if the
    block has no experts module: Qwen3-MoE keeps dense MLP layers between sparse ones). Each Linear's weight (and
    bias, where the experts have biases) is a view of expert e's slice.

    Inside ``routed`` these are the registered views the pass runs through (the same objects for the hooks and the
    optimiser); outside, fresh views of the current parameters, kept by no one (a cache would keep a lazy model's
    unloaded tensors alive)."""
    mod = get_module(block, spec.path)
    if mod is None:
        return {}
    if _ROUTED in mod.__dict__:
        return mod.__dict__[_ROUTED]
    biases = dict(spec.biases)
    out = {}
    for e in range(getattr(mod, spec.params[0][0]).shape[0]):
        for name, _ in spec.params:
            p = getattr(mod, name)
            bias = getattr(mod, biases[name]).data[e] if name in biases else None
            out[f"{spec.path}.{name}[{e}]"] = _linear(expert_weight(p.data, e, spec), bias, p.requires_grad)
    return out


def expert_count(name: str) -> int | None:
    """The expert index of a view's name (``...gate_up_proj[3]`` -> 3), None for an ordinary Linear."""
    if not name.endswith("]"):
        return None
    return int(name[name.rindex("[") + 1 : -1])


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.data_ptr() != dst.data_ptr() or src.dtype != dst.dtype:
        dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


def write_back(block: nn.Module, spec: Experts) -> None:
    """Copy every view's weight (and bias) into its slice of the 3-D parameter. A no-op while they share memory;
    needed when a pass replaced a view's tensor (``block.float()`` for Wanda++'s regional optimisation, a method that
    assigns ``weight.data``)."""
    mod = get_module(block, spec.path)
    vs = mod.__dict__.get(_ROUTED) if mod is not None else None
    if vs is None:
        return
    biases = dict(spec.biases)
    with torch.no_grad():
        for name, lin in vs.items():
            base = name[: name.rindex("[")].rsplit(".", 1)[1]
            e = expert_count(name)
            _copy_into(expert_weight(getattr(mod, base).data, e, spec), lin.weight.data)
            if base in biases:
                _copy_into(getattr(mod, biases[base]).data[e], lin.bias.data)


def _routed_forward(mod: nn.Module, spec: Experts, views_by_expert: list[tuple[nn.Linear, nn.Linear]]):
    """The experts' computation expert by expert, through the views (the table's ``Experts.forward``): for each
    expert e and the tokens routed to it, ``w * down_e(gate(gate_up_e x))`` summed into the output, experts in
    increasing order (as transformers' own eager loop does, so the sums round alike). Each call records the routing
    it followed (``ROUTING``)."""
    if spec.forward == "clamped":
        gate = mod._apply_gate  # gpt-oss's own: interleaved, clamped, (up + 1) * gate * sigmoid(alpha * gate)
    else:
        def gate(gate_up: torch.Tensor) -> torch.Tensor:
            g, up = gate_up.chunk(2, dim=-1)
            return mod.act_fn(g) * up
    if spec.forward == "prescaled":
        return _prescaled_forward(mod, views_by_expert, gate)

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        routing = mod.__dict__[ROUTING] = {}
        for e, (gate_up, down) in enumerate(views_by_expert):
            token_idx, pos = torch.where(top_k_index == e)
            routing[e] = (token_idx, top_k_weights[token_idx, pos])
            if token_idx.numel() == 0:
                continue
            y = down(gate(gate_up(hidden_states[token_idx]))) * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    return forward


def _prescaled_forward(mod: nn.Module, views_by_expert: list[tuple[nn.Linear, nn.Linear]], gate):
    """Llama 4's experts: the input is every token once per expert ``[E * T, H]``, each row already multiplied by the
    router's score for that expert -- zero for a token the router did not choose (its top-k scores pass a sigmoid,
    the rest are sigmoid(-inf) = 0). Expert e runs on its non-zero rows only (a zero row gives a zero output: no
    biases), so its statistics are those of the tokens routed to it; the router weight is inside the input, so the
    recorded weights are 1."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        n = len(views_by_expert)
        x = hidden_states.view(n, -1, hidden_states.shape[-1])
        out = torch.zeros_like(x)
        routing = mod.__dict__[ROUTING] = {}
        for e, (gate_up, down) in enumerate(views_by_expert):
            rows = torch.where(x[e].ne(0).any(dim=-1))[0]
            routing[e] = (rows, torch.ones(rows.numel(), dtype=x.dtype, device=x.device))
            if rows.numel() == 0:
                continue
            out[e, rows] = down(gate(gate_up(x[e, rows]))).to(out.dtype)
        return out.view(-1, hidden_states.shape[-1])

    return forward


@contextmanager
def routed(block: nn.Module, spec: Experts | None) -> Iterator[None]:
    """Run ``block``'s experts through their views for the duration (see the module docstring); the views are
    registered as the experts module's children meanwhile, so ``block.float()`` / ``.to()`` move them with the
    block, and their weights are written back into the 3-D parameters at the end."""
    mod = get_module(block, spec.path) if spec is not None else None
    if mod is None or _ROUTED in mod.__dict__:
        yield
        return
    vs = views(block, spec)
    names = [name for name, _ in spec.params]
    by_expert = [tuple(vs[f"{spec.path}.{n}[{e}]"] for n in names) for e in range(getattr(mod, names[0]).shape[0])]
    saved = mod.__dict__.get("forward")
    mod.add_module("_views", nn.ModuleList(nn.ModuleList(pair) for pair in by_expert))
    mod.forward = _routed_forward(mod, spec, by_expert)
    mod.__dict__[_ROUTED] = vs
    try:
        yield
    finally:
        try:
            write_back(block, spec)
        finally:
            del mod._modules["_views"]
            del mod.__dict__[_ROUTED]
            mod.__dict__.pop(ROUTING, None)
            if saved is None:
                del mod.forward
            else:
                mod.forward = saved


def has_experts(block: nn.Module) -> bool:
    """Whether ``block`` has a mixture of experts (not every block of an MoE model does: Qwen3-MoE's
    ``mlp_only_layers``)."""
    spec = arch_of_block(block).experts
    return spec is not None and get_module(block, spec.path) is not None


def routed_block(block: nn.Module):
    """``routed`` with the block's own table row (a no-op for a block without experts)."""
    return routed(block, arch_of_block(block).experts)
