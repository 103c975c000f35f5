"""``prune``: run a registered method over the workdir's model and check that the result has the pattern asked for."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import units
from llmprune import engine, owl, report
from llmprune.errors import StepFailed, UserError
from llmprune.masks import check_width, nm_valid
from llmprune.methods import METHODS, method_options
from llmprune.methods.base import BlockContext, Method, PruneSpec
from llmprune.options import specs as option_specs
from llmprune.report import progress


def method_for(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; use one of: {', '.join(METHODS)}")
    return METHODS[name]


def check_options_belong(method: Method, given: dict[str, Any]) -> None:
    """An option of another method is an error, not silently ignored: it would do nothing."""
    own = {o.name for o in option_specs(method.Options)}
    foreign = [k for k, v in given.items() if v is not None and k not in own]
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        declared = method_options()
        whose = sorted({m for k in foreign for m, _ in declared.get(k, [])}, key=list(METHODS).index)
        raise UserError(f"--method {method.name} takes no {flags}: {'it belongs' if len(foreign) == 1 else 'they belong'}"
                        f" to --method {' or '.join(whose)}")


def check_not_already(before: dict[str, tuple[int, int]], pat, s: float) -> None:
    """Pruning a model already sparser than asked for would remove nothing (N:M is checked per group instead)."""
    from llmprune import evaluate

    already = evaluate.sparsity_by_type(before).get("all", 0.0) if before else 0.0
    if not pat.is_nm and already >= s > 0:
        raise UserError(f"the model is already {already:.1%} sparse; pruning it to {s:.0%} would remove nothing "
                        "(ask for more, or prune the model before the earlier prune)")


def check_pattern(model: nn.Module, spec: PruneSpec) -> None:
    """Before any work: every block is one the table fully describes, and the pattern fits every prunable weight."""
    for i, block in enumerate(_arch.blocks(model)):
        unknown = units.undescribed(block)
        if unknown:
            name, shape = unknown[0]
            raise UserError(f"block {i} holds {name} {list(shape)}, a weight llmprune's table for "
                            f"'{model.config.model_type}' does not describe; refusing to prune a block it does not "
                            "fully understand" + (f" ({len(unknown) - 1} more such weights)" if len(unknown) > 1 else ""))
        for name, lin in units.block_linears(block).items():
            check_width(spec.pattern, lin.in_features, f"{i}.{name}")


def prune_model(
    model: nn.Module,
    method: Method,
    spec: PruneSpec,
    windows: torch.Tensor | None,
    device: str = "cpu",
    batch_size: int = 4,
    act_dtype: torch.dtype | None = None,
    weights=None,
    sink=None,
    owl: owl.Settings | None = None,
) -> dict[str, Any]:
    """Prune ``model`` block by block; returns the time of each phase (``times``) and the exact zeros of every
    prunable Linear before and after (``before``, ``after``: ``evaluate.block_zeros`` counts).

    ``weights``: where the blocks live (``lazy.InMemory`` by default: the model is pruned in place; a ``lazy.Lazy``
    model is read block by block). ``sink(index, block)`` receives each pruned block, checked, before it is unloaded
    (the step writes it to its new shards there).

    With ``owl`` (``owl.Settings``) the block sparsities come first from a pass of the dense model (``llmprune.owl``;
    ``windows`` are needed even for a method that reads no data); the result then has ``owl``: the outlier ratio
    and the target sparsity of every block.
    """
    from llmprune.evaluate import block_zeros
    from llmprune.lazy import InMemory

    weights = weights or InMemory()
    check_pattern(model, spec)
    times = {"capture_s": 0.0, "prune_s": 0.0, "propagate_s": 0.0}
    owl_info: dict[str, Any] = {}
    if owl is not None:
        t0 = time.perf_counter()
        spec, owl_info = _owl_spec(model, spec, owl, windows, device, batch_size, act_dtype, weights)
        times["owl_s"] = time.perf_counter() - t0
    no_tokens: list[str] = []  # experts that received no calibration token (pruned by magnitude)
    before: dict[str, tuple[int, int]] = {}
    after: dict[str, tuple[int, int]] = {}

    def done(i: int, block: nn.Module) -> None:
        verify_block(i, block, spec.for_block(i))
        after.update(block_zeros(i, block))
        if sink is not None:
            sink(i, block)

    if not method.needs_data:
        _walk_without_data(model, method, spec, device, weights, times, before, done)
    else:
        assert windows is not None
        no_tokens = _walk_with_data(model, method, spec, windows, device, batch_size, act_dtype, weights, times,
                                    before, done)
    if no_tokens:
        report.warn(f"{len(no_tokens)} expert weight(s) received no calibration token and were pruned by magnitude "
                    f"(the first: {no_tokens[0]}); more calibration samples route tokens to more experts")
    return {"times": {k: round(v, 3) for k, v in times.items()}, "before": before, "after": after,
            "no_tokens": no_tokens, **({"owl": owl_info} if owl_info else {})}


def _walk_without_data(model, method: Method, spec: PruneSpec, device, weights, times, before, done) -> None:
    """A method that reads no calibration data (magnitude): each block loaded, pruned, checked and written."""
    from llmprune.evaluate import block_zeros

    t0 = time.perf_counter()
    layers = _arch.blocks(model)
    with progress(method.name, total=len(layers)) as advance:
        for i, block in enumerate(layers):
            weights.load(block, device)
            before.update(block_zeros(i, block))
            method.prune_block(BlockContext(i, block, None, device, spec.for_block(i)))
            done(i, block)
            weights.unload(block)
            advance()
    times["prune_s"] = time.perf_counter() - t0


def _walk_with_data(model, method: Method, spec: PruneSpec, windows, device, batch_size, act_dtype, weights, times,
                    before, done) -> list[str]:
    """The engine's walk: block 0's inputs captured, then each block pruned on its inputs and run again so the next
    sees the pruned outputs. Returns the expert weights no calibration token reached (pruned by magnitude)."""
    from llmprune.evaluate import block_zeros

    t0 = time.perf_counter()
    if spec.true_sequential:
        batch_size = windows.shape[0]  # one pass prunes each Linear once it has seen every window
    if method.per_sample:
        # The method works on one window at a time (per-sample gradients) and merges the windows itself
        # where it needs them at once (``Activations.merged``).
        batch_size = 1
    acts = engine.capture(model, windows, batch_size, device, act_dtype, weights=weights)
    times["capture_s"] = time.perf_counter() - t0
    walk = engine.Walk(model, acts, device, method.name, last_outputs=False, weights=weights, sink=done)
    no_tokens: list[str] = []
    mark = time.perf_counter()
    for i, block, inputs in walk:
        times["propagate_s"] += time.perf_counter() - mark  # the previous block's propagation (and writing)
        mark = time.perf_counter()
        before.update(block_zeros(i, block))
        ctx = BlockContext(i, block, inputs, device, spec.for_block(i))
        method.prune_block(ctx)
        no_tokens += [f"{i}.{n}" for n in ctx.no_tokens]
        walk.next_inputs = ctx.outputs
        times["prune_s"] += time.perf_counter() - mark
        mark = time.perf_counter()
    times["propagate_s"] += time.perf_counter() - mark
    return no_tokens


def _owl_spec(model, spec: PruneSpec, settings, windows, device, batch_size, act_dtype, weights
              ) -> tuple[PruneSpec, dict]:
    """``spec`` with OWL's block sparsities, from one pass of the dense model over the calibration windows."""
    import dataclasses

    if windows is None:
        raise ValueError("OWL needs calibration windows, whatever the method")
    acts = engine.capture(model, windows, batch_size, device, act_dtype, weights=weights)
    ratios, sizes = owl.dense_ratios(model, acts, device, settings.m, weights=weights)
    del acts
    targets = owl.block_sparsities(ratios, sizes, spec.sparsity, settings.lam)
    info = {"outlier_ratio": [round(r, 6) for r in ratios], "target_block_sparsity": [round(t, 6) for t in targets]}
    return dataclasses.replace(spec, block_sparsity=targets), info


def verify_block(index: int, block: nn.Module, spec: PruneSpec) -> None:
    """Every pruned Linear must hold the zeros the pattern asks for; anything else is a bug, not a user error."""
    for name, lin in units.block_linears(block).items():
        w = lin.weight.data
        if spec.pattern.is_nm:
            ok = nm_valid(w, spec.pattern.n, spec.pattern.m)
        else:
            # Methods compare scores per output row (or SparseGPT per block of columns), and each group rounds
            # its count down: up to one weight fewer per row than int(numel * sparsity) (SparseGPT has fewer
            # column blocks than rows in any real model).
            ok = (w == 0).sum().item() >= int(w.numel() * spec.sparsity) - w.shape[0]
        if not ok:
            raise StepFailed(f"layer {index}.{name} does not have the requested {spec.pattern} sparsity after pruning")
