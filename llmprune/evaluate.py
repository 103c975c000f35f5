"""Measurements: perplexity (streamed block by block), sparsity per layer type, parameter count."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from llmprune import arch as _arch
from llmprune import engine
from llmprune.modeling import param_count


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, device: str = "cpu", batch_size: int = 4, act_dtype=None
) -> dict[str, float]:
    """exp(mean next-token NLL) over all predicted tokens of non-overlapping windows (BENCHMARK.md protocol).

    Runs through the block-by-block engine, so only one block is on the device at a time.
    """
    acts = engine.capture(model, windows, batch_size, device, act_dtype)
    outs = engine.stream(model, acts, device, "evaluating")
    nll, count = 0.0, 0
    start = 0
    for h in outs.hidden:
        for j in range(h.shape[0]):  # one window at a time: its logits are [seqlen, vocab]
            logits = engine.head_logits(model, h[j : j + 1], device)[0].float()
            target = windows[start + j, 1:].to(logits.device)
            nll += F.cross_entropy(logits[:-1], target, reduction="sum").item()
            count += target.numel()
        start += h.shape[0]
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "windows": int(windows.shape[0])}


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros of every prunable Linear, by its full name."""
    out = {}
    for i, block in enumerate(_arch.blocks(model)):
        for name, lin in _arch.block_linears(block).items():
            w = lin.weight
            out[f"{i}.{name}"] = (w == 0).sum().item() / w.numel()
    return out


def sparsity_by_type(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros per layer type (``self_attn.q_proj``...) over all blocks, and ``all`` of them."""
    zeros: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for block in _arch.blocks(model):
        for name, lin in _arch.block_linears(block).items():
            z, n = (lin.weight == 0).sum().item(), lin.weight.numel()
            for key in (name, "all"):
                zeros[key] += z
                total[key] += n
    return {k: zeros[k] / total[k] for k in sorted(total, key=lambda k: (k == "all", k))}


def summary(model: nn.Module) -> dict[str, object]:
    return {"parameters": param_count(model), "sparsity": sparsity_by_type(model)}
