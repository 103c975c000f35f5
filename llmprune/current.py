"""The workdir's current model: its weights in ``model/`` and, after ``recover --no-merge``, the LoRA adapter in
``adapter/`` that is part of it until a later step folds it in. Every step reads the model through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from llmprune.errors import IntegrityError
from llmprune.lazy import InMemory, Lazy
from llmprune.modeling import load_model, quiet_transformers
from llmprune.units import reapply, zero_masks


def has_adapter(manifest: dict[str, Any]) -> bool:
    return any(k.startswith("adapter/") for k in manifest["files"])


def dense_parameters(manifest: dict[str, Any]) -> int:
    """The parameters of the model as calibrated: the dense teacher's size."""
    return next(s["metrics"]["parameters"] for s in manifest["steps"] if s["command"] == "calibrate")


def pending_adapter(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The ``recover --no-merge`` step whose adapter is part of the workdir's current model, or None.

    An unmerged adapter belongs to the model that was current when it was trained; a later step that writes
    ``model/`` (a prune, a merging recover) has already folded it in, so it is pending only when that recover is the
    last step to touch the model or the adapter."""
    last = None
    for step in manifest.get("steps", []):
        outs = step.get("outputs", {})
        if any(k.startswith("model/") for k in outs):
            last = None
        if step["command"] == "recover" and any(k.startswith("adapter/") for k in outs):
            last = None if step["params"].get("merge", True) else step
    return last


def model_digest(manifest: dict[str, Any]) -> str:
    """One SHA-256 naming the current model: over the recorded digests of ``model/`` (and of a pending adapter).
    A GGUF file written from the workdir carries it, so ``eval --backend llama.cpp --gguf`` can tell whether the
    file is this model or an older state of it."""
    import hashlib
    import json

    prefixes = ("model/", "adapter/") if pending_adapter(manifest) is not None else ("model/",)
    files = {k: v for k, v in sorted(manifest["files"].items()) if k.startswith(prefixes)}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def peft_exact(step: dict[str, Any]) -> bool:
    """Whether plain peft (``W x + s B A x``) computes what was trained: not for an adapter trained through the zero
    pattern of a sparse model, whose update at pruned positions was never trained."""
    return not (step["params"].get("masked", True) and step["metrics"].get("masked_adapters", 0))


def merge_pending(model: nn.Module, adapter_dir, step: dict[str, Any]) -> nn.Module:
    """The model a merging recover would have written: base + adapter, merged, with the zero pattern of a pruned
    model re-applied. For an adapter trained through the mask this is exactly the trained model."""
    from peft import PeftModel

    # peft falls back to torch.load (a pickle) when the safetensors file is missing: never let it
    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file() or any(
            p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt") for p in Path(adapter_dir).iterdir()):
        raise IntegrityError(f"{adapter_dir} holds no adapter_model.safetensors, or a pickle file; llmprune never "
                             "loads pickles: the workdir is refused")
    masks = zero_masks(model) if step["metrics"].get("pruned_layers") else {}
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    reapply(merged, masks)
    return merged


def load_current(ws, dtype: str = "auto"):
    """The workdir's model as every step sees it, checked against its hashes: an adapter left unmerged by
    ``recover --no-merge`` is part of it (merged in memory, the zero pattern re-applied)."""
    ws.verify("model")
    model, tok = load_model(ws.model_dir, dtype)
    step = pending_adapter(ws.manifest())
    if step is not None:
        ws.verify("adapter")
        model = merge_pending(model, ws.path / "adapter", step)
    return model, tok


def open_current(ws, tokenizer: bool = True):
    """``(model, tokenizer, weights)``: the workdir's model for a block-by-block walk, checked against its hashes.

    Lazy (``lazy.Lazy``: a skeleton whose blocks are read from the shards as the walk reaches them), so the step
    holds one block at a time, unless ``recover --no-merge`` left an adapter to merge first: peft merges a whole
    model in memory, so that model is loaded whole (``lazy.InMemory``). ``tokenizer=False``: no tokenizer for a
    lazy model (``None``; a step that rewrites shards copies the tokenizer's files as they are, and a 128k-token
    tokenizer holds about 56 MB).
    """
    from transformers import AutoTokenizer


    if pending_adapter(ws.manifest()) is not None:
        model, tok = load_current(ws)
        return model, tok, InMemory()
    quiet_transformers()
    ws.verify("model")
    weights = Lazy(ws.model_dir)
    return weights.model, AutoTokenizer.from_pretrained(ws.model_dir) if tokenizer else None, weights
