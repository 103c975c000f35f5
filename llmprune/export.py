"""``export``: a clean Hugging Face folder with a model card written from the manifest, optionally pushed to the Hub."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from llmprune.errors import UserError
from llmprune.paths import printable
from llmprune.report import number as num

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)
_SKIP_PARAMS = {"json"}


FORMATS = ("merged", "peft", "adapter")
_HOW = {"merged": "It loads with plain transformers:",
        "peft": "This folder holds the pruned model and, in `adapter/`, its LoRA recovery adapter (peft):",
        "adapter": "This folder holds its LoRA recovery adapter (peft); the base is the pruned model it was trained on:"}


def _loading(fmt: str, base_id: str | None, repo: str | None = None) -> list[str]:
    """The card's loading snippet for each export format (``repo``: the Hub repo it is pushed to, when known)."""
    at = repo or "PATH_OR_REPO"
    if fmt == "merged":
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{at}")']
    if fmt == "peft":
        return ["from peft import PeftModel",
                "from transformers import AutoModelForCausalLM",
                f'base = AutoModelForCausalLM.from_pretrained("{at}")  # the pruned model',
                f'model = PeftModel.from_pretrained(base, "{at}", subfolder="adapter")  # + the LoRA adapter']
    return ["from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'base = AutoModelForCausalLM.from_pretrained("{base_id or "BASE_MODEL"}")  # the pruned model it was trained on',
            f'model = PeftModel.from_pretrained(base, "{at}")']


def _is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.fullmatch(source)) and not Path(source).exists() and not source.endswith(".gguf")


DATASETS_HUB = {"wikitext2": "Salesforce/wikitext", "c4": "allenai/c4", "ptb": "ptb-text-only/ptb_text_only"}


def _hub_dataset(source: Any) -> str | None:
    """The Hub id of a dataset source (a named one, or ``hf:NAME[:CONFIG[:SPLIT]]``); None for local files."""
    if not isinstance(source, str):
        return None
    if source.startswith("hf:"):
        return source[3:].split(":")[0] or None
    return DATASETS_HUB.get(source)


def _local_digests(manifest: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of the local files the steps name, so the card can name each by file name and digest: the GGUF's
    from the manifest, the others hashed now while they still exist (a file gone is named alone)."""
    from llmprune.fsio import sha256_file

    base = manifest.get("base_model", {})
    out = {base["source"]: base["sha256"]} if base.get("sha256") and base.get("source") else {}
    from llmprune.provenance import local_paths

    for s in manifest.get("steps", []):
        for v in s.get("params", {}).values():
            if not isinstance(v, str) or _hub_dataset(v):
                continue
            for path in local_paths(v):
                if path not in out and Path(path).is_file():
                    out[path] = sha256_file(Path(path))
    return out


def card_front_matter(manifest: dict[str, Any], fmt: str, base_model: str | None) -> tuple[str, list[str]]:
    """The card's YAML front matter (through huggingface_hub's ``ModelCardData``, so the Hub reads it as written)
    and the warnings for what a public card should carry but the workdir does not know."""
    from huggingface_hub import ModelCardData

    base = manifest.get("base_model", {})
    steps = manifest.get("steps", [])
    methods = sorted({s["params"].get("method") for s in steps if s["command"] == "prune" and s["params"].get("method")})
    datasets = sorted({d for s in steps if (d := _hub_dataset(s["params"].get("dataset")))})
    base_model = base_model or base.get("hub_id") or (base.get("source") if _is_hub_id(base.get("source", "")) else None)
    warnings = []
    if not base_model:
        warnings.append("the model card has no base_model: the source names no Hub id (a local file or folder); "
                        "pass export --base-model ORG/NAME")
    license_ = base.get("license")
    if not license_:
        warnings.append("the model card has no license: the source carries none that llmprune can read; check the "
                        "source's terms and add it to the card")
    data = ModelCardData(
        base_model=base_model, license=license_, library_name="peft" if fmt == "adapter" else "transformers",
        pipeline_tag="text-generation", tags=["pruned", "llmprune", *methods], datasets=datasets or None)
    return "---\n" + data.to_yaml() + "\n---", warnings


def source_line(base: dict[str, Any]) -> tuple[str, str]:
    """(title, sentence fragment) naming the source in public: a Hub id with its commit, a local file by name and
    SHA-256, a local folder by name."""
    src = base.get("source", "unknown")
    if _is_hub_id(src) or base.get("kind") == "hub":
        ident = base.get("commit") or base.get("revision")
        return src, f"`{src}`" + (f" (revision {ident})" if ident else "")
    name = Path(src).name or src
    if base.get("sha256"):
        return name, f"`{name}` (sha256 {base['sha256']})"
    return name, f"a local folder `{name}`" + (f" (Hub id {base['hub_id']})" if base.get("hub_id") else "")


def model_card(manifest: dict[str, Any], fmt: str = "merged", adapter_base: str | None = None,
               base_model: str | None = None, repo: str | None = None,
               sweep: tuple[list[dict[str, Any]], list[str]] | None = None) -> tuple[str, list[str]]:
    """README.md for the exported folder -- YAML front matter, how to load it, the lineage of steps, the evaluation
    table -- and the warnings about it. Local paths appear by file name (and SHA-256), never as this machine's
    paths."""
    from llmprune.provenance import public_name

    base = manifest.get("base_model", {})
    steps = manifest.get("steps", [])
    front, warnings = card_front_matter(manifest, fmt, base_model)
    digests = _local_digests(manifest)
    title, origin = source_line(base)
    lines = [
        front,
        "",
        f"# Pruned {title}",
        "",
        f"This model was produced by [llmprune](https://pypi.org/project/llmprune/) from {origin}"
        + f", a `{manifest.get('model_type', '?')}` model. " + _HOW[fmt],
        "",
        "```python",
        *_loading(fmt, adapter_base, repo),
        "```",
        "",
        "## Lineage",
        "",
        "| # | step | parameters | duration |",
        "|---|---|---|---|",
    ]
    for i, s in enumerate(steps, 1):
        params = ", ".join(
            f"{k}={public_name(v, digests)}" for k, v in s["params"].items() if v is not None and k not in _SKIP_PARAMS
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
            prev = _after(steps, idx)
            m = s["metrics"]
            lines.append(
                f"| {prev} | {public_name(s['params'].get('dataset'), digests)} | {s['params'].get('seqlen')} | "
                f"{m.get('windows')} | {num(m.get('perplexity'))} | {num(m.get('parameters'), ',')} | "
                f"{num((m.get('sparsity') or {}).get('all'), '.2%')} |"
            )
    lines += _task_table(steps, digests)
    if sweep:
        lines += _sweep_section(*sweep)
    v = steps[-1]["versions"] if steps else {}
    lines += ["", f"Made with llmprune {v.get('llmprune', '?')}, torch {v.get('torch', '?')}, "
              f"transformers {v.get('transformers', '?')}.", ""]
    return "\n".join(lines), warnings


def _after(steps: list[dict[str, Any]], i: int) -> str:
    """The command an eval at index ``i`` measured the result of (the last step before it that is not an eval)."""
    return next((p["command"] for p in reversed(steps[:i]) if p["command"] != "eval"), "-")


def _task_table(steps: list[dict[str, Any]], digests: dict[str, str]) -> list[str]:
    """The zero-shot results of every eval step that ran tasks (``eval --tasks``)."""
    from llmprune.provenance import public_name
    from llmprune.tasks import primary

    rows = []
    for i, s in enumerate(steps):
        prev = _after(steps, i)
        for name, m in (s["metrics"].get("tasks") or {}).items():
            value, err = primary(m), m.get("acc_stderr")
            rows.append(f"| {prev} | {public_name(name, digests)} | {int(m.get('examples', 0))} | "
                        + ("–" if value is None else f"{value:.4f}") + " | "
                        + ("–" if err is None else f"{err:.4f}") + " |")
        if s["metrics"].get("tasks_mean") is not None and len(s["metrics"].get("tasks") or {}) > 1:
            rows.append(f"| {prev} | mean | | {num(s['metrics']['tasks_mean'], '.4f')} | |")
    if not rows:
        return []
    return ["", "## Zero-shot tasks", "",
            "Accuracy measured by `llmprune eval --tasks` after the step it follows (lastword: the final word of "
            "each paragraph of the source, greedy; other tasks through lm-eval).", "",
            "| after step | task | examples | accuracy | stderr |", "|---|---|---|---|---|", *rows]


def _sweep_section(rows: list[dict[str, Any]], plots: list[str]) -> list[str]:
    """The sweep this workdir ran (``llmprune sweep``): its table and its plots (copied into ``plots/``)."""
    out = ["", "## Sweep", "", "Points pruned from the same calibrated model by `llmprune sweep` (each evaluated "
           "as above).", "", "| point | perplexity | parameters | sparsity | tasks mean | prefill × |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "done":
            continue
        sp, tm = num(r.get("achieved_sparsity"), ".2%"), num(r.get("tasks_mean"), ".4f")
        out.append(f"| {r.get('name')} | {num(r.get('perplexity'))} | {num(r.get('parameters'), ',')} | {sp} | {tm} | "
                   f"{r.get('prefill_speedup') or '–'} |")
    out += [""] + [f"![{Path(p).stem.replace('_', ' ')}](plots/{Path(p).name})" for p in plots]
    return out


def sweep_of(workdir: Path) -> tuple[list[dict[str, Any]], list[Path]] | None:
    """The rows and plots of the sweep in ``WORK/sweep``, if there is one that can be read (its plots: plain files,
    never links)."""
    from llmprune.workdir import SWEEP

    root = workdir / SWEEP
    try:
        rows = json.loads((root / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    return rows, sorted(p for p in root.glob("*.png") if p.is_file())  # links: refused by ws.manifest()


def set_adapter_base(adapter_dir: Path, base_id: str | None) -> None:
    """peft finds the base model of an adapter through ``base_model_name_or_path``: the Hub id the user names (never
    this machine's path)."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_id
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


_FILES_NOTE = re.compile(r"^<!-- llmprune export files: (\[.*\]) -->$", re.M)


def files_note(files: list[str]) -> str:
    """The line the card ends with: every file the export wrote (an HTML comment, unseen on the Hub), so a later
    ``--overwrite`` can tell an export it may replace from a folder the user has since put files into."""
    return f"<!-- llmprune export files: {json.dumps(sorted(files))} -->\n"


def foreign_files(folder: Path) -> list[str] | None:
    """What in ``folder`` an earlier ``export`` did not write, by the file list its card ends with (links count as
    foreign: never followed, never deleted through); None if ``folder`` is not an llmprune export at all."""
    card = folder / "README.md"
    try:
        text = card.read_text(encoding="utf-8") if not card.is_symlink() else ""
    except (OSError, UnicodeDecodeError):
        return None
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    note = _FILES_NOTE.search(text)
    if not re.search(r"^\s*-\s*llmprune\s*$", front, re.M) or not note:
        return None
    try:
        listed = set(json.loads(note.group(1))) | {"README.md"}
    except ValueError:
        return None
    return sorted({p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink() or p.is_file()}
                  - listed)


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
        foreign = foreign_files(out)
        if foreign is None:
            raise UserError(f"--overwrite replaces only an earlier llmprune export, and {out} is not one (no llmprune "
                            "model card with its file list on top); choose another --out")
        if foreign:
            raise UserError(f"--overwrite replaces only an earlier llmprune export, and {out} also holds "
                            f"{', '.join(map(printable, foreign[:3]))}" + (f" and {len(foreign) - 3} more" if
                                                                          len(foreign) > 3 else "")
                            + ", which no export wrote: move them away or choose another --out")


def build_folder(fill: Callable[[Path], None], card: str, out: Path) -> list[Path]:
    """Write the export folder: ``fill`` populates a temporary sibling, the card is added, then one rename puts it in
    place. Returns the files written. ``out`` must have passed ``check_out`` (what an existing folder may be)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    clear_leftovers(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fill(tmp)
        written = [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()]
        (tmp / "README.md").write_text(card.rstrip("\n") + "\n\n" + files_note(written), encoding="utf-8")
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


_LEFTOVER = re.compile(r"\.(tmp|old)-(\d+)$")


def clear_leftovers(out: Path) -> None:
    """Remove what a killed export left beside ``out`` (``.OUT.tmp-PID``, ``.OUT.old-PID``, names only an export
    makes) when the process that made it is gone."""
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = _LEFTOVER.search(p.name)
        if not (m and p.name == f".{out.name}.{m.group(1)}-{m.group(2)}"):
            continue
        try:
            os.kill(int(m.group(2)), 0)
            if int(m.group(2)) != os.getpid():
                continue  # still running: another export's work in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


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


def check_repo_id(value: str, flag: str) -> None:
    """A Hub repo id as the Hub accepts it (``huggingface_hub``'s own rules: ASCII letters, digits, ``-_.``, no
    ``--`` or ``..``), with its owner: refused before anything is written."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not _HUB_ID.fullmatch(value):  # ASCII, no trailing newline (``$`` would allow one)
            raise HFValidationError("use OWNER/NAME")
        validate_repo_id(value)
    except HFValidationError as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else "use OWNER/NAME"
        raise UserError(f"{flag} {printable(value)} is not a Hub repo id ({why})") from None
