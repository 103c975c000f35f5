"""``eval --backend llama.cpp``: llama.cpp judges a GGUF file of the workdir's model -- the perplexity it computes
on the token windows of the transformers evaluation, and its own prefill and decode rates (against a baseline
GGUF at the same type, timed alternately) -- recorded as an eval step like the transformers one."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llmprune import data, gguf_write, llamacpp
from llmprune.current import model_digest
from llmprune.errors import UserError
from llmprune.evaluate import paired, rates
from llmprune.provenance import gguf_metadata


def _not_with_llamacpp(o: Any) -> None:
    """What the transformers backend does and llama.cpp's does not: refused rather than silently ignored."""
    unused = [flag for flag, on in (("--tasks", o.tasks), ("--speed-batches", o.speed_batches != "1"),
                                    ("--limit", o.limit is not None), ("--num-fewshot", o.num_fewshot is not None))
              if on]
    if unused:
        raise UserError(f"{', '.join(unused)} run through transformers: drop them, or use --backend transformers")
    if o.gguf is not None and o.gguf_type != "f16":
        raise UserError("--gguf names the file, whose type is its own: drop --gguf-type")


def checked_gguf(ws: Any, given: str) -> Path:
    """``--gguf FILE``: it must be a GGUF written from this workdir's current model (its ``llmprune.model_sha256``),
    else its perplexity would be recorded against another model."""
    path = Path(given)
    if not path.is_file() or path.suffix != ".gguf":
        raise UserError(f"--gguf {given} is not a .gguf file")
    digest = gguf_metadata(path, "llmprune.").get("llmprune.model_sha256")
    if digest is None:
        raise UserError(f"--gguf {given} was not written by llmprune export (no llmprune.model_sha256): export this "
                        "workdir with --format gguf, or leave --gguf out to convert it")
    if digest != model_digest(ws.manifest()):
        raise UserError(f"--gguf {given} holds another state of the model than the workdir's current one; export it "
                        "again, or leave --gguf out to convert it")
    return path


def _baseline(given: str, gguf_type: str, tmp: Path) -> Path:
    """``--speed-baseline``: a GGUF file as it is, or a workdir converted at the same type (a dense model against
    a pruned one at equal quantization)."""
    from llmprune.workdir import Workdir

    path = Path(given)
    if path.suffix == ".gguf" and path.is_file():
        return path
    if not (path / "manifest.json").is_file():
        raise UserError(f"--speed-baseline {given}: with --backend llama.cpp, give a .gguf file or a workdir")
    return gguf_write.from_workdir(Workdir(path), tmp / "baseline.gguf", gguf_type, path.name)


def measure(ws: Any, o: Any, dataset: str, text: str) -> dict[str, Any]:
    """One eval step through llama.cpp."""
    from transformers import AutoTokenizer

    _not_with_llamacpp(o)
    llamacpp.require("--backend llama.cpp")
    given = checked_gguf(ws, o.gguf) if o.gguf is not None else None
    with tempfile.TemporaryDirectory(prefix="llmprune-gguf-") as tmp, \
            ws.step("eval", {**asdict(o), "dataset": dataset}) as tx:
        ws.record_inputs(tx, "model")
        path = given or gguf_write.from_workdir(ws, Path(tmp) / "model.gguf", o.gguf_type, ws.path.name)
        tok = AutoTokenizer.from_pretrained(ws.model_dir)
        windows = data.eval_windows(data.tokenize(tok, text), o.seqlen, o.max_windows)
        metrics = {**llamacpp.perplexity(path, windows), "backend": "llama.cpp",
                   "gguf_type": gguf_write.type_of(path), "gguf_bytes": path.stat().st_size,
                   "parameters": gguf_parameters(path)}
        if o.speed:
            metrics["speed"] = _speed(o, path, Path(tmp))
        tx.step.metrics = metrics
    return {"dataset": dataset, "seqlen": o.seqlen, **tx.step.metrics}


def _speed(o: Any, path: Path, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_len": o.prompt_len, "new_tokens": o.new_tokens, "batches": [1], "reps": o.reps,
                           "threads": llamacpp.threads()}
    timer = llamacpp.Timer(path, o.prompt_len, o.new_tokens)
    try:
        if o.speed_baseline is None:
            return {**out, **rates(timer, o.prompt_len, o.new_tokens, o.reps)}
        base = llamacpp.Timer(_baseline(o.speed_baseline, gguf_write.type_of(path), tmp), o.prompt_len, o.new_tokens)
        try:
            return {**out, **paired((timer, base), o.prompt_len, o.new_tokens, o.reps,
                                    "timing against the baseline (llama.cpp)")}
        finally:
            base.close()
    finally:
        timer.close()


def gguf_parameters(path: Path) -> int:
    """The number of weights in a GGUF file (every tensor's elements; a tied head counted once)."""
    import gguf

    return int(sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors))
