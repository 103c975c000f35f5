"""A model checked against itself before anything large is allocated: its config's sizes, its RoPE parameters, the
blocks its shards hold, the dtypes of its weights, the vocabulary of its tokenizer.

A source that lies about its own shape (a config naming 20,000 layers over shards that hold two, an integer
embedding, a tokenizer with more tokens than the embedding has rows) is refused in one line at ``calibrate``, not
half-processed until a later step fails or silently computes on garbage.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Iterable

import torch

from llmprune.arch import ARCHS, config_values
from llmprune.errors import StepFailed, UserError
from llmprune.precision import PRUNABLE

# Sizes a decoder config may carry: each, when present, a positive integer below the bound. A bound far above any
# released model; what it stops is a config whose skeleton alone would take minutes and gigabytes to build.
SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "ffn_dim")
# Sizes where 0 means "none" (no experts, no sliding window): whole numbers, 0 allowed.
COUNT_FIELDS = ("num_experts", "num_local_experts", "num_experts_per_tok", "top_k_experts", "moe_intermediate_size",
                "shared_expert_intermediate_size", "sliding_window")
MAX_SIZE = 1 << 24
MAX_LAYERS = 4096
MAX_POSITIONS = 1 << 28
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_config(config: Any, what: str, error: type[Exception]) -> None:
    """Sizes positive integers within bounds, RoPE parameters that transformers' own validation accepts, and none
    of the variants its family's table row refuses (``arch.Arch.refuse``)."""
    row = ARCHS.get(getattr(config, "model_type", ""))
    for key, why in row.refuse if row is not None else ():
        if getattr(config, key, None):
            raise error(f"{what} sets {key} = {getattr(config, key)!r}: {why}")
    for name in (*SIZE_FIELDS, *COUNT_FIELDS, "max_position_embeddings"):
        for v in config_values(config, name):  # per block where the config is heterogeneous (Gemma 4)
            if v is None:
                continue
            bound = MAX_POSITIONS if name in ("max_position_embeddings", "sliding_window") else \
                MAX_LAYERS if name == "num_hidden_layers" else MAX_SIZE
            low = 0 if name in COUNT_FIELDS else 1
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= bound:
                raise error(f"the config of {what} gives {name} = {v!r}; it must be a whole number in "
                            f"[{low}, {bound:,}]")
    _check_rope(config, what, error)


def _check_rope(config: Any, what: str, error: type[Exception]) -> None:
    """transformers validates RoPE parameters by logging a warning and going on (a factor of "x" then fails deep in
    a forward pass, a negative one computes garbage): its warnings are taken as the refusals they describe."""
    params = getattr(config, "rope_parameters", None)
    if params is None or not hasattr(config, "validate_rope"):
        return
    layers = params.values() if isinstance(params, dict) and all(isinstance(v, dict) for v in params.values()) \
        else [params]
    for p in layers:  # per layer type (Gemma 3: sliding and full) or one
        theta = p.get("rope_theta") if isinstance(p, dict) else None
        if not isinstance(p, dict) or theta is not None and (
                isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0)):
            raise error(f"the config of {what} has invalid RoPE parameters ({str(p)[:200]})")
    seen: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    # Kept, not printed: transformers' verbosity (quieted to errors by llmprune) would drop the warnings unmade.
    log = logging.getLogger("transformers.modeling_rope_utils")
    handler, level, propagate = _Keep(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
    try:
        config.validate_rope()
    except (KeyError, ValueError, TypeError) as e:
        seen.append(str(e))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    bad = [m for m in seen if "rope" in m.lower() and "unrecognized keys" not in m.lower()]
    if bad:
        raise error(f"the config of {what} has invalid RoPE parameters: {bad[0].strip().splitlines()[0][:200]}")


def check_block_count(config: Any, names: Iterable[str], what: str, error: type[Exception]) -> None:
    """The shards hold exactly the blocks the config names (checked on tensor names, before a skeleton of
    ``num_hidden_layers`` blocks is built)."""
    found = {int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
    want = getattr(config, "num_hidden_layers", None)
    if not found or not isinstance(want, int):
        return
    if found != set(range(want)):
        raise error(f"the config of {what} names {want:,} blocks but its weights hold blocks "
                    f"{min(found)}..{max(found)} ({len(found):,} of them): the config does not describe these weights")


def check_dtypes(stored: dict[str, str], what: str, error: type[Exception]) -> None:
    """Every weight (``{tensor name: safetensors dtype}`` of the model's parameters) is a float of 16 bits or more."""
    bad = sorted(n for n, d in stored.items() if d not in PRUNABLE)
    if bad:  # integers and booleans are not weights at all; 8-bit floats need their scales, which no step keeps
        raise error(f"{what} stores {len(bad)} weight(s) in a dtype llmprune cannot prune ({bad[0]}: "
                    f"{stored[bad[0]]}); a weight must be one of {', '.join(PRUNABLE)}")


def check_vocabulary(tokens: int, rows: int, what: str, error: type[Exception]) -> None:
    """The tokenizer's ids all index the embedding: a token past its rows would be an out-of-range lookup."""
    if tokens > rows:
        raise error(f"the tokenizer of {what} has {tokens:,} tokens but the embedding has {rows:,} rows; "
                    "the tokenizer does not belong to these weights")


# --- finite weights ---------------------------------------------------------------------------------------------
def non_finite_count(t: torch.Tensor) -> int:
    """NaN and infinite entries of a tensor (none in an integer one)."""
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def refuse_non_finite_source(count: int, first: str | None, what: str) -> None:
    """A model brought in must be finite: ``count`` NaN or infinite weights (the first in ``first``) refuse it."""
    if count:
        raise UserError(f"{what} holds {count:,} NaN or infinite weights (the first in {first}); a model must be "
                        "finite to be pruned")


def refuse_produced(count: int, first: str | None) -> None:
    """A step never commits NaN or infinite weights: it fails before its commit (exit 2) and the workdir keeps its
    previous model."""
    if count:
        raise StepFailed(f"the step produced {count:,} NaN or infinite weights (the first in {first}); nothing was "
                         "committed: lower the learning rate or check the step's options")
