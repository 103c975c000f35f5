"""Peak memory of a ``prune`` (the block-by-block methods), known before anything is loaded.

Like ``llmprune.memory`` (the training steps'), it reads the model's config and its shards' headers only. Each term
is what the code allocates (sizes in bytes; h: hidden size, kv: key/value width, i: the MLP width a token passes
through, ``memory.Geometry``; N x L: the calibration windows; b: windows per chunk):

- weights: the workdir's model is streamed (``lazy.Lazy``, what ``current.open_current`` opens): one block at a
  time, in the checkpoint's dtype, on the device (``engine.Walk``: load, prune, run again, write, unload) -- the
  largest block's stored bytes. The embedding rows the windows use and the rotary tables of the capture are smaller.
  A model with an unmerged adapter (``recover --no-merge``) is loaded whole into host memory (``lazy.InMemory``), and
  each block visits the device in turn.
- activations: one copy of the calibration activations is ``N x L x h`` values of ``--act-dtype``
  (``engine.capture``), kept on the device when two copies fit in half its free memory, else in host memory
  (``engine.activation_home``). Three copies are alive while a block's outputs are computed (from the third block
  on): block 0's captured inputs, which ``Walk.acts`` and its caller hold for the whole walk, the block's inputs and
  its outputs (``engine.run_block``); two while a block's statistics are gathered and it is pruned.
- forward: one chunk of b windows through a block, without autograd (``engine.block_output``): at the attention
  ``5 h + 2 kv`` values per token, in the MLP the inputs of the attention's and the MLP's Linears that the
  statistics hooks hold until the chunk ends (``engine._collect``'s ``first_inputs``, 4 h with the residual) and the
  MLP's activated gate, up projection and their product (3 i), all in the weights' dtype; the statistic's fp32 copy
  of its input (``stats.RowNorms.add``; ``stats.Hessian.add`` on the CPU also copies the column slices it multiplies:
  two copies) at the down projection, where only the product is left of the MLP; and the chunk's inputs converted to
  the weights' dtype (or moved to the device). Measured with torch's profiler on a Llama block (``2 h + 3 i`` when
  only run, ``4 h + 3 i`` under Wanda's hooks, exactly). The default chunk is ``--batch-size``; ``--true-sequential``
  runs all N windows at once, Wanda++ one window at a time (``pruning._walk_with_data``).
- method: what pruning one block adds.
  - magnitude, Wanda, RIA, Wanda++'s RGS: the score of the block's largest Linear (fp32; RIA's relative importance
    holds four such matrices at once) and its selection (``masks.select``: ``topk``'s values and int64 indices of
    the weights removed, and a bool mask); Wanda's input norms (float64, ``in`` per Linear) besides.
  - SparseGPT: one Hessian per Linear input (``in^2`` fp32, ``stats.Hessian``), every one held after the statistics
    pass and freed as its last Linear is pruned (counted once per Linear: q/k/v and gate/up share one, so the sum
    bounds what is held from above); the factorisation of one (``sparsegpt.inverse_cholesky``) holds three matrices
    of its width -- the work matrix (the statistic itself for its last user, else a copy), the inverse and its factor;
    the column sweep an fp32 copy of the weight and a temporary as large beside the factor (``sparsegpt.sweep``). The
    peak is the widest Linear's factorisation (the MLP's down projection, pruned last in its block) or every
    statistic held with the factorisation of another.
  - Wanda++ (``methods/wandapp.py``): the dense outputs of the samples regional optimisation (RO) draws, fp32, where
    the activations live (``DensePass.outputs``); each sample's input sums of squares (fp32, ``in`` per Linear and
    sample); with ``--alpha`` above 0 one window's backward through the block (what autograd keeps,
    ``memory.block_values_per_token``, the gradients and their fp32 RMS accumulators); with ``--ro-iters`` above 0 the
    block in fp32, its Linears' gradients, the optimiser's state (RMSprop one, Adam two fp32 values a weight), the
    masks of ``--ro-mask fixed``, and the larger of autograd's values for ``--ro-batch`` windows in fp32 (with the
    targets and the loss's temporaries) and the step's temporary (one parameter group per weight: one Linear's); the
    first round's scores come before the optimiser's state exists.
- on the CPU, the process itself (the Python runtime and the libraries, measured after importing what the step will:
  ``load_libraries``).

The phases that can set the peak: ``propagation`` (weights, three copies, a chunk's forward), ``statistics`` (two
copies, a forward with the hooks, and SparseGPT's Hessians filling), ``pruning`` (two copies and the method's work),
or under ``--true-sequential`` one ``sequential`` pass over all windows (two copies and the pass's forward, each
Linear pruned in its input's hook beside the residual, the MLP's input and its product; the third copy, the outputs,
once the pass is done). Like the training estimate it counts live tensors: what the allocator keeps beyond them (the
CUDA caching allocator, glibc's heap, the BLAS libraries' buffers) is not in it, so the check is a floor. Against
torch's profiler (the CPU allocator's live bytes over a whole ``pruning.prune_model`` of a 3-block Llama, hidden
1024, MLP 4096): Wanda 210 / 207 MiB (fp32), 107 / 105 (bf16 weights), ``--true-sequential`` 314 / 314, Wanda++
(default RO) 265 / 237.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from llmprune import memory
from llmprune.errors import UserError
from llmprune.shards import read_header

FP32 = 4
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Blocks:
    """What the prune estimate needs of a model's blocks, read from the shards' headers."""

    block_bytes: int  # the largest block's stored bytes
    block_parameters: int  # the largest block's values
    model_bytes: int  # every stored tensor's bytes
    linears: tuple[tuple[int, int], ...]  # (in, out) of the largest block's weights (3-D experts: one per expert)
    weight_bytes: int  # bytes a value of the blocks' weights as stored


def blocks(folder: Path) -> Blocks:
    """The blocks of the model saved in ``folder`` (config.json for the expert layout, the safetensors headers)."""
    cfg = json.loads((folder / "config.json").read_text())
    transposed = _experts_transposed((cfg.get("text_config") or cfg).get("model_type", ""))
    entries = {}
    for f in sorted(folder.glob("*.safetensors")):
        entries.update(read_header(f)[0])
    size: dict[int, int] = {}
    values: dict[int, int] = {}
    linears: dict[int, list[tuple[int, int]]] = {}
    itemsize = 1
    for name, e in entries.items():
        m = _BLOCK.search(name)
        if m is None:
            continue
        i, numel = int(m.group(1)), _numel(e.shape)
        size[i] = size.get(i, 0) + e.nbytes
        values[i] = values.get(i, 0) + numel
        if len(e.shape) == 2 and name.endswith(".weight"):
            linears.setdefault(i, []).append((e.shape[1], e.shape[0]))
        elif len(e.shape) == 3:  # an expert parameter [E, out, in] (or [E, in, out]): one Linear per expert
            io = (e.shape[1], e.shape[2]) if transposed else (e.shape[2], e.shape[1])
            linears.setdefault(i, []).extend([io] * e.shape[0])
        if len(e.shape) >= 2 and numel:
            itemsize = max(itemsize, e.nbytes // numel)
    big = max(size, key=lambda k: size[k]) if size else 0
    return Blocks(block_bytes=size.get(big, 0), block_parameters=values.get(big, 0),
                  model_bytes=sum(e.nbytes for e in entries.values()), linears=tuple(linears.get(big, ())),
                  weight_bytes=itemsize)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _experts_transposed(model_type: str) -> bool:
    from llmprune.arch import ARCHS

    row = ARCHS.get(model_type)
    return bool(row is not None and row.experts is not None and row.experts.transposed)


@dataclass(frozen=True)
class RO:
    """Wanda++'s options that change its memory."""

    grads: bool = False  # --alpha above 0: regional gradients
    iters: int = 2
    samples: int = 32
    batch: int = 1
    adam: bool = False
    fixed: bool = True


@dataclass(frozen=True)
class PruneSetting:
    """How a prune would run."""

    method: str
    samples: int  # calibration windows
    seqlen: int
    batch: int = 4
    act_bytes: int = FP32
    true_sequential: bool = False
    removed: float = 0.5  # the fraction of each Linear's weights removed (the selection's size)
    data: bool = True  # reads calibration activations (a method that needs data, or OWL)
    whole: bool = False  # the model loaded whole into host memory (an unmerged adapter)
    wandapp: RO | None = None


def chunk_windows(s: PruneSetting) -> int:
    """Windows per forward: one for Wanda++ (per-sample), all under --true-sequential, else --batch-size."""
    if s.wandapp is not None:
        return 1
    return s.samples if s.true_sequential else min(s.batch, s.samples)


def activation_copy(g: memory.Geometry, s: PruneSetting) -> int:
    """One copy of the calibration activations (``engine.capture``)."""
    return s.samples * s.seqlen * g.hidden * s.act_bytes if s.data else 0


def forward_bytes(g: memory.Geometry, b: Blocks, s: PruneSetting, windows: int, copies: int, moved: bool,
                  held: bool = True) -> int:
    """One chunk of ``windows`` through a block without autograd (module docstring); ``copies``: the statistic's
    fp32 copies of a Linear's input (0: only run); ``moved``: the chunk's inputs converted or moved to the device;
    ``held``: the statistics hooks hold every Linear's input to the chunk's end (``engine._collect``; the one-pass
    schedule holds only the last, ``engine._sequential_pass``)."""
    if not s.data:
        return 0
    wb, h, i = b.weight_bytes, g.hidden, g.mlp_width
    attention = (5 * h + 2 * g.kv_width) * wb
    mlp = (4 if copies and held else 2) * h * wb + max(3 * i * wb, i * wb + copies * FP32 * i)
    extra = h * wb * ((s.act_bytes != wb or moved) + moved)  # the inputs converted; moved: the outputs there too
    return windows * s.seqlen * (max(attention, mlp) + extra)


def score_bytes(b: Blocks, s: PruneSetting) -> int:
    """The score and selection of the block's largest Linear (``masks.select``; RIA's four fp32 matrices)."""
    n = max((i * o for i, o in b.linears), default=0)
    select = n + int(s.removed * n) * (FP32 + 8)  # the bool mask, topk's values and int64 indices
    if s.method == "magnitude":
        return n * b.weight_bytes + n + int(s.removed * n) * (b.weight_bytes + 8)
    if s.method == "ria":
        return max(4 * FP32 * n, FP32 * n + select)
    return FP32 * n + select


def hessian_bytes(b: Blocks, s: PruneSetting) -> int:
    """SparseGPT's statistics and factorisation at their largest (module docstring)."""
    if not b.linears:
        return 0

    def work(i: int, o: int, stat_is_work: bool) -> int:  # the factorisation, or the sweep beside the factor
        return max((3 if stat_is_work else 4) * i * i, i * i + 2 * i * o) * FP32

    if s.true_sequential:  # one statistic at a time, and a copy of it to factorise
        return max(work(i, o, False) for i, o in b.linears)
    k = max(range(len(b.linears)), key=lambda j: b.linears[j])
    widest = b.linears[k]
    held = sum(i * i for i, _ in b.linears) * FP32
    others = [*b.linears[:k], *b.linears[k + 1:]] or [widest]
    rest = held + max(work(i, o, True) - i * i * FP32 for i, o in others)
    return max(work(*widest, True), rest)


def wandapp_bytes(g: memory.Geometry, b: Blocks, s: PruneSetting) -> dict[str, int]:
    """Wanda++'s additions (module docstring): ``outputs`` lives where the activations do, the rest on the device."""
    ro = s.wandapp or RO()
    p = sum(i * o for i, o in b.linears)
    used = s.samples if ro.grads or not ro.iters else min(s.samples, ro.iters * ro.samples)
    wb, tokens = b.weight_bytes, s.seqlen
    sums = used * sum(i for i, _ in b.linears) * FP32
    grads = (p * FP32 + tokens * memory.block_values_per_token(g) * wb + p * wb) if ro.grads else 0
    optimiser = 0
    if ro.iters:
        windows = ro.batch * tokens
        # the backward's kept values, or the step's temporary (one group per weight: one Linear's at a time)
        moment = max(windows * (memory.block_values_per_token(g) + 3 * g.hidden) * FP32,
                     max((i * o for i, o in b.linears), default=0) * FP32)
        optimiser = (b.block_parameters * max(FP32 - wb, 0) + p * FP32 * (2 + ro.adam) + (p if ro.fixed else 0)
                     + moment + (windows * g.hidden * s.act_bytes if ro.batch > 1 else 0)
                     + (p * FP32 if ro.grads else 0))
    # the first round's prune (the scores) comes before the optimiser's state exists
    return {"outputs": used * tokens * g.hidden * FP32 if ro.iters else 0, "sums": sums,
            "work": max(grads, optimiser, score_bytes(b, s))}


def offloaded(g: memory.Geometry, s: PruneSetting, device: str, free: int) -> bool:
    """Whether a CUDA run keeps its activations in host memory (``engine.activation_home``: unless two copies fit in
    half the device's free memory)."""
    return device.startswith("cuda") and s.data and not 2 * activation_copy(g, s) <= free // 2


def estimate(g: memory.Geometry, b: Blocks, s: PruneSetting, device: str, free: int) -> dict[str, int]:
    """Bytes of each part, of the phases that can set the peak and the ``peak`` on ``device`` (``free``: its free
    bytes, which decide where a CUDA run keeps its activations); ``host``: what a CUDA run keeps in host memory
    besides the process (activations kept there, a model held whole)."""
    cuda = device.startswith("cuda")
    copy = activation_copy(g, s)
    there = offloaded(g, s, device, free)
    windows = chunk_windows(s)
    copies = 2 if s.method == "sparsegpt" and not cuda else 1
    blockwise = 3 if g.layers >= 3 or (s.true_sequential and g.layers >= 2) else 2
    w = wandapp_bytes(g, b, s) if s.wandapp is not None else {"outputs": 0, "sums": 0, "work": 0}
    if s.method == "sparsegpt":
        method = hessian_bytes(b, s)
    elif s.wandapp is not None:
        method = w["sums"] + w["work"]
    else:
        method = score_bytes(b, s) + sum(i for i, _ in b.linears) * 8  # + the float64 input norms
    weights = b.model_bytes if s.whole and not cuda else b.block_bytes
    kept = 0 if there else copy
    parts = {"weights": weights, "activations": blockwise * kept + (0 if there else w["outputs"]),
             # under --true-sequential one pass over every window (Wanda++'s final prune too: its windows merged)
             "forward": forward_bytes(g, b, s, s.samples if s.true_sequential else windows, copies, there,
                                      held=not s.true_sequential),
             "method": method}
    if s.true_sequential:
        # Each Linear is pruned inside the pass, in its input's hook: at the MLP's down projection the residual, the
        # MLP's input and the product are alive beside the method's work; the outputs arrive once the pass is done.
        tokens = s.samples * s.seqlen
        merged = 2 * kept if s.wandapp is not None else 0  # _prune_rgs_sequential: the windows merged, its output
        at_hook = tokens * (2 * g.hidden + g.mlp_width) * b.weight_bytes + method
        parts["sequential"] = weights + merged + max(blockwise * kept + tokens * g.hidden * b.weight_bytes,
                                                     2 * kept + max(parts["forward"], at_hook))
    else:
        parts["propagation"] = weights + blockwise * kept + forward_bytes(g, b, s, windows, 0, there)
        held = sum(i * i for i, _ in b.linears) * FP32 if s.method == "sparsegpt" else 0  # the Hessians filling
        parts["statistics"] = weights + 2 * kept + parts["forward"] + held
        parts["pruning"] = weights + 2 * kept + (0 if there else w["outputs"]) + method
    parts["peak"] = max(parts[k] for k in ("sequential", "propagation", "statistics", "pruning") if k in parts)
    parts["host"] = ((blockwise + (2 if s.true_sequential and s.wandapp else 0)) * copy + w["outputs"]
                     if there else 0) + (b.model_bytes if s.whole and cuda else 0)
    return parts


def load_libraries() -> None:
    """Import what the prune will (transformers' modelling, accelerate's empty-weight init) now: the check measures
    this process's size as the base a CPU run stands on, and these libraries are part of it."""
    import accelerate  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers.models.auto import modeling_auto  # noqa: F401


def check(folder: Path, s: PruneSetting, device: str, enforce: bool = True) -> dict:
    """Estimate (and, with ``enforce``, check) the peak memory of a prune of the model in ``folder`` on ``device``,
    before it is loaded; returned as recorded (MiB). A prune that would not fit is refused in one line naming what
    would (``UserError``)."""
    load_libraries()
    g, b = memory.geometry(folder), blocks(folder)
    have, base = memory.available_bytes(device), memory._base_bytes(device)
    cuda = device.startswith("cuda")
    host_have, host_base = (memory.available_bytes("cpu"), memory.process_bytes()) if cuda else (have, 0)
    parts = estimate(g, b, s, device, have)
    record = memory._record({k: v for k, v in parts.items() if k != "host"}, device, base, have)
    record["activations_on"] = ("cpu" if offloaded(g, s, device, have) else device) if s.data else None
    record["chunk_windows"] = chunk_windows(s) if s.data else 0
    if cuda:
        record.update(host_mib=round((host_base + parts["host"]) / memory.MIB),
                      host_available_mib=round(host_have / memory.MIB))

    def fits(other: PruneSetting, where: str = device) -> bool:
        p = estimate(g, b, other, where, have if where == device else host_have)
        if where.startswith("cuda"):
            return p["peak"] <= have and host_base + p["host"] <= host_have
        return p["peak"] + (base if where == device else host_base) <= host_have

    if not enforce or fits(s):
        return record
    found, kinds = [], set()
    for kind, how, other, where in _alternatives(s, device):
        if kind not in kinds and fits(other, where):
            found.append(how)
            kinds.add(kind)
    device_short = parts["peak"] + base > have
    need, free, on = ((parts["peak"] + base, have, device) if device_short else
                      (host_base + parts["host"], host_have, "the host (the activations kept there)"))
    detail = ", ".join([f"{k} {memory._size(parts[k])}" for k in ("weights", "activations", "forward", "method")
                        if parts[k]] + ([f"this process {memory._size(base)}"] if device_short and base else []))
    raise UserError(f"prune needs about {memory._size(need)} on {on} ({detail}) and {memory._size(free)} is free; "
                    + ("it would fit with " + " or ".join(found) if found else
                       "nothing smaller of this prune fits: a machine with more memory")
                    + " (--no-memory-check runs it anyway)")


def _alternatives(s: PruneSetting, device: str):
    """(kind, what to say, the setting it names, the device) for each change that makes a prune smaller, the
    largest first within a kind."""
    if s.data and s.wandapp is None and not s.true_sequential:
        k = s.batch // 2
        while k >= 1:
            yield "batch", f"--batch-size {k}", dataclasses.replace(s, batch=k), device
            k //= 2
    if s.data and s.act_bytes == FP32:
        yield "dtype", "--act-dtype bf16", dataclasses.replace(s, act_bytes=2), device
    if s.true_sequential:
        yield "schedule", "without --true-sequential", dataclasses.replace(s, true_sequential=False), device
    if s.wandapp is not None and s.wandapp.batch > 1:
        k = s.wandapp.batch // 2
        while k >= 1:
            yield "ro", f"--ro-batch {k}", dataclasses.replace(s, wandapp=dataclasses.replace(s.wandapp, batch=k)), \
                device
            k //= 2
    if s.data:
        k = s.samples // 2
        while k >= 1:
            yield "samples", f"{k} calibration samples (calibrate --samples {k})", dataclasses.replace(s, samples=k), \
                device
            k //= 2
    if device.startswith("cuda"):
        yield "cpu", "--device cpu", s, "cpu"


def report_line(record: dict, method: str) -> str:
    """The estimate in one line, as ``prune`` prints it before it loads the model."""
    label = {"sparsegpt": "Hessians", "wandapp": "Wanda++ RO and scores"}.get(method, "scores")
    names = {"weights": "weights", "activations": "activations", "forward": "a chunk's forward", "method": label}
    items = [f"{names[k]} {record[k]:,} MiB" for k in names if record.get(k)]
    items += [f"this process {record['base_mib']:,} MiB"] if record.get("base_mib") else []
    host = (f"; host memory {record['host_mib']:,} MiB of {record['host_available_mib']:,} free"
            if "host_mib" in record else "")
    where = f", activations on {record['activations_on']}" if record.get("activations_on") else ""
    return (f"memory: about {record['peak_mib']:,} MiB at peak on {record['device']} ({', '.join(items)}{where}); "
            f"{record['available_mib']:,} MiB free{host}")
