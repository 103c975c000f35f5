"""Where a model came from, as its model card must say it: the source's license and Hub id, read from what the
source itself carries (a GGUF's ``general.*`` metadata, a folder's or Hub snapshot's model card), and how a local
file is named in public (by name and SHA-256, never by the path of the machine that made it)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmprune.errors import UserError

# GGUF value types (ggml's gguf.h) -> byte size of a scalar; 8 is a string, 9 an array.
_GGUF_SCALAR = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
                7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+?)/?$")
_HUB_CACHE = re.compile(r"models--([^/]+?)--([^/]+)$")


def gguf_metadata(path: Path, prefix: str = "general.") -> dict[str, Any]:
    """The key-values of a GGUF header whose key starts with ``prefix``, without reading tensors or decoding the
    other values: the gguf package's reader parses every field (a 262k-entry vocabulary takes seconds here) to
    answer the same. Strings and scalars are returned as values, arrays of them as lists."""
    import struct

    def fail(why: str):
        return UserError(f"{path} is not a readable GGUF file ({why})")

    out: dict[str, Any] = {}
    size = path.stat().st_size
    with open(path, "rb") as f:
        def take(n: int) -> bytes:
            if n > size - f.tell():  # a count that lies: never ask for more bytes than the file has
                raise fail("truncated header")
            b = f.read(n)
            if len(b) != n:
                raise fail("truncated header")
            return b

        def u64() -> int:
            return struct.unpack("<Q", take(8))[0]

        def value(kind: int, keep: bool) -> Any:
            if kind in _GGUF_SCALAR:
                fmt, size = _GGUF_SCALAR[kind]
                if not keep:
                    f.seek(size, 1)
                    return None
                return struct.unpack(fmt, take(size))[0]
            if kind == 8:
                n = u64()
                if not keep:
                    f.seek(n, 1)
                    return None
                return take(n).decode("utf-8", "replace")
            if kind == 9:
                item, count = struct.unpack("<I", take(4))[0], u64()
                if item in _GGUF_SCALAR and not keep:
                    f.seek(_GGUF_SCALAR[item][1] * count, 1)
                    return None
                values = [value(item, keep) for _ in range(count)]
                return values if keep else None
            raise fail(f"unknown value type {kind}")

        if take(4) != b"GGUF":
            raise fail("no GGUF magic")
        version = struct.unpack("<I", take(4))[0]
        if not 2 <= version <= 3:  # version 1 used 32-bit counts; a byte-swapped version means big-endian
            raise fail(f"GGUF version {version}; llmprune reads little-endian versions 2 and 3")
        _tensors, kvs = u64(), u64()
        for _ in range(kvs):
            key = take(u64()).decode("utf-8", "replace")
            kind = struct.unpack("<I", take(4))[0]
            keep = key.startswith(prefix)
            v = value(kind, keep)
            if keep:
                out[key] = v
    return out


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file."""
    arch = gguf_metadata(path).get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"GGUF file {path} has no general.architecture; it cannot be read as a model")
    return arch


def hub_id_from_url(url: Any) -> str | None:
    m = _HUB_URL.match(url) if isinstance(url, str) else None
    return m.group(1) if m else None


def hub_id_from_cache_path(folder: Path) -> str | None:
    """``ORG/NAME`` for a folder inside the Hugging Face cache (``models--ORG--NAME/snapshots/REV``)."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots":
        m = _HUB_CACHE.search(parts[-3])
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def card_metadata(folder: Path) -> dict[str, Any]:
    """The YAML front matter of ``folder/README.md`` (empty when there is none or it does not parse)."""
    from huggingface_hub import metadata_load

    card = folder / "README.md"
    if not card.is_file():
        return {}
    try:
        return metadata_load(card) or {}
    except Exception:  # a hand-written card whose YAML does not parse says nothing about the license
        return {}


def _license(value: Any) -> str | None:
    if isinstance(value, list):  # the Hub allows a list; the card's field takes one
        value = value[0] if len(value) == 1 else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _languages(value: Any) -> list[str] | None:
    """A card's ``language`` (one code or a list) as a list of codes; None when there is none."""
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    codes = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    return codes or None


def of_gguf(path: Path) -> dict[str, Any]:
    """License and Hub id of the model a GGUF file holds. Its ``general.source.*`` names the repository it was
    converted from (the model itself); ``general.base_model.*`` names that model's own parents, which is not the
    source of a pruned copy, so it is not used."""
    meta = gguf_metadata(path)
    hub = meta.get("general.source.huggingface.repository") or meta.get("general.source.hugginface.repository")
    hub = hub if isinstance(hub, str) and re.match(r"^[\w.-]+/[\w.-]+$", hub) else None
    out = {"license": _license(meta.get("general.license")),
           "hub_id": hub or hub_id_from_url(meta.get("general.source.url")),
           "language": _languages(meta.get("general.languages"))}
    return {k: v for k, v in out.items() if v}


def of_folder(folder: Path, hub_id: str | None = None) -> dict[str, Any]:
    """License and Hub id of a safetensors folder or Hub snapshot: the license from its card's front matter; the id
    given (a Hub source), or read from a Hugging Face cache path. A card's ``base_model`` names that model's
    parent, not the model, so it is never taken for the id."""
    meta = card_metadata(folder)
    out = {"license": _license(meta.get("license")), "hub_id": hub_id or hub_id_from_cache_path(folder),
           "language": _languages(meta.get("language"))}
    return {k: v for k, v in out.items() if v}


# An absolute or home-relative path inside a value (``lastword:/home/me/x.txt``, a comma-separated list).
_ABS_PATH = re.compile(r"(?<![\w.-])(~?/[^\s,;:]+|[A-Za-z]:[\\/][^\s,;]+)")


def local_paths(value: str) -> set[str]:
    """The value itself and every absolute path inside it (``lastword:/home/me/x.txt``, comma lists)."""
    return {value, *(m.group(1) for m in _ABS_PATH.finditer(value))}


def public_name(value: Any, digests: dict[str, str] | None = None) -> Any:
    """``value`` as a public card may show it: every absolute or home-relative path in it becomes its file name
    (with its SHA-256 prefix when ``digests`` knows it), and so does a whole value that is an existing relative
    path; anything else is returned unchanged."""
    if not isinstance(value, str):
        return value
    digests = digests or {}

    def name(path: str) -> str:
        digest = digests.get(path)
        base = Path(path).name or path
        return f"{base} (sha256 {digest[:12]})" if digest else base

    if "/" in value and not value.startswith(("/", "~")) and Path(value).exists():
        return name(value)
    return _ABS_PATH.sub(lambda m: name(m.group(1)), value)
