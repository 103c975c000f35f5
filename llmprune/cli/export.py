"""``llmprune export``: a clean Hugging Face folder, optionally pushed to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmprune import report
from llmprune.cli._core import JsonOpt, WorkdirArg, finish, open_workdir


def export(
    ctx: typer.Context,
    workdir: WorkdirArg,
    out: Annotated[Path, typer.Option(help="Folder to write (must be new or empty).")],
    format: Annotated[str, typer.Option("--format", help="merged: the model (an unmerged adapter folded in); peft: the base model + adapter/ (after `recover --no-merge`); adapter: the LoRA adapter alone.")] = "merged",
    base_model: Annotated[Optional[str], typer.Option(help="Hub id of the model this one was pruned from, for the card's base_model (default: the source's Hub id, when it has one).")] = None,
    adapter_base: Annotated[Optional[str], typer.Option(help="Hub id written as the adapter's base_model_name_or_path (peft/adapter; default: --push-to-hub's repo for peft).")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option(help="Also upload to this Hub repo id.")] = None,
    private: Annotated[bool, typer.Option(help="Create the Hub repo as private.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List what would be written and uploaded; change nothing.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it already holds files (a previous export).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a clean Hugging Face folder with a model card, and optionally push it to the Hub."""
    from llmprune.export import export_workdir

    res = export_workdir(open_workdir(ctx, workdir), out, format, base_model=base_model, adapter_base=adapter_base,
                         push_to_hub=push_to_hub, private=private, dry_run=dry_run, overwrite=overwrite)
    if dry_run:
        finish(res, as_json, lambda: report.table(
            f"would write {out}" + (f" and upload to {push_to_hub}" if push_to_hub else ""), ["file", "bytes"],
            [[f["path"], f["bytes"] if f["path"] != "README.md" else "(model card)"] for f in res["files"]]))
        return
    url = res["url"]
    finish(res, as_json, lambda: report.table(
        f"exported {out}" + (f" → {url}" if url else ""), ["file", "bytes"],
        [[rel, (out / rel).stat().st_size] for rel in res["files"]]))
