"""``llmprune sweep``: a grid of prune configurations from one calibrated workdir, evaluated, tabled and plotted."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmprune import report
from llmprune.cli._core import (BatchOpt, DeviceOpt, JsonOpt, Settings, TextFieldOpt, WorkdirArg, check_device, finish,
                                invoke_sibling, open_workdir, positive)


def sweep(
    ctx: typer.Context,
    workdir: WorkdirArg,
    methods: Annotated[Optional[str], typer.Option(help="Score methods, comma-separated (wanda,sparsegpt,wandapp,...).")] = None,
    sparsities: Annotated[Optional[str], typer.Option(help="Unstructured sparsities for every method, e.g. 0.3,0.5,0.6,0.7.")] = None,
    patterns: Annotated[Optional[str], typer.Option(help="N:M patterns for every method, e.g. 2:4,4:8.")] = None,
    structures: Annotated[Optional[str], typer.Option(help="Structured removals (direct, prune --method dress): STRUCTURE:RATIO or STRUCTURE@BUDGET (--target-params; A+B splits it), e.g. hidden:0.1,mlp:0.25,layers+mlp@0.8.")] = None,
    owl: Annotated[Optional[str], typer.Option(help="OWL lambdas, e.g. 0.08: every method at every --sparsities "
                                                   "again with prune --owl-lambda (a line of its own in the plots).")] = None,
    prune_args: Annotated[str, typer.Option(help="Extra options for every score-method prune, e.g. '--batch-size 8'.")] = "",
    dataset: Annotated[Optional[str], typer.Option(help="Evaluation source (default: the test split of the calibration dataset).")] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.")] = None,
    text_field: TextFieldOpt = "text",
    tasks: Annotated[Optional[str], typer.Option(help="Zero-shot tasks for every point (as eval --tasks).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="With --tasks: at most this many examples per task.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="With --tasks: few-shot examples for lm-eval tasks.")] = None,
    speed: Annotated[bool, typer.Option(help="Time structured points against the dense model (eval --speed).")] = True,
    prompt_len: Annotated[int, typer.Option(help="With --speed: prompt tokens of the prefill.")] = 512,
    new_tokens: Annotated[int, typer.Option(help="With --speed: tokens decoded through the KV cache.")] = 64,
    keep_models: Annotated[bool, typer.Option(help="Keep every point's pruned model under WORK/sweep/runs/ (default: delete it once measured).")] = False,
    device: DeviceOpt = "cpu",
    batch_size: BatchOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Prune and evaluate a grid of configurations from one calibrated workdir (resumable); results and plots in WORK/sweep/."""
    from llmprune import data
    from llmprune import sweep as _sweep

    ws = open_workdir(ctx, workdir)
    ws.manifest()
    positive(batch_size=batch_size, seqlen=seqlen, prompt_len=prompt_len, new_tokens=new_tokens)
    device = check_device(device)
    configs = _sweep.grid(methods, sparsities, patterns, structures, prune_args, owl)
    if dataset is not None:
        data.check_local(dataset)
    ev = ["--seqlen", str(seqlen), "--text-field", text_field, "--device", device, "--batch-size", str(batch_size)]
    for flag, value in (("--dataset", dataset), ("--max-windows", max_windows), ("--tasks", tasks),
                        ("--limit", limit), ("--num-fewshot", num_fewshot)):
        if value is not None:
            ev += [flag, str(value)]
    settings = ctx.find_object(Settings) or Settings()

    def quiet_invoke(args: list[str]) -> int:
        with report.quiet():  # each point's own table would bury the grid's
            return invoke_sibling(ctx, args, Settings(verify=settings.verify))

    with ws.locked():  # the points start from this state: nothing may change it while they run
        res = _sweep.run_sweep(ws, configs, ev, quiet_invoke, keep_models=keep_models,
                               speed=["--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)] if speed
                               else None)
    rows = res["rows"]
    finish({"workdir": str(workdir), **res}, as_json, lambda: report.table(
        f"sweep of {workdir}: {len(res['ran'])} ran, {len(res['skipped'])} done before, {len(res['failed'])} failed "
        f"→ {res['results']}", ["point", "perplexity", "parameters", "sparsity", "tasks mean", "prefill ×", "status"],
        [[r["name"], r.get("perplexity", "–"), r.get("parameters", "–"),
          "–" if r.get("achieved_sparsity") is None else f"{r['achieved_sparsity']:.2%}",
          "–" if r.get("tasks_mean") is None else f"{r['tasks_mean']:.4f}",
          r.get("prefill_speedup") or "–", r["status"] if r["status"] == "done" else f"failed: {r['error']}"]
         for r in rows]))
    if res["failed"]:
        from llmprune.errors import UserError

        raise UserError(f"{len(res['failed'])} of {len(rows)} points failed ({', '.join(res['failed'])}); the others "
                        f"are in {res['results']}")
