"""File utilities every module that writes shares: SHA-256 of files and trees, writes that readers never see
half-done (a temporary file, fsync, rename), and strict JSON (no NaN or infinity, which JSON does not have)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None: JSON has no such numbers (Python's ``NaN`` and
    ``Infinity`` tokens are not JSON, and other readers refuse the manifest or the ``--json`` output)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (see ``json_safe``)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def hash_tree(root: Path, rel_to: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """SHA-256 of every file under ``root``, keyed by the path relative to ``rel_to``. ``known``: digests already
    established for some of them (a shard hard-linked from the previous state is the same inode: not re-read)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(rel_to).as_posix()
            out[rel] = (known or {}).get(rel) or sha256_file(p)
    return out
