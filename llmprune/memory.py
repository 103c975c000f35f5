"""Peak memory of a training step (``regularize``, ``recover``), known before anything is loaded.

The estimate reads a model's config and its shards' headers only. Its parts:

- the trained model's weights in fp32 (they are trained in fp32: AdamW's updates vanish in half precision), the
  gradients and AdamW's two moments of what is trained (every weight, or the LoRA adapters), and a frozen fp32
  teacher when distilling;
- the activations autograd keeps for the backward pass. For a pre-norm decoder block with a gated MLP and fused
  (SDPA) attention that is, per token, ``8 h + 2 kv + 4 i`` values (h: hidden size, kv: key/value width, i: the
  MLP's width, the routed experts' widths for a token under MoE): the block's and each norm's input, the normed
  input, queries, keys, values, the attention output before and after its reshape, and the MLP's gate, its
  activation, the up projection and their product -- the per-block count of Korthikanti et al. (2022, "Reducing
  activation recomputation in large transformer models", section 4.1) for this block, without the s^2 attention
  term that fused attention does not keep. ``tests/test_memory.py`` checks the count against what autograd saves.
  With gradient checkpointing a block keeps only its input (h) and one block's activations are live again during
  its recomputation. The head keeps the log-probabilities (V values per token) and, at the top of the backward
  pass, the logits and their gradient live beside them (2 V more);
- the held-out evaluation between steps (no gradients; 4 windows at a time: logits and log-probabilities), which
  runs while the optimiser's state is held and so is a peak of its own;
- on the CPU, the process itself (the Python runtime and the libraries, measured as the current resident size).

bf16 training keeps activations in bf16 and caches a bf16 copy of the trained weights for the forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
from dataclasses import dataclass
from pathlib import Path

from llmprune import sharding
from llmprune.errors import UserError
from llmprune.shards import read_header

MIB = 2**20
FP32 = 4
EVAL_BATCH = 4  # train.heldout_nll's windows per forward


@dataclass(frozen=True)
class Geometry:
    """What the estimate needs of a model: read from its folder without loading it."""

    parameters: int
    hidden: int
    layers: int
    mlp_width: int  # the MLP width a token passes through (routed experts' and shared experts' under MoE)
    kv_width: int
    vocab: int
    block_linears: tuple[tuple[int, int], ...]  # (in, out) of every 2-D weight of the blocks: LoRA's adapters


def _num(cfg: dict, *keys: str, default: int = 0) -> int:
    """The first of ``keys`` in ``cfg`` (a list of per-block values: the largest)."""
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, list) and v and all(isinstance(x, int) for x in v):
            return max(v)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return default


def geometry(folder: Path) -> Geometry:
    """The geometry of the model saved in ``folder`` (config.json and the safetensors headers)."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("text_config") or cfg
    entries = {}
    for f in sorted(folder.glob("*.safetensors")):
        entries.update(read_header(f)[0])
    hidden = _num(cfg, "hidden_size", "d_model", "n_embd")
    heads = _num(cfg, "num_attention_heads", "n_head", default=1)
    head_dim = _num(cfg, "head_dim", default=hidden // max(heads, 1))
    kv = _num(cfg, "num_key_value_heads", default=heads) * head_dim
    top_k = _num(cfg, "num_experts_per_tok", "moe_topk", "top_k_experts")
    if top_k:  # a token passes through its routed experts and the shared ones
        expert = _num(cfg, "moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
        shared = _num(cfg, "shared_expert_intermediate_size") or _num(cfg, "n_shared_experts") * expert
        mlp = top_k * expert + shared
    else:
        mlp = _num(cfg, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
    linears = tuple((e.shape[1], e.shape[0]) for n, e in entries.items()
                    if ".layers." in f".{n}" and n.endswith(".weight") and len(e.shape) == 2)
    return Geometry(parameters=sum(math.prod(e.shape) for e in entries.values()), hidden=hidden,
                    layers=_num(cfg, "num_hidden_layers", "n_layer"), mlp_width=mlp, kv_width=kv,
                    vocab=_num(cfg, "vocab_size"), block_linears=linears)


def block_values_per_token(g: Geometry) -> int:
    """Values autograd keeps per token in one block (module docstring: 8 h + 2 kv + 4 i)."""
    return 8 * g.hidden + 2 * g.kv_width + 4 * g.mlp_width


def lora_values_per_token(g: Geometry, dropout: bool, rank: int = 8) -> float:
    """Values LoRA adapters on every block Linear add per token and block: each adapter's rank-sized intermediate
    and, with dropout, its dropped copy of the input (fp32) and the dropout mask (one byte: a quarter of a value)."""
    per_block = len(g.block_linears) / max(g.layers, 1)
    inputs = sum(i for i, _ in g.block_linears) / max(g.layers, 1)
    return rank * per_block + (1.25 * inputs if dropout else 0.0)


@dataclass(frozen=True)
class Setting:
    """How a training step would run."""

    batch: int
    seqlen: int
    full: bool  # every weight trained, or LoRA adapters
    lora_rank: int = 8
    lora_dropout: bool = True
    teacher_parameters: int = 0  # 0: no distillation
    grad_checkpointing: bool = False
    precision: str = "fp32"
    shards: int = 1  # FSDP over this many processes (llmprune/sharding.py); 1: every process holds everything


def estimate(g: Geometry, s: Setting) -> dict[str, int]:
    """Bytes of each part, of the phases that can set the peak (``training``, ``optimizer_step``, ``evaluation``;
    under FSDP also ``gathered``) and the ``peak``, on the training device (per process).

    Under FSDP (``shards`` N > 1) each process holds 1/N of the weights, gradients and AdamW moments, plus the whole
    weights (and, while its backward runs, the whole gradients) of the block computing and of the next one
    prefetched, and the root unit's (embeddings, head, final norm: unsharded from the forward to the end of the
    backward); after training the whole trained weights come back beside the weights' shards (``gathered``)."""
    n = max(s.shards, 1)
    trainable = g.parameters if s.full else sum(s.lora_rank * (i + o) for i, o in g.block_linears)
    act = 2 if s.precision == "bf16" else FP32
    tokens = s.batch * s.seqlen
    per_block = block_values_per_token(g) + (0 if s.full else lora_values_per_token(g, s.lora_dropout, s.lora_rank))
    kept = (g.layers * g.hidden + per_block) if s.grad_checkpointing else g.layers * per_block
    logits = g.vocab * tokens * FP32
    block = sum(i * o for i, o in g.block_linears) // max(g.layers, 1)
    live = (2 * block + max(g.parameters - g.layers * block, 0)) if n > 1 else 0  # unsharded while computing
    live_grads = (2 * trainable // max(g.layers, 1)) if n > 1 else 0
    parts = {
        "weights": (g.parameters // n + live) * FP32,
        "gradients": (trainable // n + live_grads) * FP32,
        "optimizer": 2 * (trainable // n) * FP32,
        "bf16_copy": trainable // n * 2 if s.precision == "bf16" else 0,
        "teacher": s.teacher_parameters * FP32,
        # the blocks' kept values, the head's log-probabilities, and the logits and their gradient at the top
        "activations": int(kept * tokens * act) + 3 * logits + 3 * g.hidden * tokens * FP32,
        "teacher_logits": 2 * logits if s.teacher_parameters else 0,
    }
    held = parts["weights"] + parts["optimizer"] + parts["teacher"]
    parts["training"] = sum(parts.values())
    # AdamW's step (torch's multi-tensor version): one temporary the size of what is trained, beside the gradients
    parts["optimizer_step"] = held + parts["gradients"] + trainable // n * FP32
    # the held-out evaluation: logits, log-probabilities and the loss's temporaries of EVAL_BATCH windows
    parts["evaluation"] = held + 3 * g.vocab * EVAL_BATCH * s.seqlen * FP32
    if n > 1:  # sharding.gather, the optimizer's state freed: the whole trained weights beside the shards
        parts["gathered"] = g.parameters * FP32 + parts["weights"] + parts["teacher"]
    parts["peak"] = max(parts[k] for k in ("training", "optimizer_step", "evaluation", "gathered") if k in parts)
    return parts


def training_check(folder: Path, s: Setting, device: str, step: str, enforce: bool = True) -> dict:
    """Estimate (and, with ``enforce``, check) the peak memory of a training step on the model in ``folder``,
    before it is loaded; returned as recorded (the step prints ``report_line`` of it once its inputs are checked, so
    a bad option stays one line)."""
    g = geometry(folder)
    if sharding.requested():
        s = dataclasses.replace(s, shards=sharding.processes())
    if enforce:
        return check(g, s, device, step)
    return _record(estimate(g, s), device, _base_bytes(device), available_bytes(device))


def report_line(record: dict) -> str:
    """The estimate in one line, as a step prints it before it starts."""
    parts = ", ".join(f"{k} {record[k]:,}" for k in ("weights", "gradients", "optimizer", "teacher", "activations")
                      if record.get(k))
    base = f" + {record['base_mib']:,} this process" if record.get("base_mib") else ""
    return (f"memory: about {record['peak_mib']:,} MiB at peak on {record['device']} ({parts} MiB{base}); "
            f"{record['available_mib']:,} MiB free")


def process_bytes() -> int:
    """This process's peak resident size so far: the runtime and libraries a CPU run's peak stands on."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes(device: str) -> int:
    """Free memory where the step trains: the CUDA device's free memory, or the host's available memory."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 + process_bytes()  # what this process holds is its to use
    return 1 << 62  # no /proc: not checked


def check(g: Geometry, s: Setting, device: str, step: str) -> dict:
    """The estimate as recorded (MiB), or one line refusing a step that would not fit, naming what would."""
    parts, base, have = estimate(g, s), _base_bytes(device), available_bytes(device)
    record = _record(parts, device, base, have)
    # On the CPU the processes of a launch (DDP or FSDP) share the host's memory: each needs its own share of it.
    procs = 1 if device.startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = (parts["peak"] + base) * procs
    if need <= have:
        return record
    fits, kinds = [], set()
    for kind, how, other in _alternatives(s, device):
        if kind not in kinds and (estimate(g, other)["peak"] + base) * procs <= have:
            fits.append(how)
            kinds.add(kind)  # the largest batch size that fits, not every one
    where = f"{device} ({procs} processes)" if procs > 1 else device
    raise UserError(f"{step} needs about {_size(need)} on {where} (weights {_size(parts['weights'])}, optimizer "
                    f"{_size(parts['optimizer'])}, activations {_size(parts['activations'])}) and {_size(have)} is "
                    "free; "
                    + ("it would fit with " + " or ".join(fits) if fits else "nothing smaller of this step fits:"
                       " a machine with more memory") + " (--no-memory-check runs it anyway)")


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / MIB:.0f} MiB"


def _base_bytes(device: str) -> int:
    """What the step stands on besides its own parts: this process, on the CPU (a GPU holds none of it)."""
    return 0 if device.startswith("cuda") else process_bytes()


def _record(parts: dict[str, int], device: str, base: int, have: int) -> dict:
    """The estimate as recorded, in MiB (computed in bytes: the comparison never uses the rounded values)."""
    record = {k: round(v / MIB) for k, v in parts.items() if v}
    record.update(device=device, base_mib=round(base / MIB), peak_mib=round((parts["peak"] + base) / MIB),
                  available_mib=round(have / MIB))
    return record


def _alternatives(s: Setting, device: str):
    """(kind, what to say, the setting it names) for each change that makes a step smaller. FSDP is offered over
    the machine's GPUs: on the CPU its processes share one memory, so sharding saves nothing there."""
    gpus = _gpus() if device.startswith("cuda") else 0
    if s.shards == 1 and gpus > 1:
        yield "fsdp", (f"FSDP over {gpus} GPUs (accelerate launch --config_file {sharding.CONFIG} --num_processes "
                       f"{gpus} -m llmprune ...)"), dataclasses.replace(s, shards=gpus)
    if not s.grad_checkpointing:
        yield "ckpt", "--grad-checkpointing", dataclasses.replace(s, grad_checkpointing=True)
    if s.full:
        yield "lora", "LoRA (without --full)", dataclasses.replace(s, full=False)
    b = s.batch // 2
    while b >= 1:
        yield "batch", f"--batch-size {b} --grad-accum {s.batch // b}", dataclasses.replace(s, batch=b)
        b //= 2
