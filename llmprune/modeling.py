"""Bringing models in and out: a Hub id, a local folder or a GGUF file in; safetensors shards out.

Only safetensors is ever read (``use_safetensors=True``): a pickle offered as weights is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmprune import precision, quantized, validate
from llmprune.arch import arch_for
from llmprune.errors import UserError, first_line

parse_dtype = precision.to_torch  # a --dtype name (an alias, or auto) as a torch dtype


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # llmprune shows its own progress
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Source:
    """A model source as the user named it: ``kind`` is ``gguf``, ``folder`` or ``hub``; ``where`` the file, folder
    or repo id; ``base`` what the manifest records about it."""

    kind: str
    where: str
    base: dict[str, Any]


def resolve_source(source: str, revision: str | None) -> Source:
    """What ``source`` names, checked before anything is read: a ``.gguf`` file, a local folder of safetensors
    weights, or a Hub id (pickle checkpoints are refused)."""
    from llmprune.fsio import sha256_file

    path = Path(source)
    if source.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        return Source("gguf", str(path), {"source": source, "sha256": sha256_file(path)})
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise UserError(f"{path} has no .safetensors weights; llmprune never loads pickle (.bin/.pt) checkpoints")
        return Source("folder", str(path), {"source": source})
    if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
        raise UserError(f"{path}: pickle checkpoints are refused; convert the model to safetensors")
    if source.count("/") <= 1 and not path.exists() and not source.startswith((".", "/")):
        return Source("hub", source, {"source": source, "revision": revision or "main"})
    raise UserError(f"model source {source} is neither a Hub id, a folder nor a .gguf file")


def load_source(source: str, revision: str | None, dtype: str, trust_remote_code: bool):
    """Load ``(model, tokenizer, base)`` whole into memory from a Hub id, a local HF folder or a ``.gguf`` file
    (``calibrate`` streams the first two with ``copy_weights`` instead; a GGUF file, or a quantized folder, must be
    dequantized by transformers, which loads it whole).

    ``base`` describes the source for the manifest (id or path, revision or file hash, model type).
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    src = resolve_source(source, revision)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    base = dict(src.base)
    if src.kind == "gguf":
        path = Path(src.where)
        where, kwargs["gguf_file"] = str(path.parent.resolve()), path.name
        check_gguf(path, source)
        # transformers dequantizes GGUF weights to float32; keep that unless asked otherwise.
        torch_dtype = torch.float32 if dtype == "auto" else parse_dtype(dtype)
    else:
        where = src.where
        kwargs["use_safetensors"] = True
        if src.kind == "hub":
            kwargs["revision"] = revision
        torch_dtype = parse_dtype(dtype)
        qc = quantized.declared(Path(where)) if src.kind == "folder" else None
        if qc is not None:  # a quantized release: dequantized by transformers as it loads (llmprune.quantized)
            kwargs["quantization_config"] = quantized.dequantizing(qc, f"model {source}")
            base["quantization"] = quantized.record(qc)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **{k: v for k, v in kwargs.items()
                                                            if k not in ("use_safetensors", "quantization_config")})
        model = checked_from_pretrained(where, f"model {source}", UserError, dtype=torch_dtype, **kwargs)
    except (UserError, MemoryError):
        raise
    except Exception as e:  # whatever reading the user's files raises: the source is refused, exit 1
        raise UserError(f"cannot load model {source}: {first_line(e)}") from None
    if getattr(model.config, "quantization_config", None) is not None and (
            "gguf_file" in kwargs or "quantization_config" in kwargs):
        # The weights are dequantized; a quantization config would make save_pretrained refuse or lie.
        del model.config.quantization_config
        model.config.__dict__.pop("quantization_config", None)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.eval()
    base["model_type"] = model.config.model_type
    arch_for(model.config.model_type)  # fail early on an unsupported architecture
    return model, tokenizer, base


def check_gguf(path: Path, source: str) -> None:
    """Refuse, before any weight is dequantized, a GGUF whose architecture transformers cannot read, or whose
    model type llmprune does not describe: dequantizing a large model in float32 only to refuse it wastes minutes,
    while its config costs one parse of the metadata."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from llmprune.provenance import gguf_architecture

    name = gguf_architecture(path)
    if name not in GGUF_SUPPORTED_ARCHITECTURES or name in ("general", "tokenizer"):
        raise UserError(f"GGUF architecture '{name}' of {source} cannot be dequantized by "
                        "transformers; use the model's safetensors release (Hub id or folder) instead")
    try:
        config = AutoConfig.from_pretrained(str(path.parent.resolve()), gguf_file=path.name)
    except Exception as e:  # the GGUF parser on a file that lies about its counts raises anything
        raise UserError(f"cannot read the config of {source}: {first_line(e)}") from None
    arch_for(config.model_type)
    validate.check_config(config, source, UserError)


# What a Hub snapshot needs for llmprune: weights as safetensors, the config, the tokenizer (never pickles).
HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken",
             "README.md"]  # the card: its front matter holds the license the pruned model's card carries on


def hub_snapshot(repo: str, revision: str | None) -> Path:
    """The local folder of a Hub model's snapshot (safetensors, config and tokenizer files only), downloaded into
    the Hugging Face cache if it is not there."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # the Hub client raises many types (offline, gated, not found, HTTP): all one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot download model {repo}: {msg[:300]}") from None


def copy_weights(lazy, out: Path, dtype: str = "auto", max_shard_size: str = "2GB", what: str = "the model") -> None:
    """Copy the weights of a safetensors folder (``lazy``: checked to cover its config exactly) into ``out`` tensor
    by tensor, never holding the model: every weight must be finite, and the layout follows ``--max-shard-size`` in
    the model's own tensor order. ``dtype`` other than ``auto`` casts the floating-point tensors (and says so in the
    config)."""
    import json
    import shutil

    from transformers.utils.hub import convert_file_size_to_int

    from llmprune import report
    from llmprune.precision import STORED
    from llmprune.precision import STORED_NAMES as NAMES
    from llmprune.shards import Planned, ShardWriter, plan_shards, shard_names

    src = lazy.folder
    target = None if dtype == "auto" else parse_dtype(dtype)
    order = lazy.order()
    entries = lazy.shards.entries

    def out_dtype(name: str) -> str:
        floating = STORED[entries[name].dtype].is_floating_point
        return NAMES[target] if target is not None and floating else entries[name].dtype

    own = {n: lazy.own_name(n) for n in order}  # the text model's names for a vision-language release's tensors
    planned = [Planned(own[n], out_dtype(n), entries[n].shape) for n in order]
    plan = plan_shards(planned, convert_file_size_to_int(int(max_shard_size) if max_shard_size.isdigit()
                                                         else max_shard_size))
    writer = ShardWriter(out, dict(zip(shard_names(len(plan)), plan)))
    bad, first = 0, None
    try:
        with report.progress("copying the weights", total=len(order)) as advance:
            for name in order:
                # A slice of rows at a time: an embedding of 128k-262k rows is gigabytes, and must not be held.
                rows = entries[name].shape[0] if entries[name].shape else 1
                step = max(1, (64 << 20) // max(entries[name].nbytes // max(rows, 1), 1))
                for start in range(0, max(rows, 1), step):
                    stop = min(start + step, rows)
                    t = lazy.shards.rows(name, start, stop) if entries[name].shape else lazy.shards.get(name)
                    n = validate.non_finite_count(t)
                    bad, first = bad + n, first or (name if n else None)
                    if entries[name].shape:
                        writer.put_rows(own[name], start, t, last=stop == rows)
                    else:
                        writer.put(own[name], t)
                advance()
        validate.refuse_non_finite_source(bad, first, what)
        writer.close()
    finally:
        writer.abort()
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if lazy.multimodal is not None:  # the language model of a vision-language release: its own, text-only config
        config = lazy.model.config.to_dict()
    if target is not None:
        config["dtype"] = str(target).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", out / "generation_config.json")


def non_finite(model) -> tuple[int, str | None]:
    """How many parameter entries are NaN or infinite, and the name of the first tensor holding one."""
    count, first = 0, None
    for name, p in model.named_parameters():
        bad = validate.non_finite_count(p.detach())
        if bad:
            count += bad
            first = first or name
    return count, first


def save_model(model, tokenizer, out: Path, max_shard_size: str = "2GB") -> None:
    """Write the model into a step's staging area -- never one with NaN or infinite weights: the step fails
    before its commit, and the workdir keeps its previous model."""
    validate.refuse_produced(*non_finite(model))
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

    quiet_transformers()
    model = checked_from_pretrained(model_dir, f"the model in {model_dir}", error or IntegrityError,
                                    dtype=parse_dtype(dtype), use_safetensors=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    arch_for(model.config.model_type)
    return model, tokenizer


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
