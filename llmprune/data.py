"""Text sources -> token windows, for calibration (random windows) and evaluation (non-overlapping windows).

A source is a named dataset (``wikitext2``, ``c4``, ``ptb``), any Hub dataset (``hf:NAME[:CONFIG[:SPLIT]]``), or a
local ``.txt`` / ``.jsonl`` / ``.json`` / ``.parquet`` file. Documents are joined with a blank line, as the Wanda and
SparseGPT references do, then tokenized once.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llmprune.errors import UserError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

# name -> (dataset, config, calibration split, evaluation split, text field, extra load_dataset kwargs)
NAMED = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text", {}),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence", {}),
    # The first shard of each C4 split, as the Wanda/SparseGPT references use.
    "c4": (
        "allenai/c4",
        None,
        "train",
        "validation",
        "text",
        {
            "data_files": {
                "train": "en/c4-train.00000-of-01024.json.gz",
                "validation": "en/c4-validation.00000-of-00008.json.gz",
            }
        },
    ),
}


def describe(source: str) -> str:
    return f"'{source}'"


def _offline_error(source: str, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"cannot load dataset {describe(source)} from the Hugging Face Hub ({first[:160]}); "
        "offline, pass a local file instead: --dataset path/to/text.txt|.jsonl|.parquet"
    )


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"dataset file {path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") \
            from None


def _texts(values: list, where: str, field: str) -> list[str]:
    """The text values of a field: every one must be a string; a null or a number there is an error, never the word
    "None" or a repr fed to the model as if it were text."""
    bad = [(i, v) for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        i, v = bad[0]
        raise UserError(f"{where}: {len(bad):,} of {len(values):,} rows have no text in '{field}' (row {i}: "
                        f"{'null' if v is None else type(v).__name__}); clean the data or choose another --text-field")
    return values


def check_local(source: str) -> None:
    """A source that names a local path is a readable file: checked up front where the text is read later (a
    sweep reads its evaluation text once per point, after each point's prune)."""
    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if path.is_dir():
            raise UserError(f"dataset {path} is a folder; give a .txt, .jsonl, .json or .parquet file")
        if not path.is_file():
            raise UserError(f"dataset file {path} does not exist")


def _texts_from_local(path: Path, text_field: str) -> list[str]:
    check_local(str(path))
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = _read_utf8(path)
        if "\x00" in text:
            raise UserError(f"dataset file {path} holds NUL bytes: it is not a text file")
        return [text]
    if suffix in (".jsonl", ".json"):
        raw = _read_utf8(path)
        try:
            if suffix == ".jsonl":
                rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:
                rows = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        if isinstance(rows, dict):
            rows = rows.get("data", rows.get("rows"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UserError(f"{path}: expected a list of objects with a '{text_field}' field")
        if rows and not any(text_field in r for r in rows):
            raise UserError(f"{path}: no row has a '{text_field}' field (choose one with --text-field)")
        return _texts([r.get(text_field) for r in rows], str(path), text_field)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path} is not a readable parquet file ({str(e).splitlines()[0][:160]})") from None
        if text_field not in table.column_names:
            raise UserError(
                f"{path}: no column '{text_field}' (columns: {', '.join(table.column_names)}); use --text-field"
            )
        return _texts(table.column(text_field).to_pylist(), str(path), text_field)
    raise UserError(f"unsupported dataset file type '{suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}")


def load_text(source: str, purpose: str = "calibration", text_field: str = "text") -> str:
    """The whole text of ``source``; ``purpose`` picks the split of named datasets: ``evaluation`` the test split,
    ``calibration`` and ``training`` the train split (recovery must never train on the split it is evaluated on)."""
    if purpose not in ("calibration", "training", "evaluation"):
        raise ValueError(f"purpose {purpose!r}")
    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        texts = _texts_from_local(path, text_field)
    else:
        texts = _texts_from_hub(source, purpose, text_field)
    text = "\n\n".join(texts)
    if not text.strip():
        raise UserError(f"dataset {describe(source)} contains no text")
    return text


# One part of a training mixture: ``SOURCE:WEIGHT`` (the weight a plain positive number, so ``hf:NAME:CONFIG:SPLIT``
# and a path keep their own colons).
_PART = re.compile(r"^(?P<source>.+):(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


@dataclass(frozen=True)
class Part:
    """One source of a training mixture and its share of the training windows."""

    source: str
    weight: float
    text: str = ""


def parse_mixture(spec: str) -> list[Part]:
    """``--dataset a.txt:0.7,b.jsonl:0.3`` -> the sources and their shares (normalised to sum to 1); a single
    source, weighted or not, is the whole of the training text. Every part of a mixture names its weight."""
    items = [p.strip() for p in spec.split(",")] if "," in spec else [spec.strip()]
    parts = []
    for item in items:
        m = _PART.match(item)
        if m is None or Path(item).exists():  # a file whose name ends in ":0.5" is that file
            parts.append(Part(item, math.nan))
        else:
            parts.append(Part(m.group("source"), float(m.group("weight"))))
    if len(parts) == 1:
        return [Part(parts[0].source, 1.0)]
    if any(not p.source for p in parts) or any(math.isnan(p.weight) for p in parts):
        raise UserError(f"--dataset {spec}: give every source of a mixture its share, SOURCE:WEIGHT, e.g. "
                        "a.txt:0.7,b.jsonl:0.3")
    if any(not (math.isfinite(p.weight) and p.weight > 0) for p in parts):
        raise UserError(f"--dataset {spec}: every share must be a positive number")
    if len({p.source for p in parts}) < len(parts):
        raise UserError(f"--dataset {spec}: a source appears twice; give it one share")
    total = sum(p.weight for p in parts)
    return [Part(p.source, p.weight / total) for p in parts]


def load_mixture(spec: str, purpose: str = "training", text_field: str = "text") -> list[Part]:
    """Every part of ``spec`` (``parse_mixture``) with its text, each read as ``load_text`` reads one source."""
    return [Part(p.source, p.weight, load_text(p.source, purpose, text_field)) for p in parse_mixture(spec)]


def training_text(spec: str, text_field: str = "text") -> str | list[Part]:
    """``--dataset``'s text for training: one source's text, or the parts of a mixture with theirs."""
    parts = load_mixture(spec, "training", text_field)
    return parts[0].text if len(parts) == 1 else parts


def text_digest(text: str | list[Part]) -> str:
    """SHA-256 of a training text, or of a mixture's sources, shares and texts (what a resumed run must match)."""
    if isinstance(text, str):
        return hashlib.sha256(text.encode()).hexdigest()
    return hashlib.sha256(json.dumps([[p.source, p.weight, text_digest(p.text)] for p in text]).encode()).hexdigest()


def _texts_from_hub(source: str, purpose: str, text_field: str) -> list[str]:
    if source in NAMED:
        name, config, calib_split, eval_split, field, kwargs = NAMED[source]
        split = eval_split if purpose == "evaluation" else calib_split
    elif source.startswith("hf:"):
        parts = source[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise UserError(f"bad dataset source '{source}': expected hf:NAME[:CONFIG[:SPLIT]]")
        name = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 else ("test" if purpose == "evaluation" else "train")
        field, kwargs = text_field, {}
    else:
        raise UserError(
            f"unknown dataset '{source}': use wikitext2, c4, ptb, hf:NAME[:CONFIG[:SPLIT]], "
            "or a local .txt/.jsonl/.json/.parquet file"
        )
    try:
        import datasets
        from huggingface_hub.utils import logging as hub_logging

        # Retries are logged as warnings by the Hub client; the one line we raise says what failed.
        hub_logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        ds = datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as e:  # the datasets library raises many types for "not reachable"
        raise _offline_error(source, e) from None
    if field not in ds.column_names:
        raise UserError(f"dataset {describe(source)} has no field '{field}' (columns: {', '.join(ds.column_names)})")
    return _texts(list(ds[field]), f"dataset {describe(source)}", field)


# Above ONE_CALL_CHARS characters a text is tokenized in pieces of about PIECE_CHARS. One call on a whole corpus
# -- the first C4 shard is about 800 MB of text, 170 M tokens -- makes the fast tokenizer hold every token's string,
# offsets and masks at once (over 500 bytes a token by benchmarks/tokenize_bench.py: 5.5 GB for 40 M characters)
# where the ids alone are 8 bytes. Below it (WikiText-2's training split is 11 M characters, every benchmark text
# less) one call, exactly as before.
ONE_CALL_CHARS = 1 << 24
PIECE_CHARS = 1 << 20


def pieces(text: str, size: int) -> list[str]:
    """``text`` cut into consecutive pieces of about ``size`` characters, each ending at a document boundary (the
    blank line documents are joined with) where there is one, so only the tokens at a boundary can differ from a
    single call's. Joined again, the pieces are ``text``."""
    out, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n\n", start + size)
        if cut < 0:
            break
        out.append(text[start : cut + 2])
        start = cut + 2
    out.append(text[start:])
    return out


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The token ids of the whole text, shape [n] (int64); a large text in pieces (``PIECE_CHARS``), a few at a time,
    so memory follows the ids, not the tokenizer's full encodings of every token."""
    from llmprune import report

    if len(text) <= ONE_CALL_CHARS:
        return tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0].to(torch.long)

    def ids_of(batch: list[str]) -> list[torch.Tensor]:
        enc = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        return [torch.tensor(e, dtype=torch.long) for e in enc]

    parts, out, batch = pieces(text, PIECE_CHARS), [], 4  # a batch of pieces is encoded in parallel by the fast tokenizers
    with report.progress(f"tokenizing {len(text) / 1e6:,.0f} M characters", len(parts)) as advance:
        for i in range(0, len(parts), batch):
            chunk = parts[i : i + batch]
            out += ids_of(chunk)
            advance(len(chunk))
    return torch.cat(out)


def random_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at random starts, as the Wanda/SparseGPT references draw them."""
    if samples <= 0:
        raise UserError(f"--samples must be positive, got {samples}")
    if seqlen <= 1:
        raise UserError(f"--seqlen must be at least 2, got {seqlen}")
    n = ids.numel()
    if n <= seqlen + 1:
        raise UserError(f"the dataset has {n} tokens, not enough for windows of {seqlen}; lower --seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(samples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start (the tail shorter than a window is dropped)."""
    if seqlen <= 1:
        raise UserError(f"--seqlen must be at least 2, got {seqlen}")
    k = ids.numel() // seqlen
    if k == 0:
        raise UserError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        if max_windows <= 0:
            raise UserError(f"--max-windows must be positive, got {max_windows}")
        k = min(k, max_windows)
    return ids[: k * seqlen].view(k, seqlen)
