"""Resume checkpoints of the training steps (``recover``, ``regularize``): where a run's checkpoint lives and what
it is keyed on, the corrected teacher kept beside it, and the cleanup once the step commits.

The checkpoint itself (trainable weights, optimiser state, history; verified before it is trusted) is written and
read by ``train.train``. This module decides which run a checkpoint belongs to: a checkpoint resumes only the run
that wrote it -- same parameters, same model files, same training data, same teacher -- so a changed recipe, an
edited text file or a replaced teacher folder starts afresh instead of continuing a stale run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune import report

RESUME = ".resume"


def path_stamp(source: str) -> list | None:
    """What identifies a local file or model folder's contents cheaply: each file's name, size and modification
    time (hashing a 7B teacher's shards would cost a minute per run). ``None`` for a Hub id, which names itself."""
    path = Path(source)
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    if path.is_dir():  # a model folder's files are at its top (a teacher of "/" must not walk the whole disk)
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()]
    return None


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's values, shape and dtype: the training windows themselves, whatever text, seqlen and
    hold-out split made them."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def files_under(manifest: dict[str, Any], *prefixes: str) -> dict[str, str]:
    """The manifest's file hashes under the given folders (``model``, ``calib``, ``teacher``)."""
    return {k: v for k, v in manifest["files"].items() if k.split("/", 1)[0] in prefixes}


def checkpoint_dir(workdir: Path, command: str, key: Any) -> Path:
    """``WORK/.resume/COMMAND-KEY``: the checkpoint of the one run ``key`` (JSON-able) describes."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return workdir / RESUME / f"{command}-{digest[:16]}"


def clear(workdir: Path, command: str, this: Path | None, started: float) -> None:
    """After the step committed: its model/ changed, so no checkpoint of ``command`` in this workdir can resume any
    more -- this run's (``this``; None when it kept none), nor one an earlier run of other parameters or data left
    (keyed on the old model, it would only hold the disk). One written since this run began (``started``, a
    ``time.time()``) belongs to a run started after it, and is left. Under ``accelerate launch`` only the main
    process, the one that writes checkpoints and commits, clears them: another may finish before the commit, and a
    commit that then fails must still find the checkpoint."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if this is not None:
        shutil.rmtree(this, ignore_errors=True)
    for stale in (workdir / RESUME).glob(f"{command}-*"):
        if stale.stat().st_mtime < started:
            shutil.rmtree(stale, ignore_errors=True)


def kept_teacher(where: Path) -> tuple[nn.Module, dict[str, Any]] | None:
    """The corrected teacher an interrupted run kept beside its checkpoint (``keep_teacher``) and its correction
    record (marked ``reused``), or None. One that does not load (a damaged shard) is discarded with a warning, to be
    corrected again."""
    from llmprune.modeling import load_model

    kept = where / "teacher"
    record = kept / "correction.json"
    if not record.is_file():
        return None
    try:
        teacher = load_model(kept, "float32")[0]
        correction = {**json.loads(record.read_text()), "reused": True}
    except Exception as e:  # noqa: BLE001 -- whatever broke it, the cure is the same: correct it again
        report.warn(f"discarding the kept corrected teacher ({type(e).__name__}: {e}); correcting it again")
        shutil.rmtree(kept, ignore_errors=True)
        return None
    return teacher.eval().requires_grad_(False), correction


def keep_teacher(teacher: nn.Module, tok, where: Path, correction: dict[str, Any], shard_size) -> None:
    """Keep a corrected teacher beside the checkpoint in ``where`` (one fp32 copy on disk until the step commits),
    so that an interrupted run resumes with the same teacher instead of correcting it again. Under ``accelerate
    launch`` every process corrected its own copy (DDP keeps them equal) and only the main one keeps it."""
    from llmprune.modeling import save_model

    if int(os.environ.get("RANK", "0")) != 0:
        return
    kept, tmp = where / "teacher", where / "teacher.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_model(teacher.to("cpu"), tok, tmp, shard_size)
    (tmp / "correction.json").write_text(json.dumps(correction))
    shutil.rmtree(kept, ignore_errors=True)  # one without its record (never renamed whole) is not trusted
    tmp.rename(kept)  # whole or absent: a kill mid-save leaves only teacher.tmp, redone next time


def pending(workdir: Path) -> list[dict[str, Any]]:
    """The checkpoints interrupted runs left in a workdir, for ``status``: the step they are of, the last step saved
    (None when the state does not read: the rerun discards it), the bytes they hold, and a kept teacher. Rerunning
    the same command with the same options resumes one; any step that commits clears its command's."""
    out = []
    for d in sorted((workdir / RESUME).glob("*-*")):
        if not d.is_dir():
            continue
        try:
            state = json.loads((d / "state.json").read_text(encoding="utf-8"))
            # A state that names no tensors file is of an earlier version's layout: the rerun discards it.
            step = state["step"] if (d / str(state["tensors"])).is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            step = None
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        out.append({"command": d.name.rsplit("-", 1)[0], "path": str(d), "step": step, "bytes": size,
                    "teacher": (d / "teacher" / "correction.json").is_file()})
    return out
