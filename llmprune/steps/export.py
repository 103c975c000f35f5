"""The ``export`` command: a clean Hugging Face folder with a model card (``llmprune.export`` makes the card and
the folder), optionally pushed to the Hub. It writes outside the workdir and records nothing in it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


from llmprune import report
from llmprune.current import has_adapter, load_current, peft_exact, pending_adapter
from llmprune.errors import UserError
from llmprune.card import model_card
from llmprune import gguf_write
from llmprune.export import (DEFAULT_COMMIT_MESSAGE, FORMATS, build_folder, built_already, check_out, check_repo_id,
                             planned_files, push, require_token, set_adapter_base, sweep_of)
from llmprune.modeling import save_model
from llmprune.options import REQUIRED, check_all, option
from llmprune.steps import KINDS
from llmprune.steps.base import Step
from llmprune.workdir import Workdir


CARD, HUB, GGUF = "The model card", "The Hub", "GGUF"


@dataclass(frozen=True)
class ExportOptions:
    """What ``llmprune export`` was asked for (not recorded: export changes nothing in the workdir)."""

    out: Path = option(REQUIRED, "Folder to write (must be new or empty).")
    format: str = option("merged", "merged: the model (an unmerged adapter folded in); peft: the base model + "
                         "adapter/ (after `recover --no-merge`); adapter: the LoRA adapter alone; gguf: one GGUF file "
                         "for llama.cpp and Ollama (see --gguf-type).", choices=FORMATS)
    gguf_type: str = gguf_write.gguf_type_option("--format gguf: the file's type", panel=GGUF)
    base_model: Optional[str] = option(None, "Hub id of the model this one was pruned from, for the card's "
                                       "base_model (default: the source's Hub id, when it has one).", panel=CARD)
    adapter_base: Optional[str] = option(None, "Hub id written as the adapter's base_model_name_or_path (peft/adapter; "
                                         "default: --push-to-hub's repo for peft).", panel=CARD)
    push_to_hub: Optional[str] = option(None, "Also upload to this Hub repo id (run the same command again to retry a "
                                        "failed upload: the folder is not rebuilt).", panel=HUB)
    private: bool = option(False, "Create the Hub repo as private.", panel=HUB)
    dry_run: bool = option(False, "List what would be written and uploaded; change nothing.")
    overwrite: bool = option(False, "Replace --out if it already holds files (a previous export).")
    license: Optional[str] = option(None, "The card's license (an SPDX id or the Hub's name for it, e.g. apache-2.0); "
                                    "default: the source's, when it names one.", panel=CARD)
    revision: Optional[str] = option(None, "--push-to-hub: upload to this branch (created if needed) instead of "
                                     "main.", panel=HUB)
    create_pr: bool = option(False, "--push-to-hub: open a pull request with the upload instead of committing to the "
                             "branch.", panel=HUB)
    commit_message: Optional[str] = option(None, f"--push-to-hub: the commit's message (default: "
                                           f"'{DEFAULT_COMMIT_MESSAGE}').", panel=HUB)


MODELFILE = "Modelfile"  # Ollama's recipe for the GGUF: ``ollama create NAME -f Modelfile``


def run(ws: Workdir, o: ExportOptions) -> dict[str, Any]:
    """The ``export`` command: a clean folder (the model, base + adapter, or the adapter) with a model card, and
    optionally its upload. With ``dry_run``, only the list of what would be written. A push that failed is retried by
    running the same command again: the folder it left is uploaded without being rebuilt (``built_already``)."""
    check_all(o)
    for flag, value in (("--push-to-hub", o.push_to_hub), ("--base-model", o.base_model),
                        ("--adapter-base", o.adapter_base)):
        if value is not None:
            check_repo_id(value, flag)
    hub_only = [f for f, v in (("--revision", o.revision), ("--create-pr", o.create_pr or None),
                               ("--commit-message", o.commit_message)) if v is not None]
    if hub_only and o.push_to_hub is None:
        raise UserError(f"{', '.join(hub_only)} set the upload: add --push-to-hub REPO")
    if o.gguf_type != "f16" and o.format != "gguf":
        raise UserError("--gguf-type sets the GGUF file's type: add --format gguf")
    ws.manifest()  # a missing or foreign folder is refused before the lock would create anything in it
    with ws.locked():  # a step committing meanwhile would mix its weights with the card of the state before
        return _export(ws, o)


def _export(ws: Workdir, o: ExportOptions) -> dict[str, Any]:
    out, fmt, push_to_hub = o.out, o.format, o.push_to_hub
    manifest = ws.manifest()
    retry = push_to_hub is not None and not o.overwrite and out.is_dir() and any(out.iterdir())
    check_out(out, ws.path, o.overwrite or retry)  # a retry's folder is checked against the card below
    ws.verify("model")
    pending = pending_adapter(manifest)
    adapter = ws.path / "adapter"
    if fmt in ("peft", "adapter"):
        if not has_adapter(manifest):
            raise UserError(f"{ws.path} has no adapter; run `llmprune recover` first (or export --format merged)")
        ws.verify("adapter")
    if fmt == "peft":
        if pending is None:
            raise UserError("the adapter is already merged into the model (recover --merge); export --format merged, "
                            "or recover with --no-merge to ship the base model + adapter")
        if not peft_exact(pending):
            raise UserError("the adapter was trained through the zero pattern of a sparse model (recover --masked): "
                            "plain peft would apply it densely, another model; export --format merged, or recover "
                            "with --no-masked")
    base_id = o.adapter_base or (push_to_hub if fmt == "peft" else None)
    parts = {"merged": {".": ws.model_dir}, "peft": {".": ws.model_dir, "adapter": adapter},
             "adapter": {".": adapter}, "gguf": {}}[fmt]
    gguf_file = gguf_write.file_name(out.name, o.gguf_type) if fmt == "gguf" else None
    if gguf_file is not None:
        from transformers import AutoConfig

        gguf_write.check(AutoConfig.from_pretrained(ws.model_dir))  # what llama.cpp cannot run: refused here
    if o.dry_run:
        planned = planned_files(parts) + ([(gguf_file, None), (MODELFILE, None)] if gguf_file else [])
        return {"dry_run": True, "out": str(out), "format": fmt, "push_to_hub": push_to_hub,
                "files": [{"path": p, "bytes": b} for p, b in sorted(planned)], "url": None, "warnings": []}
    if push_to_hub:
        require_token()  # before writing anything

    sweep = sweep_of(ws.path)

    def fill(tmp: Path) -> None:
        if gguf_file is not None:
            tmp.mkdir(parents=True)
            gguf_write.from_workdir(ws, tmp / gguf_file, o.gguf_type, out.name, o.license)
            (tmp / MODELFILE).write_text(f"FROM ./{gguf_file}\n", encoding="utf-8")
        elif fmt == "merged" and pending is not None:
            model, tok = load_current(ws)  # model/ was hashed above: ws.verify does not hash it again
            save_model(model, tok, tmp, ws.shard_size)
        else:
            for dest, src in parts.items():
                shutil.copytree(src, tmp / dest, dirs_exist_ok=True)
            if fmt in ("peft", "adapter"):
                set_adapter_base(tmp / ("adapter" if fmt == "peft" else "."), base_id)
        for png in sweep[1] if sweep else []:  # the card shows them
            (tmp / "plots").mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, tmp / "plots" / png.name)

    card, warnings = model_card(manifest, fmt, base_id, o.base_model, push_to_hub,
                                (sweep[0], [p.name for p in sweep[1]]) if sweep else None, o.license,
                                exact_adapter=pending is None or peft_exact(pending), gguf_file=gguf_file)
    for w in warnings:
        report.warn(w)
    files = built_already(out, card) if retry else None
    if retry and files is None:
        raise UserError(f"{out} exists and is not empty; choose an empty or new --out (or pass --overwrite)")
    if files is None:
        files = [p.relative_to(out).as_posix() for p in build_folder(fill, card, out)]
    else:
        report.info(f"{out} already holds this export (an upload that failed?): uploading it without rebuilding")
    url = push(out, push_to_hub, o.private, revision=o.revision, create_pr=o.create_pr,
               commit_message=o.commit_message) if push_to_hub else None
    # the same document as a dry run's: what was written (a dry run: what would be), and where it went
    return {"dry_run": False, "out": str(out), "format": fmt, "push_to_hub": push_to_hub,
            "files": [{"path": f, "bytes": (out / f).stat().st_size} for f in sorted(files)], "url": url,
            "warnings": warnings}


STEP = Step("export", ExportOptions, run, "Write a clean Hugging Face folder with a model card, and optionally push it "
            "to the Hub.", kind=KINDS["export"])
