"""``llmprune recover``: LoRA recovery; the sequence itself is ``recovery.Recovery``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmprune import report
from llmprune.cli._core import (DeviceOpt, DistillOpt, GradCkptOpt, JsonOpt, KdTemperatureOpt, KdWeightOpt,
                                TeacherOpt, TextFieldOpt, WorkdirArg, check_device, finish, open_workdir, positive)
from llmprune.errors import UserError


def recover(
    ctx: typer.Context,
    workdir: WorkdirArg,
    dataset: Annotated[Optional[str], typer.Option(help="Training text (default: the workdir's calibration windows).")] = None,
    text_field: TextFieldOpt = "text",
    seqlen: Annotated[Optional[int], typer.Option(help="Tokens per window of --dataset (default: the calibration's).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimiser steps (default 100).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the training windows, instead of --steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate (default: 2e-4 for LoRA, 2e-5 with --full).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Train every weight instead of a LoRA adapter (structured models have no zeros to keep; a sparse model's pattern is re-applied after each step).")] = False,
    distill: DistillOpt = False,
    kd_temperature: KdTemperatureOpt = None,
    kd_weight: KdWeightOpt = None,
    teacher: TeacherOpt = None,
    teacher_steps: Annotated[int, typer.Option(help="--distill: teacher correction (Sreenivas et al. 2024) -- first fine-tune every weight of the teacher this many steps on the training windows (LM loss, lr 2e-5); on both benchmark models distillation beat the LM loss only after it. Kept as one fp32 copy beside the resume checkpoint until the step commits. 0: distil from the teacher as it is.")] = 0,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank (default 8).")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (the update is scaled by alpha / rank; default 16).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="LoRA dropout (default 0.05).")] = None,
    targets: Annotated[str, typer.Option(help="auto (the architecture's table) or a comma list: q_proj,v_proj,...")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Windows per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimiser step.")] = 1,
    merge: Annotated[bool, typer.Option(help="Fold the adapter into the weights and re-apply the zero pattern.")] = True,
    masked: Annotated[Optional[bool], typer.Option("--masked/--no-masked", help="Sparse models: train the adapter through the zero pattern, so the merge loses nothing (default on).")] = None,
    holdout: Annotated[int, typer.Option(help="Windows kept out of training for the held-out perplexity.")] = 8,
    eval_every: Annotated[int, typer.Option(help="Held-out perplexity every this many steps.")] = 25,
    save_every: Annotated[int, typer.Option(help="Checkpoint for resuming every this many steps (0: never).")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of the data order and the adapter's init.")] = 0,
    grad_checkpointing: GradCkptOpt = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Recovery fine-tuning (LoRA, or every weight with --full) on the LM loss or distilled from the dense teacher
    (--distill); with --merge the sparsity pattern is re-applied and verified after the merge."""
    from llmprune.distill import resolve_options
    from llmprune.recovery import RecoverOptions, Recovery
    from llmprune.train import check_launcher

    if steps is not None and epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    if dataset is None and seqlen is not None:
        raise UserError("--seqlen sets the windows of --dataset; without it the calibration windows are used")
    if dataset is None and text_field != "text":
        raise UserError("--text-field names the field of --dataset's records; give --dataset")
    if full and targets != "auto":
        raise UserError("--targets names the Linears LoRA adapts; --full trains every weight (drop one of them)")
    if full and not merge:
        raise UserError("--full trains the weights themselves: there is no adapter to keep unmerged (drop --no-merge)")
    lora = [n for n, v in (("--rank", rank), ("--alpha", alpha), ("--dropout", dropout), ("--masked", masked))
            if v is not None]
    if full and lora:
        raise UserError(f"{', '.join(lora)} set the LoRA adapter; --full trains every weight (drop one of them)")
    rank, alpha = 8 if rank is None else rank, 16.0 if alpha is None else alpha
    dropout, masked = 0.05 if dropout is None else dropout, True if masked is None else masked
    kd_temperature, kd_weight = resolve_options(distill, kd_temperature, kd_weight, teacher, teacher_steps)
    check_launcher()
    positive(steps=steps if steps is not None else 1, rank=rank, batch_size=batch_size, grad_accum=grad_accum,
             holdout=holdout, eval_every=eval_every, lr=lr if lr is not None else 1, alpha=alpha,
             epochs=epochs if epochs is not None else 1)
    if not 0 <= dropout < 1 or save_every < 0:
        raise UserError("--dropout must be in [0, 1) and --save-every >= 0")
    opts = RecoverOptions(dataset=dataset, text_field=text_field, seqlen=seqlen, steps=steps, epochs=epochs, lr=lr,
                          rank=rank, alpha=alpha, dropout=dropout, targets=targets, batch_size=batch_size,
                          grad_accum=grad_accum, merge=merge, masked=masked, holdout=holdout, eval_every=eval_every,
                          seed=seed, grad_checkpointing=grad_checkpointing, device=check_device(device), full=full,
                          distill=distill, kd_temperature=kd_temperature, kd_weight=kd_weight, teacher=teacher,
                          teacher_steps=teacher_steps, save_every=save_every)
    m = Recovery(open_workdir(ctx, workdir).require_calibration(), opts).run()
    how = ("all weights" if full else f"LoRA r={rank}") + (", distilled" if distill else "")
    finish({"workdir": str(workdir), **m}, as_json,
           lambda: report.table(f"recovered {workdir} ({how})", ["what", "value"], _rows(m, full, merge, distill)))


def _rows(m: dict, full: bool, merge: bool, distill: bool) -> list[list]:
    """The table of a finished recovery: perplexities before and after (merged, re-zeroed), sparsity, cost."""
    rows = [["held-out perplexity before", m["ppl_before"]],
            ["after training" if full else "with the adapter", m["ppl_after" if full else "ppl_adapter"]]]
    if distill:
        rows.append(["KD loss (last steps)", m["final_kd"]])
    if m.get("teacher_correction"):
        c = m["teacher_correction"]
        rows.append([f"teacher, corrected {c['steps']} steps", f"{c['ppl_before']} -> {c['ppl_after']} held-out "
                     f"perplexity ({c['seconds']:.0f} s" + (", kept from the interrupted run)" if c.get("reused") else ")")])
    if full:
        rows.append(["sparsity", f"{m['sparsity']['all']:.2%} (before {m['sparsity_before']['all']:.2%})"])
    if merge and not full:
        rows += [["merged", m["ppl_merged"]], [f"merged, {m['weights_remasked']:,} weights re-zeroed", m["ppl_remasked"]],
                 ["sparsity", f"{m['sparsity']['all']:.2%} (before {m['sparsity_before']['all']:.2%})"]]
    return rows + [["steps", m["steps"]], ["time", f"{m['train_s']:.1f} s"]]
