"""The ``prune`` step: its options (the general ones here, each method's from the method's declaration) and its
run -- one registered method over the workdir's model, the result checked for the pattern asked for, committed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from llmprune import arch as _arch
from llmprune import engine, evaluate, owl, precision, prune_memory, report, units
from llmprune.current import open_current, pending_adapter
from llmprune.errors import UserError
from llmprune.masks import parse_pattern
from llmprune.methods import METHODS, method_options
from llmprune.methods.base import PruneSpec
from llmprune.options import (DEVICE_PANEL, OptionSpec, batch_option, check_all, check_device, device_option,
                              memory_check_option, option, strip_optional)
from llmprune import pruning
from llmprune.pruning import check_not_already, check_options_belong, check_pattern, method_for
from llmprune.steps import KINDS
from llmprune.steps.base import Step
from llmprune.workdir import Workdir

GENERAL, METHOD, OWL = "General", "Method options", "OWL (unstructured sparsity)"


@dataclass(frozen=True)
class PruneOptions:
    """What ``llmprune prune`` was asked for. ``options`` holds the method options given on the command line (or in a
    recipe) by name; an option not given is absent or None and takes the method's declared default."""

    method: str = option("wanda", "; ".join(f"{n} ({m.summary})" for n, m in METHODS.items()) + ".",
                         choices=tuple(METHODS), panel=GENERAL)
    options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})
    pattern: str = option("unstructured", "unstructured, 2:4, 4:8 (any N:M, N kept of every M).", panel=GENERAL)
    sparsity: Optional[float] = option(None, "Fraction of weights to remove (implied by N:M).", panel=GENERAL)
    true_sequential: bool = option(
        False, "Prune each Linear as its inputs arrive, in one pass of each block over all calibration windows at "
        "once (later Linears see the pruned earlier ones; about half the block passes of the reference schedule, "
        "more activation memory). Methods: " + ", ".join(n for n, m in METHODS.items() if m.true_sequential) + ".",
        panel=GENERAL)
    device: str = device_option()
    act_dtype: str = option("float32", "Dtype of the stored activations: float32, bfloat16, float16 (also fp32, bf16, "
                            "fp16).", choices=tuple(precision.TORCH), strict=False, panel=DEVICE_PANEL)
    batch_size: int = batch_option()
    memory_check: bool = memory_check_option()
    owl_lambda: Optional[float] = option(
        None, "OWL (Yin et al. 2024): one sparsity per block at the same overall --sparsity, blocks with more outlier "
        "Wanda scores keeping more weights; the spread of the block sparsities (the paper: 0.08). Unstructured "
        "sparsity, any method that zeroes weights. Measured on 135M-270M models it can lose to uniform sparsity "
        "(benchmarks/README.md, OWL): compare both on held-out text.", panel=OWL, show_default=False)
    owl_m: Optional[float] = option(None, "OWL's outlier threshold: a score above this many times its block's mean is "
                                    "an outlier (default 5).", panel=OWL, show_default=False)


def method_option_specs() -> list[OptionSpec]:
    """One option per method option, default None -- the method's own default -- so that an option given for
    another method can be told apart from one not given, and refused; the help says whose it is."""
    out = []
    for name, declared in method_options().items():
        first = declared[0][1]
        help_text = " ".join(f"{o.help.rstrip('.')}" + (f" (default {o.default})." if o.default is not None else ".")
                             for _, o in declared)
        out.append(OptionSpec(name, Optional[strip_optional(first.type)], None, help_text, first.choices,
                              panel=METHOD, show_default=False, strict=False))
    return out


def _build(values: dict[str, Any]) -> PruneOptions:
    own = {k: v for k, v in values.items() if k in PruneOptions.__dataclass_fields__}
    return PruneOptions(**own, options={k: v for k, v in values.items() if k not in own})


def run(ws: Workdir, req: PruneOptions) -> dict[str, Any]:
    """The ``prune`` step: check the request, prune the workdir's model, commit it; returns the step's result."""
    check_all(req)
    req = replace(req, device=check_device(req.device))
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
        warn_stacked(ws)
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
    warn_stacked(ws)
    for msg in method.warnings(opts, ws.manifest()["calibration"]["samples"]):
        report.warn(msg)
    params = dict(method=method.name, sparsity=s, pattern=str(pat), device=req.device, act_dtype=act_dtype,
                  batch_size=req.batch_size, **vars(opts))
    if req.true_sequential:
        params["true_sequential"] = True
    if owl_settings is not None:
        params.update(owl_lambda=owl_settings.lam, owl_m=owl_settings.m)
    spec = PruneSpec(pat, s, opts, req.true_sequential)
    estimate = _memory_check(ws, method, spec, owl_settings is not None, req, act_dtype)
    with ws.step("prune", params) as tx:
        ws.record_inputs(tx, "model")
        ws.record_inputs(tx, "calib")
        lm, tok, weights = open_current(ws, tokenizer=False)  # the in-memory path still gets one
        check_pattern(lm, spec)
        windows = ws.windows() if method.needs_data or owl_settings is not None else None
        report.info(prune_memory.report_line(estimate, method.name))  # once the inputs check out: errors stay one line
        out = tx.stage("model")
        peak: dict[str, Any] = {}
        with engine.peak_device_memory(req.device, peak):
            result = _prune_and_write(lm, tok, weights, method, spec, owl_settings, windows, req, out, ws, tx)
        summ = evaluate.summary(lm, result["after"])
        # experts without calibration tokens: how many of the model's expert weights were pruned by magnitude
        fallback = {"no_token_weights": len(result["no_tokens"])} if _arch.arch_for(lm.config.model_type).experts else {}
        blocks = evaluate.block_sparsity(result["after"])
        owl_info = result.get("owl", {})
        tx.step.metrics = {**result["times"], **peak, **summ, **fallback, **owl_info, "memory_estimate": estimate,
                           "layer_sparsity": evaluate.layer_sparsity(result["after"]), "block_sparsity": blocks,
                           # the zeros a later step must keep (recover re-applies them); None: no pattern to keep
                           "zero_pattern": str(pat) if method.exact_zeros else None}
    # ``sparsity`` is the achieved one per layer type (from the summary); ``target_sparsity`` what was asked for.
    return {"method": method.name, "pattern": str(pat), "target_sparsity": s, **result["times"], **peak, **summ,
            **fallback, **owl_info, "block_sparsity": blocks, "memory_estimate": estimate}


def warn_stacked(ws: Workdir) -> None:
    """A prune of a model pruned before applies on top of it -- the zeros already there count toward the new target,
    and the units already removed are gone -- which is what a pipeline may want, but never silently."""
    earlier = [(i, s["params"]) for i, s in enumerate(ws.manifest()["steps"], 1) if s["command"] == "prune"]
    if not earlier:
        return
    i, p = earlier[-1]
    what = p.get("structure") and f"{p['structure']} {p.get('ratio', '')}".strip() or \
        f"{p.get('pattern', '')} {p.get('sparsity', '')}".strip()
    report.warn(f"this workdir's model was pruned before (step {i}: {p.get('method')} {what}); this prune applies on "
                f"top of it. To try alternatives side by side, branch the workdir first: llmprune branch {ws.path} NEW")


def _check_owl(req: PruneOptions, pat, s: float) -> owl.Settings | None:
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


def _memory_check(ws: Workdir, method, spec: PruneSpec, owl: bool, req: PruneOptions, act_dtype: str) -> dict:
    """The prune's peak memory, estimated from the config and the shards' headers before the model is loaded, and
    (unless ``--no-memory-check``) a prune that would not fit refused in one line naming what would."""
    manifest = ws.manifest()
    opts = spec.options
    ro = None
    if method.name == "wandapp":
        ro = prune_memory.RO(grads=opts.alpha > 0, iters=opts.ro_iters, samples=opts.ro_samples, batch=opts.ro_batch,
                             adam=opts.ro_optim == "adam", fixed=opts.ro_mask == "fixed")
    setting = prune_memory.PruneSetting(
        method=method.name, samples=manifest["calibration"]["samples"], seqlen=manifest["calibration"]["seqlen"],
        batch=req.batch_size, act_bytes=precision.TORCH[act_dtype].itemsize, true_sequential=spec.true_sequential,
        removed=spec.sparsity, data=method.needs_data or owl, whole=pending_adapter(manifest) is not None, wandapp=ro)
    return prune_memory.check(ws.model_dir, setting, req.device, req.memory_check)


def _prune_and_write(lm, tok, weights, method, spec, owl_settings, windows, req, out, ws, tx) -> dict[str, Any]:
    """Prune, writing each block to the new shards as it is done (a lazy model), or the whole model at the end."""
    from llmprune.lazy import Rewrite
    from llmprune.modeling import save_model

    act = precision.TORCH[precision.canonical(req.act_dtype, "--act-dtype")]
    if weights.lazy:
        rewrite = Rewrite(weights, out, weights.stored(units.linear_weight_names(lm)))
        try:
            result = pruning.prune_model(lm, method, spec, windows, req.device, req.batch_size, act,
                                 weights=weights, sink=rewrite.block, owl=owl_settings)
            check_not_already(result["before"], spec.pattern, spec.sparsity)  # before the copies: fail fast
            recorded = ws.manifest()["files"]
            for f in rewrite.close():
                tx.known[f"model/{f}"] = recorded[f"model/{f}"]
        finally:
            rewrite.abort()
        return result
    result = pruning.prune_model(lm, method, spec, windows, req.device, req.batch_size, act,
                         owl=owl_settings)
    check_not_already(result["before"], spec.pattern, spec.sparsity)
    save_model(lm, tok, out, ws.shard_size)
    return result




STEP = Step("prune", PruneOptions, run, "Remove weights with a pruning method; the saved weights hold exact zeros "
            "(structured methods: whole units).", kind=KINDS["prune"], extra=method_option_specs, build=_build)
