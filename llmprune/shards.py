"""Safetensors shards on disk: read any tensor by name, write a new checkpoint tensor by tensor as it is made.

A model larger than memory is never held whole: the engine reads one block's tensors, modifies them, and writes
them to new shards before the next block is read. Both directions therefore work on single tensors:

- ``ShardSet`` parses the headers of a folder's shards (``model.safetensors`` or the shards a
  ``model.safetensors.index.json`` names) and reads one tensor with a plain ``pread`` into memory the caller owns.
  Not ``mmap`` (``safe_open``): every page of a mapped file that a walk has touched stays in the process's resident
  set while the file is open, so a walk over a 16 GB model would show a 16 GB peak for pages it no longer needs.
- ``ShardWriter`` writes a checkpoint whose tensor list (names, dtypes, shapes) is known before the first byte: each
  shard's header is written first and every tensor goes straight to its place (``pwrite``), in whatever order the
  walk produces it, so nothing is buffered. Tensors a step did not change are copied byte for byte from the source,
  and a shard of only unchanged tensors is hard-linked.

The file format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header length, a JSON
header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the tensors' bytes with
offsets relative to the end of the header, contiguous and without holes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from llmprune.errors import IntegrityError
from llmprune.precision import STORED

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: its file (name inside the folder), dtype, shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct (``json`` keeps the last of two, hiding a tensor named twice)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"it names {twice!r} twice")
    return out


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_header(path: Path, error: type[Exception] = IntegrityError) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors of one ``.safetensors`` file and its metadata, checked: names unique, shapes and offsets whole
    numbers, offsets contiguous and inside the file, sizes matching dtype x shape. A damaged file is refused
    (``error``: an integrity error in a workdir, a user error for a source), not a crash when a tensor is read."""

    def bad(why: str) -> Exception:
        return error(f"{path} is not a valid safetensors file ({why}); the model cannot be read")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise bad("its header length is wrong")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_unique)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad("its header is not JSON") from None
        except ValueError as e:
            raise bad(str(e)) from None
    if not isinstance(header, dict):
        raise bad("its header is not a mapping")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries: dict[str, Entry] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"the entry of {name!r} is malformed") from None
        if not all(map(_whole, (*shape, b, e))) or not isinstance(dtype, str):
            raise bad(f"the entry of {name!r} has a shape or offsets that are not whole numbers")
        if dtype not in STORED:
            raise bad(f"{name!r} has the unsupported dtype {dtype}")
        if e - b != math.prod(shape) * STORED[dtype].itemsize:
            raise bad(f"the size of {name!r} does not match its shape")
        entries[name] = Entry(path.name, dtype, shape, base + b, base + e)
        spans.append((b, e))
    spans.sort()
    pos = 0
    for b, e in spans:
        if b != pos:
            raise bad("its tensors overlap or leave holes")
        pos = e
    if base + pos != size:
        raise bad("it is truncated or has trailing bytes")
    return entries, meta


class ShardSet:
    """The safetensors weights of one model folder, by tensor name. ``error``: the class raised for a folder whose
    files disagree (an integrity error for a workdir's model; a user error for a folder the user named)."""

    def __init__(self, folder: str | Path, error: type[Exception] = IntegrityError):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise error(f"{index} is not a valid shard index") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise error(f"{index} is not a valid shard index")
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise error(f"{self.folder} has neither {SINGLE} nor {INDEX}")
        self.files = files
        self.entries: dict[str, Entry] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for name in files:
            path = self.folder / name
            if "/" in name or name in ("", ".", "..") or not path.is_file():
                raise error(f"{index} names the shard {name!r}, which is not in {self.folder}: the model is incomplete")
            entries, meta = read_header(path, error)
            self.metadata[name] = meta
            for key, entry in entries.items():
                if key in self.entries:
                    raise error(f"tensor {key} is in two shards of {self.folder}")
                if weight_map is not None and weight_map.get(key) != name:
                    raise error(f"{index} does not say that {name} holds {key}")
                self.entries[key] = entry
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self.entries))
            if lost:
                raise error(f"{index} names {len(lost)} tensor(s) that no shard holds ({', '.join(lost[:3])})")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def tensors_of(self, file: str) -> list[str]:
        """The tensors of one shard, in the order of their bytes."""
        return sorted((k for k, e in self.entries.items() if e.file == file), key=lambda k: self.entries[k].begin)

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read into new CPU memory (the caller owns it; no file stays mapped)."""
        e = self.entries[name]
        return self._read(name, [(0, e.shape[0] if e.shape else 1)], e.shape[0] if e.shape else 1).reshape(e.shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along its first dimension), read alone."""
        return self._read(name, [(start, stop)], stop - start)

    def pick_rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """The rows ``index`` (sorted, distinct) of a tensor, read alone: what an embedding lookup of a few thousand
        tokens needs from a vocabulary of 128k or more."""
        idx = index.tolist()
        runs, begin = [], 0
        for i in range(1, len(idx) + 1):  # contiguous runs of rows become one read each
            if i == len(idx) or idx[i] != idx[i - 1] + 1:
                runs.append((idx[begin], idx[i - 1] + 1))
                begin = i
        return self._read(name, runs, len(idx))

    def _read(self, name: str, runs: list[tuple[int, int]], count: int) -> torch.Tensor:
        e = self.entries[name]
        shape = e.shape if e.shape else (1,)
        row = e.nbytes // max(shape[0], 1) if shape[0] else 0
        if any(not 0 <= a <= b <= shape[0] for a, b in runs):
            raise IndexError(f"rows {runs[:2]} out of range for {name} {e.shape}")
        buf = torch.empty(count * row, dtype=torch.uint8)
        view, pos = memoryview(buf.numpy()), 0
        with open(self.folder / e.file, "rb", buffering=0) as f:
            for a, b in runs:
                end = pos + (b - a) * row
                f.seek(e.begin + a * row)
                while pos < end:
                    n = f.readinto(view[pos:end])
                    if not n:
                        raise IntegrityError(f"{self.folder / e.file} ended inside tensor {name}")
                    pos += n
        return buf.view(STORED[e.dtype]).reshape(count, *shape[1:])


@dataclass(frozen=True)
class Planned:
    """One tensor of the checkpoint being written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORED[self.dtype].itemsize


def _layout(tensors: list[Planned]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A shard's header bytes and each tensor's absolute byte range. Larger items first, as safetensors itself
    orders them, so every tensor starts at a multiple of its item size (readers may map it in place)."""
    order = sorted(tensors, key=lambda t: (-STORED[t.dtype].itemsize, t.name))
    offsets, pos, header = {}, 0, {"__metadata__": {"format": "pt"}}
    for t in order:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.name] = (pos, pos + t.nbytes)
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    base = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: (base + b, base + e) for k, (b, e) in offsets.items()}


def shard_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-00001-of-0000N.safetensors`` (what transformers writes)."""
    return [SINGLE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(tensors: Iterable[Planned], max_bytes: int) -> list[list[Planned]]:
    """Tensors grouped in order into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own), the
    rule ``save_pretrained`` applies for ``--max-shard-size``."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


class ShardWriter:
    """A new checkpoint in ``out`` with the given shards (``{file name: [Planned]}``), filled tensor by tensor.

    ``put`` writes a tensor to its place as soon as it is made; ``copy`` takes a tensor byte for byte from a source
    ``ShardSet``; ``link`` hard-links a whole source shard that the plan keeps as it is. ``close`` checks that every
    planned tensor was written and writes the index (for more than one shard).
    """

    def __init__(self, out: Path, shards: dict[str, list[Planned]], linked: dict[str, "ShardSet"] | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.plan = shards
        self.where: dict[str, tuple[str, int, int, Planned]] = {}
        self.pending: set[str] = set()
        self._fds: dict[str, int] = {}
        self.linked = dict(linked or {})  # file name -> the source set it is linked from
        for file, tensors in shards.items():
            if file in self.linked:
                continue
            head, ranges = _layout(tensors)
            fd = os.open(self.out / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[file] = fd
            os.pwrite(fd, head, 0)
            end = max((e for _, e in ranges.values()), default=len(head))
            os.ftruncate(fd, end)
            for t in tensors:
                b, e = ranges[t.name]
                self.where[t.name] = (file, b, e, t)
                self.pending.add(t.name)
        for file, src in self.linked.items():
            os.link(src.folder / file, self.out / file)

    @classmethod
    def like(cls, out: Path, src: ShardSet, changed: set[str]) -> "ShardWriter":
        """The source's own layout (same files, same tensors): shards holding a changed tensor are rewritten, the
        others hard-linked."""
        plan, linked = {}, {}
        for file in src.files:
            names = src.tensors_of(file)
            plan[file] = [Planned(n, src.entries[n].dtype, src.entries[n].shape) for n in names]
            if not changed.intersection(names):
                linked[file] = src
        return cls(out, plan, linked)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        file, b, e, t = self.where[name]
        if tuple(tensor.shape) != t.shape:
            raise ValueError(f"{name}: got shape {tuple(tensor.shape)}, planned {t.shape}")
        # Each tensor keeps the checkpoint's dtype (a block computed in another dtype is cast back; zeros stay zeros).
        data = tensor.detach().to(device="cpu", dtype=STORED[t.dtype]).contiguous().reshape(-1).view(torch.uint8).numpy()
        view, pos = memoryview(data), 0
        while pos < e - b:
            pos += os.pwrite(self._fds[file], view[pos:], b + pos)
        self.pending.discard(name)

    def put_rows(self, name: str, start: int, rows: torch.Tensor, last: bool) -> None:
        """Rows ``start:start + len(rows)`` of a tensor (along its first dimension), so a large tensor is written a
        slice at a time; ``last`` marks the tensor written."""
        file, b, e, t = self.where[name]
        if tuple(rows.shape[1:]) != t.shape[1:] or start + rows.shape[0] > t.shape[0]:
            raise ValueError(f"{name}: rows {start}+{rows.shape[0]} of shape {tuple(rows.shape)}, planned {t.shape}")
        row = (e - b) // t.shape[0]
        data = rows.detach().to(device="cpu", dtype=STORED[t.dtype]).contiguous().reshape(-1).view(torch.uint8).numpy()
        view, pos = memoryview(data), 0
        while pos < len(view):
            pos += os.pwrite(self._fds[file], view[pos:], b + start * row + pos)
        if last:
            self.pending.discard(name)

    def copy(self, src: ShardSet, name: str) -> None:
        """A tensor byte for byte from ``src`` (no decode, no cast)."""
        file, b, e, t = self.where[name]
        entry = src.entries[name]
        if entry.dtype != t.dtype or entry.shape != t.shape:
            raise ValueError(f"{name}: the source holds {entry.dtype} {entry.shape}, planned {t.dtype} {t.shape}")
        with open(src.folder / entry.file, "rb", buffering=0) as f:
            done = 0
            while done < entry.nbytes:
                chunk = os.pread(f.fileno(), min(_COPY_CHUNK, entry.nbytes - done), entry.begin + done)
                if not chunk:
                    raise IntegrityError(f"{src.folder / entry.file} ended inside tensor {name}")
                os.pwrite(self._fds[file], chunk, b + done)
                done += len(chunk)
        self.pending.discard(name)

    def close(self, fill_from: ShardSet | None = None) -> None:
        """Finish: tensors not written are copied from ``fill_from`` (the unchanged ones), then every file is synced
        and the index written. A tensor still missing is a bug in the caller, never a checkpoint with a hole."""
        if fill_from is not None:
            for name in sorted(self.pending):
                if name in fill_from:
                    self.copy(fill_from, name)
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} planned tensor(s) were never written ({sorted(self.pending)[:3]})")
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()
        if len(self.plan) > 1 or SINGLE not in self.plan:
            total = sum(t.nbytes for ts in self.plan.values() for t in ts)
            weight_map = {t.name: f for f, ts in self.plan.items() for t in ts}
            (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                     "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n",
                                          encoding="utf-8")

    def abort(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
