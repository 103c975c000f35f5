"""``llmprune calibrate``: start a workdir."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmprune import precision, report
from llmprune.cli._core import JsonOpt, TextFieldOpt, WorkdirArg, finish, open_workdir, positive
from llmprune.errors import UserError


def calibrate(
    ctx: typer.Context,
    workdir: WorkdirArg,
    model: Annotated[str, typer.Option(help="Hub id, local HF folder, or .gguf file.")],
    dataset: Annotated[str, typer.Option(help="wikitext2, c4, ptb, hf:NAME[:CONFIG[:SPLIT]], or a .txt/.jsonl/.json/.parquet file.")],
    samples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed of the window positions.")] = 0,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (the checkpoint's own), float32, bfloat16 or float16 (also fp32, bf16, fp16).")] = "auto",
    text_field: TextFieldOpt = "text",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow code from the model repository to run.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard.")] = "2GB",
    keep_teacher: Annotated[bool, typer.Option(help="Keep the model as calibrated in WORK/teacher/ (hard links: no extra space until a step replaces the model) for --distill.")] = True,
    force: Annotated[bool, typer.Option(help="Overwrite an existing workdir.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a workdir: bring in a model and calibration windows of a dataset."""
    from llmprune.calibration import CalibrateOptions
    from llmprune.calibration import calibrate as run_step

    from llmprune.modeling import check_shard_size

    positive(samples=samples)
    if seqlen <= 1:
        raise UserError(f"--seqlen must be at least 2, got {seqlen}")
    check_shard_size(max_shard_size)
    _check_memory(samples, seqlen)
    dtype = precision.canonical(dtype, "--dtype", auto=True)  # recorded as spelled canonically: bf16 -> bfloat16
    opts = CalibrateOptions(model, dataset, samples, seqlen, seed, revision, dtype, text_field, trust_remote_code,
                            max_shard_size, keep_teacher)
    res = run_step(open_workdir(ctx, workdir), opts, force)
    finish({"workdir": str(workdir), **res}, as_json, lambda: report.table(
        f"calibrated {workdir}", ["what", "value"],
        [["model", model], ["model type", res["model_type"]], ["parameters", res["parameters"]],
         ["dataset tokens", res["source_tokens"]], ["windows", f"{samples} × {seqlen}"]]))


def _check_memory(samples: int, seqlen: int) -> None:
    """The windows alone (int64 token ids) must fit in a fraction of this machine's memory; every later step holds
    activations of that many tokens too."""
    import os

    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    need = samples * seqlen * 8
    if need > ram // 4:
        raise UserError(f"--samples {samples:,} x --seqlen {seqlen:,} tokens need {need / 2**30:,.1f} GiB for the token "
                        f"ids alone, more than a quarter of this machine's {ram / 2**30:,.0f} GiB; ask for fewer")
