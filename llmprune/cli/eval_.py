"""``llmprune eval``: measure the workdir's model and record it as a step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmprune import report
from llmprune.cli._core import (BatchOpt, DeviceOpt, JsonOpt, TextFieldOpt, WorkdirArg, check_device, finish,
                                open_workdir, positive)


def eval_(
    ctx: typer.Context,
    workdir: WorkdirArg,
    dataset: Annotated[Optional[str], typer.Option(help="Evaluation source (default: the test split of the calibration dataset).")] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.")] = None,
    text_field: TextFieldOpt = "text",
    speed: Annotated[bool, typer.Option(help="Also measure prefill and decode tokens/s (batch 1).")] = False,
    speed_baseline: Annotated[Optional[Path], typer.Option(help="With --speed: also time this workdir or HF folder in the same run, and report the ratios.")] = None,
    prompt_len: Annotated[int, typer.Option(help="With --speed: prompt tokens of the prefill.")] = 512,
    new_tokens: Annotated[int, typer.Option(help="With --speed: tokens decoded through the KV cache.")] = 64,
    speed_batches: Annotated[str, typer.Option(help="With --speed: batch sizes to time, comma-separated (1,8); batch 1's figures keep their plain names, batch b's end in _bB.")] = "1",
    tasks: Annotated[Optional[str], typer.Option(help="Zero-shot tasks, comma-separated: lastword:SRC (built in: the final word of each paragraph of SRC), lm-eval task names or task YAML files (needs llmprune\\[eval]), or the suites wanda-suite, llm-pruner-suite.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="With --tasks: at most this many examples per task (lastword default: 500).")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="With --tasks: few-shot examples for lm-eval tasks (default: each task's own).")] = None,
    device: DeviceOpt = "cpu",
    batch_size: BatchOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity, parameter count and sparsity per layer type (and, with --speed, throughput); recorded as a step."""
    from llmprune.evaluate import EvalOptions, evaluate_workdir

    ws = open_workdir(ctx, workdir)
    ws.manifest()  # a missing or foreign workdir is the first thing to report
    positive(batch_size=batch_size, prompt_len=prompt_len, new_tokens=new_tokens)
    opts = EvalOptions(dataset, seqlen, max_windows, text_field, check_device(device), batch_size, speed,
                       str(speed_baseline) if speed_baseline is not None else None, prompt_len, new_tokens,
                       speed_batches, tasks, limit, num_fewshot)
    m = evaluate_workdir(ws, opts)
    sp = m.get("speed", {})
    finish({"workdir": str(workdir), **m}, as_json, lambda: report.table(
        f"eval {workdir} on {m['dataset']}", ["metric", "value"],
        [["perplexity", m["perplexity"]], ["windows", f"{m['windows']} × {seqlen}"], ["parameters", m["parameters"]],
         ["size on disk", f"{m['model_bytes'] / 2**20:,.1f} MiB"]]
        + [[f"sparsity {k}", f"{v:.2%}"] for k, v in m["sparsity"].items()]
        + [[k.replace("_", " "), v] for k, v in sp.items() if k not in ("prompt_len", "new_tokens", "batches")]
        + task_rows(m.get("tasks", {}), m.get("tasks_mean"))))


def task_rows(results: dict, mean) -> list[list]:
    """One row per task: its accuracy ± stderr over its examples; and the mean."""
    from llmprune.tasks import primary

    rows = []
    for name, metrics in results.items():
        value, err = primary(metrics), metrics.get("acc_stderr")
        shown = "–" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")
        rows.append([f"{name} ({int(metrics.get('examples', 0))} examples)", shown])
    if len(results) > 1 and mean is not None:
        rows.append(["tasks mean", f"{mean:.4f}"])
    return rows
