"""``export``'s folder and Hub upload: what ``--out`` may be, the folder written whole then renamed, the push (the
model card is ``llmprune.card``)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from llmprune.errors import UserError
from llmprune.paths import printable
from llmprune.card import HUB_ID

FORMATS = ("merged", "peft", "adapter", "gguf")
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


DEFAULT_COMMIT_MESSAGE = "Upload pruned model (llmprune)"


def require_token() -> None:
    """A Hub token must be there before anything is written or uploaded (the usual HF environment or login)."""
    import huggingface_hub

    if not huggingface_hub.get_token():
        raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN before --push-to-hub")


def push(folder: Path, repo_id: str, private: bool, *, revision: str | None = None, create_pr: bool = False,
         commit_message: str | None = None) -> str:
    """Create the repo (and the branch ``revision``) and upload the folder, as a pull request with ``create_pr``;
    returns the repo's URL, or the pull request's. The token comes from the usual HF environment / login only."""
    import huggingface_hub

    require_token()
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 create_pr=create_pr, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE)
    except Exception as e:  # network, auth and permission errors all end here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"push to {repo_id} failed: {first[:300]}; the folder is complete: run the same command "
                        "again to retry the upload alone") from None
    pr = getattr(info, "pr_url", None)
    return str(pr or url)


def built_already(out: Path, card: str) -> list[str] | None:
    """The files of an export already in ``out`` that this export would write again -- its card is this card and
    every file its card lists is there -- so that re-running a push that failed uploads it without rebuilding;
    None otherwise."""
    readme = out / "README.md"
    try:
        text = readme.read_text(encoding="utf-8") if readme.is_file() and not readme.is_symlink() else ""
    except (OSError, UnicodeDecodeError):
        return None
    note = _FILES_NOTE.search(text)
    if not note or text[:note.start()].rstrip("\n") != card.rstrip("\n") or foreign_files(out):
        return None
    listed = json.loads(note.group(1))
    return listed + ["README.md"] if all((out / f).is_file() for f in listed) else None


def check_repo_id(value: str, flag: str) -> None:
    """A Hub repo id as the Hub accepts it (``huggingface_hub``'s own rules: ASCII letters, digits, ``-_.``, no
    ``--`` or ``..``), with its owner: refused before anything is written."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not HUB_ID.fullmatch(value):  # ASCII, no trailing newline (``$`` would allow one)
            raise HFValidationError("use OWNER/NAME")
        validate_repo_id(value)
    except HFValidationError as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else "use OWNER/NAME"
        raise UserError(f"{flag} {printable(value)} is not a Hub repo id ({why})") from None
