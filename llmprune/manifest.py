"""The manifest's schema: what ``manifest.json`` (and a pending commit's or a snapshot's) must hold before any
command reads it, and the names in it, checked to stay inside the workdir. A file that is not one is refused: an
integrity error (exit 4), or, for another program's ``manifest.json``, not a workdir at all (exit 1)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprune import __version__
from llmprune.errors import IntegrityError, UserError
from llmprune.steps import RECORDED

FORMAT_VERSION = 1
# What every step record holds, and the type each field must have (what the commands read without checking again).
_STEP_FIELDS = {"command": str, "params": dict, "started": str, "duration_s": (int, float), "inputs": dict,
                "outputs": dict, "metrics": dict}
_HEADER_FIELDS = {"base_model": dict, "model_type": str, "calibration": dict}
_CALIBRATION_FIELDS = {"source": str, "seed": int, "samples": int, "seqlen": int}


def checked_name(rel: Any, what: str, *, top_level: bool = False) -> str:
    """A name read from the workdir's metadata (the manifest's file list, a pending commit's removal list, a
    snapshot's manifest), checked to be a relative path that stays inside the workdir: a crafted name must never make
    a command rename, link or hash a file elsewhere on the machine. ``top_level``: a single path component."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (not parts or rel.startswith("/") or "\\" in rel or "\x00" in rel
            or any(p in ("", ".", "..") for p in parts) or (top_level and len(parts) > 1)):
        raise IntegrityError(f"{what} names {rel!r}, which is not a path inside the workdir; its metadata was "
                             "altered, so the workdir is refused")
    return rel


def check_files(manifest: Any, where: Path) -> None:
    """The manifest's shape: a mapping of names inside the workdir to SHA-256 digests, a list of step records with
    the fields and types the commands read, and the header fields a calibrated workdir has. Anything else means the
    file was edited or damaged: refused as an integrity error, never a crash half-way through a command."""

    def bad(what: str) -> IntegrityError:
        return IntegrityError(f"{where}: {what}; the workdir's metadata was altered, so the workdir is refused")

    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(manifest.get("steps"), list):
        raise bad("no valid file list or step list")
    for rel, digest in files.items():
        checked_name(rel, str(where))
        if not isinstance(digest, str):
            raise bad(f"the hash recorded for {rel!r} is not a string")
    for i, step in enumerate(manifest["steps"], 1):
        if not isinstance(step, dict):
            raise bad(f"step {i} is not a record")
        for key, typ in _STEP_FIELDS.items():
            if not isinstance(step.get(key), typ) or isinstance(step.get(key), bool):
                raise bad(f"step {i} has no valid '{key}'")
        if "recipe" in step and not isinstance(step["recipe"], dict):
            raise bad(f"step {i} has an invalid 'recipe' tag")
        for key in ("inputs", "outputs"):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in step[key].items()):
                raise bad(f"step {i} has an invalid '{key}' list")
    commands = [step["command"] for step in manifest["steps"]]
    if commands and (commands[0] != "calibrate" or not set(commands) <= RECORDED):
        raise bad(f"its steps ({', '.join(map(repr, commands))}) are not a pipeline that starts with calibrate")
    if manifest["steps"]:
        for part in ("model", "calib"):
            if not any(rel.startswith(part + "/") for rel in files):
                raise bad(f"no {part}/ files recorded")
        for key, typ in _HEADER_FIELDS.items():
            if not isinstance(manifest.get(key), typ):
                raise bad(f"no valid '{key}'")
        cal = manifest["calibration"]
        for key, typ in _CALIBRATION_FIELDS.items():
            if not isinstance(cal.get(key), typ) or isinstance(cal.get(key), bool):
                raise bad(f"no valid calibration '{key}'")


def read_manifest(path: Path) -> dict[str, Any]:
    """An llmprune manifest read and checked (format version, ``check_files``): a file that is not one is refused."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not {"format_version", "files", "steps"} & set(data):
        # another program's manifest.json (a web app's, say): this folder is not a workdir at all
        raise UserError(f"{path.parent} is not an llmprune workdir ({path.name} is another program's)")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise IntegrityError(f"{path} is not an llmprune manifest (no format version): it was damaged or replaced, "
                             "so the workdir is refused")
    if version != FORMAT_VERSION:
        raise UserError(f"{path} has format version {version}; this llmprune ({__version__}) reads version "
                        f"{FORMAT_VERSION}")
    check_files(data, path)
    return data


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "llmprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Step:
    """One entry of the manifest's append-only step list, filled in while the step runs."""

    command: str
    params: dict[str, Any]
    started: str = field(default_factory=now_iso)
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def to_json(self, *, verified: bool = True, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
        """``verified``: whether the step's inputs were hashed before it read them; ``recipe``: the recipe entry
        that ran it (``llmprune run``), so a re-run knows what is done."""
        tag = {"recipe": recipe} if recipe else {}
        if not verified:
            tag["inputs_verified"] = False
        return {
            **tag,
            "command": self.command,
            "params": self.params,
            "versions": versions(),
            "started": self.started,
            "duration_s": round(time.perf_counter() - self._t0, 3),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "metrics": self.metrics,
        }
