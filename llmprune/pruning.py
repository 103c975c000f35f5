"""``prune``: run a registered method over the blocks and check that the result has the pattern asked for."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import engine
from llmprune.errors import StepFailed
from llmprune.masks import check_width, nm_valid
from llmprune.methods import METHODS
from llmprune.methods.base import BlockContext, PruneSpec
from llmprune.report import progress


def check_pattern(model: nn.Module, spec: PruneSpec) -> None:
    for i, block in enumerate(_arch.blocks(model)):
        for name, lin in _arch.block_linears(block).items():
            check_width(spec.pattern, lin.in_features, f"{i}.{name}")


def prune_model(
    model: nn.Module,
    method: str,
    spec: PruneSpec,
    windows: torch.Tensor | None,
    device: str = "cpu",
    batch_size: int = 4,
    act_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place; returns the time of each phase."""
    impl = METHODS[method]
    check_pattern(model, spec)
    times = {"capture_s": 0.0, "prune_s": 0.0, "propagate_s": 0.0}
    t0 = time.perf_counter()
    if not impl.NEEDS_DATA:
        layers = _arch.blocks(model)
        with progress(f"{method}", total=len(layers)) as advance:
            for i, block in enumerate(layers):
                block.to(device)
                impl.prune_block(BlockContext(i, block, None, device, spec))
                block.to("cpu")
                advance()
        times["prune_s"] = time.perf_counter() - t0
    else:
        assert windows is not None
        if getattr(impl, "PER_SAMPLE", False):
            batch_size = 1  # the method works on one window at a time (e.g. per-sample gradients)
        if spec.options.get("true_sequential"):
            batch_size = windows.shape[0]  # one pass prunes each Linear once it has seen every window
        acts = engine.capture(model, windows, batch_size, device, act_dtype)
        times["capture_s"] = time.perf_counter() - t0
        walk = engine.Walk(model, acts, device, method, last_outputs=False)
        mark = time.perf_counter()
        for i, block, inputs in walk:
            times["propagate_s"] += time.perf_counter() - mark  # the previous block's propagation
            mark = time.perf_counter()
            ctx = BlockContext(i, block, inputs, device, spec)
            impl.prune_block(ctx)
            walk.next_inputs = ctx.outputs
            times["prune_s"] += time.perf_counter() - mark
            mark = time.perf_counter()
        times["propagate_s"] += time.perf_counter() - mark
    verify_pattern(model, spec)
    return {k: round(v, 3) for k, v in times.items()}


def verify_pattern(model: nn.Module, spec: PruneSpec) -> None:
    """Every pruned Linear must hold the zeros the pattern asks for; anything else is a bug, not a user error."""
    for i, block in enumerate(_arch.blocks(model)):
        for name, lin in _arch.block_linears(block).items():
            w = lin.weight.data
            if spec.pattern.is_nm:
                ok = nm_valid(w, spec.pattern.n, spec.pattern.m)
            else:
                ok = (w == 0).sum().item() >= int(w.numel() * spec.sparsity) - w.shape[0]
            if not ok:
                raise StepFailed(f"layer {i}.{name} does not have the requested {spec.pattern} sparsity after pruning")
