"""``llmprune prune``: its general options here, each method's options read from the method's declaration."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any, Optional

import typer

from llmprune import report
from llmprune.cli._core import BatchOpt, DeviceOpt, JsonOpt, WorkdirArg, check_device, finish, open_workdir, positive
from llmprune.methods import METHODS, method_options
from llmprune.methods.base import OptionSpec


def _method_help() -> str:
    return "; ".join(f"{n} ({m.summary})" for n, m in METHODS.items()) + "."


def prune(
    ctx: typer.Context,
    workdir: WorkdirArg,
    method: Annotated[str, typer.Option(help=_method_help())] = "wanda",
    sparsity: Annotated[Optional[float], typer.Option(help="Fraction of weights to remove (implied by N:M).")] = None,
    pattern: Annotated[str, typer.Option(help="unstructured, 2:4, 4:8 (any N:M, N kept of every M).")] = "unstructured",
    true_sequential: Annotated[bool, typer.Option(
        help="Prune each Linear as its inputs arrive, in one pass of each block over all calibration windows at once "
        "(later Linears see the pruned earlier ones; about half the block passes of the reference schedule, more "
        "activation memory). Methods: " + ", ".join(n for n, m in METHODS.items() if m.true_sequential) + ".")] = False,
    owl_lambda: Annotated[Optional[float], typer.Option(
        help="OWL (Yin et al. 2024): one sparsity per block at the same overall --sparsity, blocks with more "
        "outlier Wanda scores keeping more weights; the spread of the block sparsities (the paper: 0.08). "
        "Unstructured sparsity, any method that zeroes weights. Measured on 135M-270M models it can lose to "
        "uniform sparsity (benchmarks/README.md, OWL): compare both on held-out text.", show_default=False)] = None,
    owl_m: Annotated[Optional[float], typer.Option(
        help="OWL's outlier threshold: a score above this many times its block's mean is an outlier (default 5).",
        show_default=False)] = None,
    device: DeviceOpt = "cpu",
    act_dtype: Annotated[str, typer.Option(help="Dtype of the stored activations: float32, bfloat16, float16 (also fp32, bf16, fp16).")] = "float32",
    batch_size: BatchOpt = 4,
    as_json: JsonOpt = False,
    **method_options: Any,
) -> None:
    """Remove weights with a pruning method; the saved weights hold exact zeros (structured methods: whole units)."""
    from llmprune.pruning import PruneRequest, prune_workdir

    positive(batch_size=batch_size)
    req = PruneRequest(method, method_options, pattern, sparsity, true_sequential, check_device(device), act_dtype,
                       batch_size, owl_lambda, owl_m)
    res = prune_workdir(open_workdir(ctx, workdir), req)
    finish({"workdir": str(workdir), **res}, as_json, lambda: _render(res))


def _render(res: dict[str, Any]) -> None:
    if "units_removed" in res:  # structured
        before, after = res["geometry_before"], res["geometry"]
        budget = res.get("budget")
        plan = res.get("plan") or {}
        split = ", ".join(f"{p['structure']} {p['ratio']:.0%}" for p in plan["removed"]) if "+" in res["structure"] \
            and isinstance(plan.get("removed"), list) else ""
        size = (f"to {budget['target']:,} parameters" if budget else f"{res['ratio']:.0%}") + (f" ({split})" if split else "")
        report.table(
            f"{res['method']} {res['structure']} {size} "
            f"({'regularised' if res['regularized'] else 'direct removal'}, {res['select']})",
            ["what", "before", "after"],
            [["parameters", res["parameters_before"], res["parameters"]]]
            + [[k, v, after[k]] for k, v in before.items() if v != after[k]]
            + [["time", "", f"{res['prune_s']:.1f} s"]])
        if budget and "alternatives" in budget:
            report.table("the budget's split (held-out calibration windows)", ["split", "parameters", "held-out ppl"],
                         [[", ".join(f"{s} {r:.3f}" for s, r in a["ratios"].items())
                           + (" (chosen)" if a == budget["chosen"] else ""), a["parameters"], a["heldout_ppl"]]
                          for a in budget["alternatives"]])
        return
    total = res["prune_s"] + res["propagate_s"] + res["capture_s"] + res.get("owl_s", 0.0)
    report.table(
        f"{res['method']} {res['pattern']} {res['target_sparsity']:.0%}: achieved sparsity", ["layer type", "sparsity"],
        [[k, f"{v:.2%}"] for k, v in res["sparsity"].items()] + [["prune time", f"{total:.1f} s"]])
    if "target_block_sparsity" in res:
        report.table("OWL: sparsity per block", ["block", "outlier ratio", "target", "achieved"],
                     [[i, f"{d:.4f}", f"{t:.2%}", f"{a:.2%}"] for i, (d, t, a) in
                      enumerate(zip(res["outlier_ratio"], res["target_block_sparsity"], res["block_sparsity"]))])


# --- the method options, from the registry --------------------------------------------------------------------------
def _help(o: OptionSpec) -> str:
    text = o.help.rstrip(".")
    return f"{text} (default {o.default})." if o.default is not None else f"{text}."


def _with_method_options(func):
    """Give ``func`` one keyword option per method option: default None, meaning the method's own default (so an
    option given for another method can be told apart from one not given, and refused)."""
    sig = inspect.signature(func, eval_str=True)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = []
    for name, declared in method_options().items():
        first = declared[0][1]
        help_text = " ".join(_help(o) for _, o in declared)
        extra.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                       annotation=Annotated[Optional[_strip_optional(first.type)], typer.Option(
                                           first.flag, help=help_text, show_default=False)]))
    at = next(i for i, p in enumerate(params) if p.name == "device")
    params[at:at] = extra
    func.__signature__ = sig.replace(parameters=params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def _strip_optional(typ: Any) -> Any:
    """``Optional[X]`` -> ``X`` (every method option is optional on the command line anyway)."""
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    return args[0] if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(args) == 1 else typ


prune = _with_method_options(prune)
