"""Bringing models in and out: a Hub id, a local folder or a GGUF file in; safetensors shards out.

Only safetensors is ever read (``use_safetensors=True``): a pickle offered as weights is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from llmprune.arch import arch_for
from llmprune.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype '{name}'; use auto, {', '.join(DTYPES)}") from None


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # llmprune shows its own progress
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_source(source: str, revision: str | None, dtype: str, trust_remote_code: bool):
    """Load ``(model, tokenizer, base)`` from a Hub id, a local HF folder or a ``.gguf`` file.

    ``base`` describes the source for the manifest (id or path, revision or file hash, model type).
    """
    from transformers import AutoTokenizer

    from llmprune.workdir import sha256_file

    _quiet_transformers()
    path = Path(source)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    base: dict[str, Any] = {"source": source}
    if source.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        where, kwargs["gguf_file"] = str(path.parent.resolve()), path.name
        base["sha256"] = sha256_file(path)
        # transformers dequantizes GGUF weights to float32; keep that unless asked otherwise.
        torch_dtype = torch.float32 if dtype == "auto" else parse_dtype(dtype)
    elif path.is_dir():
        where = str(path)
        if not any(path.glob("*.safetensors")):
            raise UserError(f"{path} has no .safetensors weights; llmprune never loads pickle (.bin/.pt) checkpoints")
        kwargs["use_safetensors"] = True
        torch_dtype = parse_dtype(dtype)
    elif path.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
        raise UserError(f"{path}: pickle checkpoints are refused; convert the model to safetensors")
    elif source.count("/") <= 1 and not path.exists() and not source.startswith((".", "/")):
        where = source
        kwargs["revision"] = revision
        kwargs["use_safetensors"] = True
        base["revision"] = revision or "main"
        torch_dtype = parse_dtype(dtype)
    else:
        raise UserError(f"model source {source} is neither a Hub id, a folder nor a .gguf file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **{k: v for k, v in kwargs.items() if k != "use_safetensors"})
        model = checked_from_pretrained(where, f"model {source}", UserError, dtype=torch_dtype, **kwargs)
    except UserError:
        raise
    except (OSError, ValueError, EnvironmentError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model {source}: {msg[:300]}") from None
    if getattr(model.config, "quantization_config", None) is not None and "gguf_file" in kwargs:
        # The weights are dequantized; the GGUF quantization config would make save_pretrained refuse or lie.
        del model.config.quantization_config
        model.config.__dict__.pop("quantization_config", None)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.eval()
    base["model_type"] = model.config.model_type
    arch_for(model.config.model_type)  # fail early on an unsupported architecture
    return model, tokenizer, base


def non_finite(model) -> tuple[int, str | None]:
    """How many parameter entries are NaN or infinite, and the name of the first tensor holding one."""
    count, first = 0, None
    for name, p in model.named_parameters():
        bad = int((~torch.isfinite(p.detach())).sum())
        if bad:
            count += bad
            first = first or name
    return count, first


def save_model(model, tokenizer, out: Path, max_shard_size: str = "2GB") -> None:
    """Write the model into a step's staging area -- never one with NaN or infinite weights: the step fails
    before its commit, and the workdir keeps its previous model."""
    from llmprune.errors import StepFailed

    count, first = non_finite(model)
    if count:
        raise StepFailed(f"the step produced {count:,} NaN or infinite weights (the first in {first}); nothing was "
                         "committed: lower the learning rate or check the step's options")
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)


def checked_from_pretrained(where, what: str, error: type[Exception], **kwargs):
    """``from_pretrained`` that refuses a checkpoint not covering its config.json exactly. transformers fills a
    missing or mis-shaped tensor with random values and only logs it (the log that llmprune keeps quiet): a model
    pruned or calibrated so would be random, with a success message. ``error`` is the class to raise (a bad source
    is bad input; a workdir whose files disagree is an integrity error)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True, ignore_mismatched_sizes=True,
                                                       **kwargs)
    problems = []
    for key, label in (("missing_keys", "missing"), ("mismatched_keys", "of the wrong shape"),
                       ("unexpected_keys", "not in the model")):
        names = sorted(k if isinstance(k, str) else k[0] for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} tensor(s) {label} ({shown})")
    if problems:
        raise error(f"{what} does not match its config.json: {'; '.join(problems)}; it would run with random "
                    "weights in their place")
    return model


def load_model(model_dir: Path, dtype: str = "auto", error: type[Exception] | None = None):
    """A saved model (safetensors only) and its tokenizer. ``error``: raised when the shards do not cover the
    config (default: an integrity error, as for a workdir's model)."""
    from transformers import AutoTokenizer

    from llmprune.errors import IntegrityError

    _quiet_transformers()
    model = checked_from_pretrained(model_dir, f"the model in {model_dir}", error or IntegrityError,
                                    dtype=parse_dtype(dtype), use_safetensors=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    arch_for(model.config.model_type)
    return model, tokenizer


def load_current(ws, dtype: str = "auto"):
    """The workdir's model as every step sees it, checked against its hashes: an adapter left unmerged by
    ``recover --no-merge`` is part of it (merged in memory, the zero pattern re-applied)."""
    from llmprune import recovery

    ws.verify("model")
    model, tok = load_model(ws.model_dir, dtype)
    step = recovery.pending_adapter(ws.manifest())
    if step is not None:
        ws.verify("adapter")
        model = recovery.merge_pending(model, ws.path / "adapter", step)
    return model, tok


def open_current(ws):
    """``(model, tokenizer, weights)``: the workdir's model for a block-by-block walk, checked against its hashes.

    Lazy (``lazy.Lazy``: a skeleton whose blocks are read from the shards as the walk reaches them), so the step
    holds one block at a time, unless ``recover --no-merge`` left an adapter to merge first: peft merges a whole
    model in memory, so that model is loaded whole (``lazy.InMemory``).
    """
    from transformers import AutoTokenizer

    from llmprune import recovery
    from llmprune.lazy import InMemory, Lazy

    if recovery.pending_adapter(ws.manifest()) is not None:
        model, tok = load_current(ws)
        return model, tok, InMemory()
    _quiet_transformers()
    ws.verify("model")
    weights = Lazy(ws.model_dir)
    return weights.model, AutoTokenizer.from_pretrained(ws.model_dir), weights


def check_shard_size(text: str) -> None:
    """``--max-shard-size`` as ``save_pretrained`` reads it (``2GB``, ``500MB``, bytes), checked before any work."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        ok = convert_file_size_to_int(int(text) if text.isdigit() else text) > 0
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"--max-shard-size {text!r} is not a size; use e.g. 2GB, 500MB or a number of bytes")


def check_context(model, seqlen: int) -> None:
    """Windows longer than the model's context would be evaluated on positions it never saw."""
    ctx = getattr(model.config, "max_position_embeddings", None)
    if ctx is not None and seqlen > ctx:
        raise UserError(f"--seqlen {seqlen} is longer than the model's context ({ctx} tokens)")


def param_count(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
