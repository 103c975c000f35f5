"""``llmprune regularize``: DReSS's first step (``prune --method dress`` is the second)."""

from __future__ import annotations

import math
from typing import Annotated, Optional

import typer

from llmprune import report
from llmprune.cli._core import (DeviceOpt, DistillOpt, GradCkptOpt, JsonOpt, KdTemperatureOpt, KdWeightOpt, SeedOpt,
                                TeacherOpt, TextFieldOpt, WorkdirArg, check_device, finish, open_workdir, positive)
from llmprune.errors import UserError


def regularize(
    ctx: typer.Context,
    workdir: WorkdirArg,
    ratio: Annotated[Optional[float], typer.Option(help="Fraction of the structure's units to remove (default 0.25).")] = None,
    structure: Annotated[str, typer.Option(help="hidden (the paper), heads (KV groups), mlp, layers, experts (MoE: whole routed experts).")] = "hidden",
    select: Annotated[str, typer.Option(help="activation (lowest on calibration data; REAP for experts), tail, random; experts also reap, frequency.")] = "activation",
    norm: Annotated[str, typer.Option(help="group (one L2 norm per unit), l2 (per slice), l1 (element-wise).")] = "group",
    shrink: Annotated[str, typer.Option(help="prox: decoupled proximal shrink after each step; loss: penalty in the loss.")] = "prox",
    lam: Annotated[float, typer.Option("--lambda", help="Penalty strength, relative to each unit's initial norm (prox: shrink per step).")] = 0.02,
    steps: Annotated[int, typer.Option(help="Optimiser steps (the most, with --until-converged).")] = 100,
    until_converged: Annotated[bool, typer.Option(help="Stop once the selected slices are ~0 and zeroing them costs <= --gap-tol.")] = False,
    gap_tol: Annotated[float, typer.Option(help="Relative perplexity gap (zeroed vs not) that counts as converged.")] = 0.01,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (all parameters are trained).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Windows per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimiser step.")] = 1,
    holdout: Annotated[int, typer.Option(help="Windows kept out of training to measure the gap (of the training text's fresh windows, or of the calibration windows with --calibration-windows); a combination's split is scored on as many calibration windows.")] = 8,
    eval_every: Annotated[int, typer.Option(help="Measure the held-out gap every this many steps.")] = 25,
    seed: SeedOpt = 0,
    grad_checkpointing: GradCkptOpt = False,
    device: DeviceOpt = "cpu",
    distill: DistillOpt = False,
    kd_temperature: KdTemperatureOpt = None,
    kd_weight: KdWeightOpt = None,
    teacher: TeacherOpt = None,
    teacher_steps: Annotated[int, typer.Option(help="--distill: teacher correction (Sreenivas et al. 2024) -- first fine-tune every weight of the teacher this many steps on the training windows (LM loss, lr 2e-5), in memory. 0: distil from the teacher as it is.")] = 0,
    target_params: Annotated[Optional[str], typer.Option(help="A parameter budget instead of --ratio: a count (100M, 1.5B) or a fraction of the model (0.75).")] = None,
    search_steps: Annotated[int, typer.Option(help="A combination's budget: score each candidate split after this many regularisation steps of a copy (0: by direct removal, cheaper, but it favours fine structures).")] = 0,
    dataset: Annotated[Optional[str], typer.Option(help="Training text, in fresh windows (default: the calibration text, read again; the units, and a combination's split, are chosen on the calibration windows either way).")] = None,
    calibration_windows: Annotated[bool, typer.Option("--calibration-windows", help="Train on the calibration windows themselves instead of fresh windows of the calibration text (the earlier default; more than one pass over them can overfit).")] = False,
    text_field: TextFieldOpt = "text",
    seqlen: Annotated[Optional[int], typer.Option(help="Tokens per window of the training text (default: the calibration's).")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint for resuming every this many steps (0: never): every weight and AdamW's two moments, about three fp32 copies of the model on disk until the step commits.")] = 25,
    as_json: JsonOpt = False,
) -> None:
    """DReSS: choose the units to remove, then train so that their information moves into the units that stay."""
    from llmprune.distill import resolve_options
    from llmprune.regularization import RegularizeOptions, regularize_workdir
    from llmprune.train import check_launcher

    kd_temperature, kd_weight = resolve_options(distill, kd_temperature, kd_weight, teacher, teacher_steps)

    if ratio is not None and not 0 < ratio < 1:  # 0 would regularise nothing
        raise UserError(f"--ratio must be in (0, 1), got {ratio}")
    if ratio is not None and target_params is not None:
        raise UserError("give --ratio or --target-params, not both")
    opts = RegularizeOptions(ratio if ratio is not None else 0.25, structure, select, norm, shrink, lam, steps, until_converged, gap_tol, lr,
                             batch_size, grad_accum, holdout, eval_every, seed, grad_checkpointing, device, distill,
                             kd_temperature, kd_weight, teacher, target_params, search_steps, dataset,
                             text_field, seqlen, teacher_steps, calibration_windows=calibration_windows,
                             save_every=save_every)
    opts.check()
    check_launcher()
    positive(steps=steps, batch_size=batch_size, grad_accum=grad_accum, holdout=holdout, eval_every=eval_every,
             **{"lambda": lam}, lr=lr)
    if save_every < 0:
        raise UserError(f"--save-every must be >= 0, got {save_every}")
    if not (math.isfinite(gap_tol) and gap_tol >= 0):
        raise UserError(f"--gap-tol must be >= 0, got {gap_tol}")
    check_device(device)
    m = regularize_workdir(open_workdir(ctx, workdir).require_calibration(), opts)
    result = {"workdir": str(workdir), **m}
    finish(result, as_json, lambda: report.table(
        f"regularized {structure} {_size(m['plan'])} ({m['units_removed']} units, {select})", ["held-out", "before", "after"],
        [["perplexity", m["before"]["ppl"], m["ppl"]], ["perplexity, units zeroed", m["before"]["ppl_zeroed"],
          m["ppl_zeroed"]], ["relative norm of the units", m["before"]["relative_norm"], m["relative_norm"]],
         *([[f"teacher, corrected {c['steps']} steps", c["ppl_before"], c["ppl_after"]]]
           if (c := m.get("teacher_correction")) else []),
         ["steps", 0, f"{m['steps']} ({m['passes']:g} passes over {m['train_windows']} windows" + (
             f" of {m['trained_on']})" if m["trained_on"] != "calibration windows" else " of the calibration)")], ["time", "", f"{m['train_s']:.1f} s"]]))


def _size(plan: dict) -> str:
    """A plan's ratio, or a combination's split (its parts' ratios; the combination's own ratio is 0)."""
    if "+" in plan["structure"]:
        return ", ".join(f"{p['structure']} {p['ratio']:.0%}" for p in plan["removed"])
    return f"{plan['ratio']:.0%}"
