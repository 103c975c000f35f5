"""``llmprune recover``: LoRA recovery; the sequence itself is ``recovery.Recovery``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmprune import report
from llmprune.cli._core import (DeviceOpt, GradCkptOpt, JsonOpt, TextFieldOpt, WorkdirArg, check_device, finish,
                                open_workdir, positive)
from llmprune.errors import UserError


def recover(
    ctx: typer.Context,
    workdir: WorkdirArg,
    dataset: Annotated[Optional[str], typer.Option(help="Training text (default: the workdir's calibration windows).")] = None,
    text_field: TextFieldOpt = "text",
    seqlen: Annotated[Optional[int], typer.Option(help="Tokens per window of --dataset (default: the calibration's).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimiser steps (default 100).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the training windows, instead of --steps.")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the adapter.")] = 2e-4,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (the update is scaled by alpha / rank).")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    targets: Annotated[str, typer.Option(help="auto (the architecture's table) or a comma list: q_proj,v_proj,...")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Windows per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimiser step.")] = 1,
    merge: Annotated[bool, typer.Option(help="Fold the adapter into the weights and re-apply the zero pattern.")] = True,
    masked: Annotated[bool, typer.Option(help="Sparse models: train the adapter through the zero pattern, so the merge loses nothing.")] = True,
    holdout: Annotated[int, typer.Option(help="Windows kept out of training for the held-out perplexity.")] = 8,
    eval_every: Annotated[int, typer.Option(help="Held-out perplexity every this many steps.")] = 25,
    save_every: Annotated[int, typer.Option(help="Checkpoint for resuming every this many steps (0: never).")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of the data order and the adapter's init.")] = 0,
    grad_checkpointing: GradCkptOpt = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """LoRA recovery fine-tuning; with --merge the sparsity pattern is re-applied and verified after the merge."""
    from llmprune.recovery import RecoverOptions, Recovery
    from llmprune.train import check_launcher

    if steps is not None and epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    check_launcher()
    positive(steps=steps if steps is not None else 1, rank=rank, batch_size=batch_size, grad_accum=grad_accum,
             holdout=holdout, eval_every=eval_every, lr=lr, alpha=alpha, epochs=epochs if epochs is not None else 1)
    if not 0 <= dropout < 1 or save_every < 0:
        raise UserError("--dropout must be in [0, 1) and --save-every >= 0")
    opts = RecoverOptions(dataset, text_field, seqlen, steps, epochs, lr, rank, alpha, dropout, targets, batch_size,
                          grad_accum, merge, masked, holdout, eval_every, seed, grad_checkpointing,
                          check_device(device), save_every)
    m = Recovery(open_workdir(ctx, workdir).require_calibration(), opts).run()
    rows = [["held-out perplexity before", m["ppl_before"]], ["with the adapter", m["ppl_adapter"]]]
    if merge:
        rows += [["merged", m["ppl_merged"]], [f"merged, {m['weights_remasked']:,} weights re-zeroed", m["ppl_remasked"]],
                 ["sparsity", f"{m['sparsity']['all']:.2%} (before {m['sparsity_before']['all']:.2%})"]]
    rows += [["steps", m["steps"]], ["time", f"{m['train_s']:.1f} s"]]
    finish({"workdir": str(workdir), **m}, as_json,
           lambda: report.table(f"recovered {workdir} (LoRA r={rank})", ["what", "value"], rows))
