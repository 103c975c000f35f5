"""llama.cpp through llama-cpp-python (the optional extra ``llmprune[gguf]``): the k-quant quantizer, and the judge
of a GGUF file -- its perplexity on the same token windows as the transformers evaluation, and its prefill and
decode speed on this machine."""

from __future__ import annotations

import ctypes
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmprune import report
from llmprune.errors import UserError

EXTRA = "pip install 'llmprune[gguf]'"


def require(why: str) -> Any:
    """The ``llama_cpp`` module, or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"{why} needs llama.cpp's Python binding: {EXTRA} (builds llama.cpp, a few minutes)") from None
    return llama_cpp


def threads() -> int:
    """llama.cpp's threads: the cores this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def quantize(src: Path, dst: Path, ftype_name: str) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``): ``src`` (f32/f16) to ``dst`` at ``ftype_name``, a
    ``gguf.LlamaFileType`` member name such as ``MOSTLY_Q4_K_M``."""
    llama_cpp = require(f"--gguf-type {ftype_name.removeprefix('MOSTLY_').lower()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype_name}")
    params.nthread = threads()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise UserError(f"llama.cpp could not quantize {src.name} to {ftype_name} (code {rc})")


def load(path: Path, n_ctx: int, logits_all: bool = True) -> Any:
    """A llama.cpp model and context for ``path``; a file llama.cpp refuses is a one-line error."""
    llama_cpp = require("the llama.cpp backend")
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               logits_all=logits_all, n_threads=threads(), n_threads_batch=threads(), verbose=False,
                               seed=0)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"llama.cpp cannot load {path}: {str(e).strip()[:200]}") from None


def tokenize(llm: Any, text: str) -> list[int]:
    """llama.cpp's own tokens for ``text`` (no BOS added: compared with transformers' ``encode`` of the same text
    without special tokens)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def window_logits(llm: Any, tokens: list[int]) -> np.ndarray:
    """The logits llama.cpp computes at every position of one window, ``[len(tokens), vocab]`` (float32)."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed next-token negative log-likelihood: ``logits[i]`` predicts ``targets[i]``."""
    z = logits.astype(np.float64)
    top = z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return float((logz - z[np.arange(len(targets)), targets]).sum())


def perplexity(path: Path, windows: Any) -> dict[str, Any]:
    """exp(mean next-token NLL) that llama.cpp gives the GGUF file over ``windows`` (the token ids of the
    transformers evaluation, fed as they are: the comparison is of the models, not of the tokenizers)."""
    rows = [list(map(int, w)) for w in windows.tolist()]
    llm = load(path, n_ctx=len(rows[0]))
    total, count = 0.0, 0
    with report.progress("evaluating (llama.cpp)", len(rows)) as advance:
        for row in rows:
            logits = window_logits(llm, row)
            total += nll(logits[:-1], np.array(row[1:]))
            count += len(row) - 1
            advance()
    llm.close()
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "windows": len(rows)}


class Timer:
    """Prefill and decode of one GGUF file in llama.cpp at batch 1, one repetition per ``once()`` (seconds):
    prefill evaluates a prompt of ``prompt_len`` random tokens in one batch; decode then evaluates ``new_tokens``
    greedy tokens one at a time through the KV cache. The first call is a warm-up whose time is dropped."""

    def __init__(self, path: Path, prompt_len: int, new_tokens: int, seed: int = 0):
        self.llm = load(path, n_ctx=prompt_len + new_tokens, logits_all=False)
        rng = np.random.default_rng(seed)
        self.prompt = rng.integers(0, self.llm.n_vocab(), prompt_len).tolist()
        self.new_tokens, self.warm = new_tokens, False

    def once(self) -> tuple[float, float]:
        if not self.warm:
            self._run()
            self.warm = True
        return self._run()

    def _run(self) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(self.prompt)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(self.new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return prefill, time.perf_counter() - t0

    def close(self) -> None:
        self.llm.close()
