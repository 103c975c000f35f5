"""``prune``: run a registered method over the workdir's model and check that the result has the pattern asked for."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import units
from llmprune import engine, owl, precision, report
from llmprune.errors import StepFailed, UserError
from llmprune.masks import check_width, nm_valid, parse_pattern
from llmprune.methods import METHODS, method_options
from llmprune.methods.base import BlockContext, Method, PruneSpec, option_specs
from llmprune.report import progress


@dataclass(frozen=True)
class PruneRequest:
    """What ``llmprune prune`` was asked for. ``options`` holds the method options given on the command line (or in a
    recipe) by name; an option not given is absent or None and takes the method's declared default."""

    method: str = "wanda"
    options: dict[str, Any] = field(default_factory=dict)
    pattern: str = "unstructured"
    sparsity: float | None = None
    true_sequential: bool = False
    device: str = "cpu"
    act_dtype: str = "float32"
    batch_size: int = 4
    owl_lambda: float | None = None  # OWL's spread of block sparsities (``llmprune.owl``); None: uniform
    owl_m: float | None = None  # OWL's outlier threshold, in multiples of a block's mean score


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


def prune_workdir(ws, req: PruneRequest) -> dict[str, Any]:
    """The ``prune`` step: check the request, prune the workdir's model, commit it; returns the step's result."""
    from llmprune import evaluate
    from llmprune.current import open_current

    method = method_for(req.method)
    check_options_belong(method, req.options)
    if method.structured:
        if req.sparsity is not None or req.pattern != "unstructured":
            raise UserError(f"--method {method.name} removes whole units: use its options (see `llmprune prune "
                            "--help`), not --sparsity/--pattern")
        if req.true_sequential:
            raise UserError(f"--true-sequential does not apply to --method {method.name}")
        if req.owl_lambda is not None or req.owl_m is not None:
            raise UserError(f"OWL sets the sparsity of each block; --method {method.name} removes whole units instead")
        opts = method.options(req.options)
        ws.require_calibration()
        return method.prune_workdir(ws, opts, device=req.device, batch_size=req.batch_size)
    if req.true_sequential and not method.true_sequential:
        able = [n for n, m in METHODS.items() if m.true_sequential]
        names = ", ".join(able[:-1]) + " and " + able[-1] if len(able) > 1 else able[0]
        raise UserError(f"--true-sequential applies to {names}, not {method.name}")
    pat, s = parse_pattern(req.pattern, req.sparsity)
    owl_settings = _check_owl(req, pat, s)
    opts = method.options(req.options)
    method.check_request(opts, req.true_sequential)
    act_dtype = precision.canonical(req.act_dtype, "--act-dtype")
    ws.require_calibration()
    for msg in method.warnings(opts, ws.manifest()["calibration"]["samples"]):
        report.warn(msg)
    params = dict(method=method.name, sparsity=s, pattern=str(pat), device=req.device, act_dtype=act_dtype,
                  batch_size=req.batch_size, **vars(opts))
    if req.true_sequential:
        params["true_sequential"] = True
    if owl_settings is not None:
        params.update(owl_lambda=owl_settings.lam, owl_m=owl_settings.m)
    spec = PruneSpec(pat, s, opts, req.true_sequential)
    with ws.step("prune", params) as tx:
        ws.record_inputs(tx, "model")
        ws.record_inputs(tx, "calib")
        lm, tok, weights = open_current(ws, tokenizer=False)  # the in-memory path still gets one
        check_pattern(lm, spec)
        windows = ws.windows() if method.needs_data or owl_settings is not None else None
        out = tx.stage("model")
        peak: dict[str, Any] = {}
        with engine.peak_device_memory(req.device, peak):
            result = _prune_and_write(lm, tok, weights, method, spec, owl_settings, windows, req, out, ws, tx)
        summ = evaluate.summary(lm, result["after"])
        # experts without calibration tokens: how many of the model's expert weights were pruned by magnitude
        fallback = {"no_token_weights": len(result["no_tokens"])} if _arch.arch_for(lm.config.model_type).experts else {}
        blocks = evaluate.block_sparsity(result["after"])
        owl_info = result.get("owl", {})
        tx.step.metrics = {**result["times"], **peak, **summ, **fallback, **owl_info,
                           "layer_sparsity": evaluate.layer_sparsity(result["after"]), "block_sparsity": blocks,
                           # the zeros a later step must keep (recover re-applies them); None: no pattern to keep
                           "zero_pattern": str(pat) if method.exact_zeros else None}
    # ``sparsity`` is the achieved one per layer type (from the summary); ``target_sparsity`` what was asked for.
    return {"method": method.name, "pattern": str(pat), "target_sparsity": s, **result["times"], **peak, **summ,
            **fallback, **owl_info, "block_sparsity": blocks}


def _check_owl(req: PruneRequest, pat, s: float) -> owl.Settings | None:
    """OWL's options, checked before any work; None without ``--owl-lambda`` (uniform sparsity)."""
    if req.owl_lambda is None:
        if req.owl_m is not None:
            raise UserError("--owl-m is OWL's outlier threshold: give --owl-lambda too")
        return None
    if pat.is_nm:
        raise UserError(f"OWL sets one sparsity per block, and {pat} fixes it in every group: use --owl-lambda "
                        "with unstructured sparsity")
    settings = owl.Settings(req.owl_lambda, owl.DEFAULT_M if req.owl_m is None else req.owl_m)
    owl.check(s, settings.lam, settings.m)
    return settings


def _prune_and_write(lm, tok, weights, method, spec, owl_settings, windows, req, out, ws, tx) -> dict[str, Any]:
    """Prune, writing each block to the new shards as it is done (a lazy model), or the whole model at the end."""
    from llmprune.lazy import Rewrite
    from llmprune.modeling import save_model

    act = precision.TORCH[precision.canonical(req.act_dtype, "--act-dtype")]
    if weights.lazy:
        rewrite = Rewrite(weights, out, weights.stored(units.linear_weight_names(lm)))
        try:
            result = prune_model(lm, method, spec, windows, req.device, req.batch_size, act,
                                 weights=weights, sink=rewrite.block, owl=owl_settings)
            check_not_already(result["before"], spec.pattern, spec.sparsity)  # before the copies: fail fast
            recorded = ws.manifest()["files"]
            for f in rewrite.close():
                tx.known[f"model/{f}"] = recorded[f"model/{f}"]
        finally:
            rewrite.abort()
        return result
    result = prune_model(lm, method, spec, windows, req.device, req.batch_size, act,
                         owl=owl_settings)
    check_not_already(result["before"], spec.pattern, spec.sparsity)
    save_model(lm, tok, out, ws.shard_size)
    return result


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
