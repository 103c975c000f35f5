"""A tokenizer in GGUF's terms (``tokenizer.ggml.*``), so that llama.cpp cuts text into the same ids as transformers.

Three sources, most faithful first: the GGUF file the workdir was calibrated from (its tokenizer keys copied as they
are); a byte-level BPE ``tokenizer.json`` (llama.cpp's "gpt2" model, with the pre-tokenizer named from the table
below); a SentencePiece-style BPE ``tokenizer.json`` with byte fallback (llama.cpp's "llama" model). Anything else
is refused: a tokenizer llama.cpp would read differently gives another model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llmprune.errors import UserError

# llama.cpp names the regex that splits text before BPE ("tokenizer.ggml.pre"). A tokenizer.json's pre-tokenizer,
# reduced to its splitting regexes, -> that name. The GPT-2 regex is what ByteLevel(use_regex=True) applies.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("gpt2",): "gpt-2",
    ("digits", "gpt2"): "smollm",  # SmolLM: every digit alone, then GPT-2's regex
    (_LLAMA3,): "llama-bpe",
    (_QWEN2,): "qwen2",
}


def splitters(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """The splitting steps of a tokenizer.json pre-tokenizer, in order: "gpt2" for a regex-applying ByteLevel,
    "digits" for single-digit splitting, a Split's regex as it is; () for none."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in splitters(p))
    if kind == "ByteLevel":
        return ("gpt2",) if pre.get("use_regex", True) else ()
    if kind == "Digits":
        return ("digits",) if pre.get("individual_digits") else ("digit-runs",)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return (pattern.get("Regex") or re.escape(pattern.get("String", "")),)
    return (f"<{kind}>",)


def add_tokenizer(writer: Any, folder: Path, source_gguf: Path | None = None) -> int:
    """Write the tokenizer keys; returns the number of tokens."""
    if source_gguf is not None:
        return _copy_from(writer, source_gguf)
    path = folder / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"export --format gguf: {folder} has no readable tokenizer.json") from None
    if model.get("type") != "BPE":
        raise UserError(f"export --format gguf: a {model.get('type')} tokenizer is not written as GGUF (BPE only)")
    return (_spm_like if model.get("byte_fallback") else _byte_level)(writer, folder, spec)


def _byte_level(writer: Any, folder: Path, spec: dict[str, Any]) -> int:
    import gguf

    steps = splitters(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(steps)
    if pre is None:
        raise UserError("export --format gguf: the tokenizer's pre-tokenizer "
                        f"({', '.join(s[:40] for s in steps) or 'none'}) is not one llama.cpp names; it would split "
                        "text differently")
    vocab = gguf.vocab.BpeVocab(folder)
    special = _special_ids(spec)
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        tokens.append(text)
        types.append(kind)
    ids = {t if isinstance(t, str) else t.decode("utf-8"): i for i, t in enumerate(tokens)}
    for content, i in special.items():  # added tokens: control when special, user-defined otherwise
        if content in ids:
            types[ids[content]] = gguf.TokenType.CONTROL
    for item in spec.get("added_tokens", []):
        if not item.get("special") and item["content"] in ids:
            types[ids[item["content"]]] = gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return len(tokens)


def _spm_like(writer: Any, folder: Path, spec: dict[str, Any]) -> int:
    """A BPE with byte fallback (SentencePiece converted by transformers: Llama 2, Gemma). llama.cpp's "llama"
    tokenizer merges, at each step, the adjacent pair whose joined token scores highest; scoring each token by
    minus the rank of the merge that makes it reproduces the BPE's merge order."""
    import gguf

    vocab: dict[str, int] = spec["model"]["vocab"]
    merges = spec["model"].get("merges", [])
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, r)
    n = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    tokens: list[bytes] = [b""] * n
    scores = [0.0] * n
    types = [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text.encode("utf-8")
        scores[i] = -float(rank.get(text, 0 if len(text) == 1 else len(merges)))
        types[i] = gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else gguf.TokenType.NORMAL
    for item in spec.get("added_tokens", []):
        i = item["id"]
        tokens[i] = item["content"].encode("utf-8")
        types[i] = gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED
    if types.count(gguf.TokenType.UNUSED) and any(t == b"" for t in tokens):
        raise UserError("export --format gguf: the tokenizer's ids have gaps")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_prepends_space(spec))
    gguf.SpecialVocab(folder, load_merges=False, n_vocab=n).add_to_gguf(writer, quiet=True)
    return n


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2's SentencePiece does; Gemma's does not)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text


def _special_ids(spec: dict[str, Any]) -> dict[str, int]:
    return {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}


def _copy_from(writer: Any, path: Path) -> int:
    """Every ``tokenizer.*`` key of a GGUF file, as it is."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    n = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if key == "tokenizer.ggml.tokens":
                n = len(value)
            writer.add_key_value(key, value, kind, sub_type=sub)
        else:
            writer.add_key_value(key, value, kind)
    return n
