"""``export``: a clean Hugging Face folder with a model card written from the manifest, optionally pushed to the Hub."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from llmprune.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SKIP_PARAMS = {"json"}


FORMATS = ("merged", "peft", "adapter")
_HOW = {"merged": "It loads with plain transformers:",
        "peft": "This folder holds the pruned model and, in `adapter/`, its LoRA recovery adapter (peft):",
        "adapter": "This folder holds its LoRA recovery adapter (peft); the base is the pruned model it was trained on:"}


def _loading(fmt: str, base_id: str | None) -> list[str]:
    """The card's loading snippet for each export format."""
    if fmt == "merged":
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")']
    if fmt == "peft":
        return ["from peft import PeftModel",
                "from transformers import AutoModelForCausalLM",
                'base = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")  # the pruned model',
                'model = PeftModel.from_pretrained(base, "PATH_OR_REPO", subfolder="adapter")  # + the LoRA adapter']
    return ["from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'base = AutoModelForCausalLM.from_pretrained("{base_id or "BASE_MODEL"}")  # the pruned model it was trained on',
            'model = PeftModel.from_pretrained(base, "PATH_OR_REPO")']


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).exists() and not source.endswith(".gguf")


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {v}" for v in values] if values else []


def model_card(manifest: dict[str, Any], fmt: str = "merged", base_id: str | None = None) -> str:
    """README.md for the exported folder: YAML front matter, how to load it, the lineage of steps, the evaluation
    table."""
    base = manifest.get("base_model", {})
    steps = manifest.get("steps", [])
    methods = sorted({s["params"].get("method") for s in steps if s["command"] == "prune" and s["params"].get("method")})
    datasets = sorted(
        {s["params"].get("dataset") for s in steps if s["params"].get("dataset")} & {"wikitext2", "c4", "ptb"}
    )
    datasets_hub = {"wikitext2": "Salesforce/wikitext", "c4": "allenai/c4", "ptb": "ptb-text-only/ptb_text_only"}
    front = ["---"]
    if _is_hub_id(base.get("source", "")):
        front.append(f"base_model: {base['source']}")
    front.append(f"library_name: {'peft' if fmt == 'adapter' else 'transformers'}")
    front += _yaml_list("tags", ["pruned", "llmprune", *methods])
    front += _yaml_list("datasets", [datasets_hub[d] for d in datasets])
    front.append("---")

    src = base.get("source", "unknown")
    ident = base.get("revision") or (f"sha256 {base['sha256'][:16]}…" if base.get("sha256") else "")
    lines = [
        *front,
        "",
        f"# Pruned {Path(src).name if not _is_hub_id(src) else src}",
        "",
        f"This model was produced by [llmprune](https://pypi.org/project/llmprune/) from `{src}`"
        + (f" ({ident})" if ident else "")
        + f", a `{manifest.get('model_type', '?')}` model. " + _HOW[fmt],
        "",
        "```python",
        *_loading(fmt, base_id),
        "```",
        "",
        "## Lineage",
        "",
        "| # | step | parameters | duration |",
        "|---|---|---|---|",
    ]
    for i, s in enumerate(steps, 1):
        params = ", ".join(
            f"{k}={v}" for k, v in s["params"].items() if v is not None and k not in _SKIP_PARAMS
        )
        lines.append(f"| {i} | `{s['command']}` | {params} | {s['duration_s']:.1f} s |")
    evals = [s for s in steps if s["command"] == "eval"]
    if evals:
        lines += [
            "",
            "## Evaluation",
            "",
            "Perplexity over non-overlapping windows (mean next-token NLL), measured by `llmprune eval` after the "
            "step it follows.",
            "",
            "| after step | dataset | seqlen | windows | perplexity | parameters | sparsity (block Linears) |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in evals:
            idx = steps.index(s)
            prev = next((p["command"] for p in reversed(steps[:idx]) if p["command"] != "eval"), "-")
            m = s["metrics"]
            lines.append(
                f"| {prev} | {s['params'].get('dataset')} | {s['params'].get('seqlen')} | {m.get('windows')} | "
                f"{m.get('perplexity', float('nan')):.3f} | {m.get('parameters', 0):,} | "
                f"{m.get('sparsity', {}).get('all', 0.0):.2%} |"
            )
    v = steps[-1]["versions"] if steps else {}
    lines += ["", f"Made with llmprune {v.get('llmprune', '?')}, torch {v.get('torch', '?')}, "
              f"transformers {v.get('transformers', '?')}.", ""]
    return "\n".join(lines)


def set_adapter_base(adapter_dir: Path, base_id: str | None) -> None:
    """peft finds the base model of an adapter through ``base_model_name_or_path``: the Hub id the user names (never
    this machine's path)."""
    import json

    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_id
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def is_earlier_export(folder: Path) -> bool:
    """Whether ``folder`` is what an earlier ``export`` wrote: llmprune's model card on top, and no workdir inside."""
    card = folder / "README.md"
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    if not re.search(r"^\s*-\s*llmprune\s*$", front, re.M):
        return False
    return not any(p.name == "manifest.json" for p in folder.rglob("manifest.json"))


def check_out(out: Path, workdir: Path, overwrite: bool) -> None:
    """``--out`` may be new, empty, or (with ``overwrite``) an earlier export -- never the workdir, a folder holding
    it, or a folder inside it, whose replacement would delete the workdir (and the user's other files)."""
    o, w = out.resolve(), workdir.resolve()
    if _within(w, o):
        raise UserError(f"--out {out} {'is' if o == w else 'contains'} the workdir {workdir}; export to a folder "
                        "outside it")
    if _within(o, w):
        raise UserError(f"--out {out} is inside the workdir {workdir}; export to a folder outside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} exists and is not empty; choose an empty or new --out (or pass --overwrite)")
        if not is_earlier_export(out):
            raise UserError(f"--overwrite replaces only an earlier llmprune export, and {out} is not one (no llmprune "
                            "model card on top, or a workdir inside); choose another --out")


def build_folder(fill: Callable[[Path], None], card: str, out: Path) -> list[Path]:
    """Write the export folder: ``fill`` populates a temporary sibling, the card is added, then one rename puts it in
    place. Returns the files written. ``out`` must have passed ``check_out`` (what an existing folder may be)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fill(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # The old folder steps aside only once the new one is complete: a failure leaves one or the other.
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return sorted(p for p in out.rglob("*") if p.is_file())


def planned_files(parts: dict[str, Path]) -> list[tuple[str, int]]:
    """``{folder inside the export: source folder}`` → the (path, bytes) that would be written."""
    files = [((Path(dest) / p.relative_to(src)).as_posix(), p.stat().st_size)
             for dest, src in parts.items() for p in src.rglob("*") if p.is_file() and p.name != "README.md"]
    return sorted(files + [("README.md", 0)])


def push(folder: Path, repo_id: str, private: bool) -> str:
    """Create the repo and upload the folder. The token comes from the usual HF environment / login only."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN before --push-to-hub")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload pruned model (llmprune)")
    except Exception as e:  # network, auth and permission errors all end here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"push to {repo_id} failed: {first[:300]}") from None
    return str(url)


def export_workdir(ws, out: Path, fmt: str = "merged", *, base_model: str | None = None,
                   push_to_hub: str | None = None, private: bool = False, dry_run: bool = False,
                   overwrite: bool = False) -> dict[str, Any]:
    """The ``export`` command: a clean folder (the model, base + adapter, or the adapter) with a model card, and
    optionally its upload. With ``dry_run``, only the list of what would be written."""
    from llmprune import recovery
    from llmprune.modeling import load_current, save_model

    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    manifest = ws.manifest()
    check_out(out, ws.path, overwrite)
    if push_to_hub and not _HUB_ID.match(push_to_hub):
        raise UserError(f"--push-to-hub {push_to_hub!r} is not a Hub repo id; use OWNER/NAME")
    ws.verify("model")
    pending = recovery.pending_adapter(manifest)
    adapter = ws.path / "adapter"
    if fmt != "merged":
        if not recovery.has_adapter(manifest):
            raise UserError(f"{ws.path} has no adapter; run `llmprune recover` first (or export --format merged)")
        ws.verify("adapter")
    if fmt == "peft":
        if pending is None:
            raise UserError("the adapter is already merged into the model (recover --merge); export --format merged, "
                            "or recover with --no-merge to ship the base model + adapter")
        if not recovery.peft_exact(pending):
            raise UserError("the adapter was trained through the zero pattern of a sparse model (recover --masked): "
                            "plain peft would apply it densely, another model; export --format merged, or recover "
                            "with --no-masked")
    base_id = base_model or (push_to_hub if fmt == "peft" else None)
    parts = {"merged": {".": ws.model_dir}, "peft": {".": ws.model_dir, "adapter": adapter},
             "adapter": {".": adapter}}[fmt]
    if dry_run:
        return {"dry_run": True, "out": str(out), "format": fmt, "push_to_hub": push_to_hub,
                "files": [{"path": p, "bytes": b} for p, b in planned_files(parts)]}
    if push_to_hub:
        from huggingface_hub import get_token

        if not get_token():  # check before writing anything
            raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN before --push-to-hub")

    def fill(tmp: Path) -> None:
        if fmt == "merged" and pending is not None:
            model, tok = load_current(ws)  # model/ was hashed above: ws.verify does not hash it again
            save_model(model, tok, tmp, ws.shard_size)
            return
        for dest, src in parts.items():
            shutil.copytree(src, tmp / dest, dirs_exist_ok=True)
        if fmt != "merged":
            set_adapter_base(tmp / ("adapter" if fmt == "peft" else "."), base_id)

    written = build_folder(fill, model_card(manifest, fmt, base_id), out)
    url = push(out, push_to_hub, private) if push_to_hub else None
    return {"out": str(out), "format": fmt, "files": [p.relative_to(out).as_posix() for p in written], "url": url}
