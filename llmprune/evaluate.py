"""Measurements: perplexity (streamed block by block), sparsity per layer type, parameter count, throughput (the
``eval`` step, ``steps/eval.py``, records them)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import units
from llmprune import engine, report
from llmprune.head import Head
from llmprune.errors import UserError
from llmprune.modeling import param_count
from llmprune.stats import exp_nll


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, device: str = "cpu", batch_size: int = 4, act_dtype=None, weights=None,
    sink=None,
) -> dict[str, float]:
    """exp(mean next-token NLL) over all predicted tokens of non-overlapping windows (docs/benchmarks.md protocol).

    Runs through the block-by-block engine, so only one block is on the device at a time (and, for a lazy model, in
    memory: ``weights``). ``sink(index, block)`` sees each loaded block (e.g. to count its zeros).
    """
    acts = engine.capture(model, windows, batch_size, device, act_dtype, weights=weights)
    outs = engine.stream(model, acts, device, "evaluating", weights=weights, sink=sink)
    nll, count = 0.0, 0
    start = 0
    # The head over every window is a long loop of its own (a 49k-token vocabulary over 881 windows of 512 tokens:
    # about 4 minutes here): shown per window, like the blocks.
    with Head(model, device, weights) as head, report.progress("scoring (lm_head)", int(windows.shape[0])) as advance:
        for h in outs.hidden:
            for j in range(h.shape[0]):  # one window at a time: its logits are [seqlen, vocab]
                target = windows[start + j, 1:]
                nll += head.nll(h[j, :-1], target)
                count += target.numel()
                advance()
            start += h.shape[0]
    mean = nll / count
    return {"perplexity": exp_nll(mean), "nll": mean, "tokens": count, "windows": int(windows.shape[0])}


def block_zeros(index: int, block: nn.Module) -> dict[str, tuple[int, int]]:
    """``(exact zeros, entries)`` of every prunable Linear of one (loaded) block, by its full name ``i.name``."""
    return {f"{index}.{name}": (int((lin.weight == 0).sum()), lin.weight.numel())
            for name, lin in units.block_linears(block).items()}


def model_zeros(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``block_zeros`` of every block of a model held in memory."""
    out: dict[str, tuple[int, int]] = {}
    for i, block in enumerate(_arch.blocks(model)):
        out.update(block_zeros(i, block))
    return out


def layer_sparsity(counts: dict[str, tuple[int, int]] | nn.Module) -> dict[str, float]:
    """Fraction of exact zeros of every prunable Linear, by its full name (from ``block_zeros`` counts or a model)."""
    counts = model_zeros(counts) if isinstance(counts, nn.Module) else counts
    return {k: z / n for k, (z, n) in counts.items()}


def block_sparsity(counts: dict[str, tuple[int, int]]) -> list[float]:
    """Fraction of exact zeros of each block's prunable weights together, in block order (what OWL sets)."""
    zeros: dict[int, int] = defaultdict(int)
    total: dict[int, int] = defaultdict(int)
    for full, (z, n) in counts.items():
        b = int(full.split(".", 1)[0])
        zeros[b] += z
        total[b] += n
    return [zeros[b] / total[b] for b in sorted(total)]


def sparsity_by_type(counts: dict[str, tuple[int, int]] | nn.Module) -> dict[str, float]:
    """Fraction of exact zeros per layer type (``self_attn.q_proj``...) over all blocks, and ``all`` of them."""
    counts = model_zeros(counts) if isinstance(counts, nn.Module) else counts
    zeros: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for full, (z, n) in counts.items():
        kind = full.split(".", 1)[1]
        kind = kind[: kind.index("[")] if kind.endswith("]") else kind  # every expert's slice: one layer type
        for key in (kind, "all"):
            zeros[key] += z
            total[key] += n
    return {k: zeros[k] / total[k] for k in sorted(total, key=lambda k: (k == "all", k))}


def summary(model: nn.Module, counts: dict[str, tuple[int, int]] | None = None) -> dict[str, object]:
    """Parameters and sparsity by layer type; ``counts`` (``block_zeros`` gathered during a walk) for a lazy model,
    whose weights are not in memory to count."""
    return {"parameters": param_count(model), "sparsity": sparsity_by_type(model if counts is None else counts)}


SPEED_REPS = 5  # timed repetitions per model (after one warm-up): enough for a median and its quartiles


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(lower quartile, median, upper quartile) of a few timings, by linear interpolation between order statistics."""
    v = sorted(values)

    def at(q: float) -> float:
        pos = q * (len(v) - 1)
        lo = int(pos)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)

    return at(0.25), at(0.5), at(0.75)


def verdict(ratios: list[float]) -> str:
    """A speed-up measured as paired ratios (model over baseline, each pair timed back to back): "faster" or
    "slower" only when the middle half of the ratios lies on one side of 1, else "within noise"."""
    q1, _, q3 = quartiles(ratios)
    return "faster" if q1 > 1 else "slower" if q3 < 1 else "within noise"


class Timer:
    """Prefill and decode of one model at one batch size, one repetition at a time: ``once()`` gives (prefill
    seconds, decode seconds). Prefill: one forward pass over ``batch`` random prompts of ``prompt_len``. Decode:
    ``new_tokens`` single-token steps through the KV cache after them (greedy). The first call is a warm-up whose
    time is dropped (first-call allocations and kernel choices are not the model's speed)."""

    def __init__(self, model: nn.Module, prompt_len: int, new_tokens: int, device: str, batch: int, seed: int = 0):
        import inspect

        self.model, self.new_tokens, self.device = model, new_tokens, device
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen)
        # transformers renamed ``past_key_values`` to ``cache`` (5.x); use whichever this release's forward takes.
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
        self.warm = False

    @torch.no_grad()
    def once(self) -> tuple[float, float]:
        model = self.model.to(self.device).eval()
        ids = self.ids.to(self.device)
        if not self.warm:
            self._run(model, ids)
            self.warm = True
        prefill, decode = self._run(model, ids)
        return prefill, decode

    def _run(self, model, ids) -> tuple[float, float]:
        import time

        self.sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        self.sync()
        prefill = time.perf_counter() - t0
        past, tok = out[self.cache_kw], out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(self.new_tokens):
            out = model(input_ids=tok, use_cache=True, **{self.cache_kw: past})
            past, tok = out[self.cache_kw], out.logits[:, -1:].argmax(-1)
        self.sync()
        return prefill, time.perf_counter() - t0


def speed(model: nn.Module, prompt_len: int = 512, new_tokens: int = 64, reps: int = SPEED_REPS,
          device: str = "cpu", seed: int = 0, batch: int = 1) -> dict[str, Any]:
    """Prefill and decode throughput (tokens/s, all sequences together) of the whole model on ``device`` with
    ``batch`` sequences at once: the median of ``reps`` timed repetitions after a warm-up, with the lowest and
    highest (``*_range``). Batch 1 is latency-bound serving; a larger batch is where a smaller model's arithmetic
    shows."""
    timer = Timer(model, prompt_len, new_tokens, device, batch, seed)
    runs = [timer.once() for _ in range(reps)]
    model.to("cpu")
    return {**_rates(runs, batch * prompt_len, batch * new_tokens), "prompt_len": prompt_len,
            "new_tokens": new_tokens, "reps": reps}


def _rates(runs: list[tuple[float, float]], prompt_tokens: int, new_tokens: int, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, (phase, tokens) in enumerate((("prefill", prompt_tokens), ("decode", new_tokens))):
        rates = [tokens / r[i] for r in runs]
        out[f"{prefix}{phase}_tokens_per_s"] = round(quartiles(rates)[1], 2)
        out[f"{prefix}{phase}_tokens_per_s_range"] = [round(min(rates), 2), round(max(rates), 2)]
    return out


def _suffix(batch: int) -> str:
    """Batch 1's metrics keep their plain names (``prefill_speedup``); batch b's end in ``_b{b}``."""
    return "" if batch == 1 else f"_b{batch}"


def speed_against(model: nn.Module, base_dir, prompt_len: int, new_tokens: int, device: str,
                  batches: tuple[int, ...] = (1,), reps: int = SPEED_REPS) -> dict[str, Any]:
    """Throughput of ``model`` (and of the baseline in ``base_dir``) at each batch size of ``batches``. With a
    baseline the two are timed alternately, one repetition each in turn, so that a slow spell of the machine hits
    both; each speed-up is the median of the ``reps`` paired ratios, with their range and a verdict ("faster",
    "slower", "within noise": ``verdict``). Ratios, not absolute timings, are what compares on a noisy machine."""
    from llmprune.modeling import load_model

    base = load_model(base_dir, error=UserError)[0] if base_dir is not None else None  # a folder the user named
    out: dict[str, Any] = {"prompt_len": prompt_len, "new_tokens": new_tokens, "batches": list(batches), "reps": reps}
    for b in batches:
        sfx = _suffix(b)
        if base is None:
            one = speed(model, prompt_len, new_tokens, reps=reps, device=device, batch=b)
            out.update({f"{k}{sfx}": v for k, v in one.items() if k.startswith(("prefill", "decode"))})
            continue
        timers = (Timer(model, prompt_len, new_tokens, device, b), Timer(base, prompt_len, new_tokens, device, b))
        out.update({f"{k}{sfx}": v for k, v in paired(timers, b * prompt_len, b * new_tokens, reps,
                                                        f"timing against the baseline (batch {b})").items()})
        model.to("cpu")
        base.to("cpu")
    return out


def paired(timers, prompt_tokens: int, new_tokens: int, reps: int, label: str) -> dict[str, Any]:
    """A model's timer and its baseline's (anything with ``once() -> (prefill s, decode s)``: transformers here,
    llama.cpp in ``llmprune.llamacpp``), timed alternately ``reps`` times: both rates with their ranges, and each
    speed-up as the median of the paired ratios with its range and verdict."""
    pairs = []
    with report.progress(label, reps) as advance:
        for _ in range(reps):
            pairs.append((timers[0].once(), timers[1].once()))
            advance()
    out: dict[str, Any] = {}
    for who, prefix in ((0, ""), (1, "baseline_")):
        out.update(_rates([p[who] for p in pairs], prompt_tokens, new_tokens, prefix))
    for i, phase in enumerate(("prefill", "decode")):
        ratios = [base_t[i] / model_t[i] for model_t, base_t in pairs]  # time ratio = throughput ratio
        out[f"{phase}_speedup"] = round(quartiles(ratios)[1], 3)
        out[f"{phase}_speedup_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        out[f"{phase}_speedup_verdict"] = verdict(ratios)
    return out


def rates(timer, prompt_tokens: int, new_tokens: int, reps: int) -> dict[str, Any]:
    """One model's rates alone: the median of ``reps`` timed repetitions with the range."""
    return _rates([timer.once() for _ in range(reps)], prompt_tokens, new_tokens)


def parse_batches(text: str) -> tuple[int, ...]:
    """``--speed-batches 1,8`` -> (1, 8); one clear error for anything else."""
    try:
        batches = tuple(dict.fromkeys(int(b) for b in text.split(",")))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise UserError(f"--speed-batches takes positive batch sizes separated by commas (1,8), got '{text}'")
    return batches


def speed_memory(config: dict[str, Any], batch: int, prompt_len: int, new_tokens: int) -> int:
    """Bytes the timing of one batch holds beside the weights, from the config (fp32, the widest it runs in): the
    prefill's logits over the whole prompt, the KV cache, and the widest activation of one block."""
    def size(key: str, default: int = 0) -> int:
        v = config.get(key, default)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default

    hidden, vocab = size("hidden_size", 1), size("vocab_size", 1)
    heads = size("num_attention_heads", 1)
    kv = size("num_key_value_heads", heads) * size("head_dim", hidden // heads)
    tokens = batch * (prompt_len + new_tokens)
    logits = batch * prompt_len * vocab
    cache = 2 * size("num_hidden_layers", 1) * tokens * kv
    act = batch * prompt_len * (max(size("intermediate_size"), hidden) * 3 + heads * prompt_len)
    return 4 * (logits + cache + act)


def available_memory(device: str) -> int | None:
    """Free memory on ``device`` in bytes: the GPU's free memory, or the host's available memory (Linux); None
    where it cannot be read."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_bytes(model_dir: Path) -> int:
    """The model's size on disk: its safetensors shards (what a release ships and a server loads)."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
