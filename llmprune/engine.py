"""The one block-by-block engine: capture the inputs of block 0, then walk the blocks one at a time.

Every data-driven method (Wanda, SparseGPT, Wanda++) and the streaming evaluation run through here:

1. ``capture``: run the model on the windows with every block standing in for the identity, and keep what block 0
   receives -- the hidden states -- and *every keyword argument each block receives* (attention mask, position
   ids, rotary ``position_embeddings``, cache position...). Models with layer types (Gemma 2/3, any config with
   ``layer_types``) hand sliding-window layers another mask and, in Gemma 3, other rotary tables than full-attention
   layers: replaying block 0's arguments for every block would silently compute another model. The decoder-layer
   signature changes between transformers releases, so nothing is hard-coded.
2. ``walk``: for each block, load it onto the device, let the caller collect statistics / prune, then run it again
   so the next block sees the outputs of the *pruned* block, hand it to the caller's sink (the step writes it to its
   new shards), and unload it. Only one block is on the device -- and, for a ``lazy.Lazy`` model, in memory -- at a
   time.

Where the weights come from is the ``weights`` argument (``lazy.InMemory`` by default, or a ``lazy.Lazy`` model
that reads each module from the shards when it is loaded): the walk itself does not change.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import UserDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune.units import block_linears
from llmprune import experts
from llmprune.lazy import InMemory
from llmprune.report import progress
from llmprune.stats import Stat


@dataclass
class Activations:
    """Inputs of one block for the whole calibration set, in chunks of windows."""

    hidden: list[torch.Tensor]  # per chunk, [batch, seqlen, hidden], stored in the activation dtype
    kwargs: list[dict[str, Any]]  # per chunk, the keyword arguments the model passes to the block these feed
    # [block][chunk]: every block's keyword arguments, where they differ between blocks (layer types); None when
    # every block receives the very same objects (the arguments are references: a mask shared by 30 blocks is
    # held once).
    by_block: list[list[dict[str, Any]]] | None = None

    @property
    def n_samples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    def feeding(self, index: int) -> "Activations":
        """These hidden states as the inputs of block ``index``: with that block's keyword arguments."""
        if self.by_block is None:
            return self
        return Activations(self.hidden, self.by_block[index], self.by_block)

    def replaced(self, hidden: list[torch.Tensor]) -> "Activations":
        """Other hidden states (a block's outputs) with the same chunks' keyword arguments."""
        return Activations(hidden, self.kwargs, self.by_block)

    def subset(self, idx: list[int]) -> "Activations":
        """The chunks ``idx`` only."""
        by_block = [[kw[i] for i in idx] for kw in self.by_block] if self.by_block is not None else None
        return Activations([self.hidden[i] for i in idx], [self.kwargs[i] for i in idx], by_block)

    def merged(self, idx: list[int] | None = None) -> "Activations":
        """The chunks ``idx`` (default: all) as one chunk, for the block these feed: a pass over many windows at
        once (Wanda++'s batched RO steps, its one-pass final prune) on inputs captured one window at a time.

        Raises ``ValueError`` when a keyword argument cannot be merged (``merge_arguments``); the callers then
        keep to the chunks as they are."""
        idx = list(range(len(self.hidden))) if idx is None else list(idx)
        sizes = [self.hidden[i].shape[0] for i in idx]
        kwargs = {k: merge_arguments([self.kwargs[i][k] for i in idx], sizes) for k in self.kwargs[idx[0]]}
        if any(self.kwargs[i].keys() != self.kwargs[idx[0]].keys() for i in idx):
            raise ValueError("the chunks were given different keyword arguments")
        return Activations([torch.cat([self.hidden[i] for i in idx])], [kwargs])


def merge_arguments(values: list[Any], sizes: list[int]) -> Any:
    """One keyword argument of several chunks (of ``sizes`` windows each) as the argument of their concatenation.

    The same object in every chunk is kept (a mask or a constant shared by all windows broadcasts); tensors whose
    first dimension is their chunk's size are concatenated (per-window rotary tables, position ids, masks); other
    tensors must be equal, as must plain values; tuples, lists and dicts are merged element by element. Anything
    else is refused with ``ValueError``: a block must never see arguments that do not match its windows."""
    first = values[0]
    if all(v is first for v in values):
        return first
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ValueError("a keyword argument is a tensor in some chunks only")
        if first.dim() > 0 and all(v.dim() == first.dim() and v.shape[0] == n for v, n in zip(values, sizes)):
            if all(v.shape[0] == 1 for v in values) and all(torch.equal(v, first) for v in values):
                return first  # one row broadcast to every window (chunks of one window cannot tell)
            return torch.cat(values)
        if all(v.shape == first.shape and torch.equal(v, first) for v in values):
            return first
        raise ValueError("a tensor argument differs between chunks and has no batch dimension")
    if isinstance(first, (tuple, list)):
        if any(not isinstance(v, type(first)) or len(v) != len(first) for v in values):
            raise ValueError("a sequence argument differs in length between chunks")
        return type(first)(merge_arguments([v[j] for v in values], sizes) for j in range(len(first)))
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise ValueError("a dict argument differs in its keys between chunks")
        return {k: merge_arguments([v[k] for v in values], sizes) for k in first}
    if all(type(v) is type(first) and v == first for v in values):
        return first
    raise ValueError(f"a {type(first).__name__} argument differs between chunks")


def _same_arguments(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] or (not isinstance(a[k], (torch.Tensor, tuple, list, dict))
                                                         and a[k] == b[k]) for k in a)


class _Captured(Exception):
    """Raised by the last block's stand-in to stop the forward pass once every block's inputs are captured."""


class _StopBlock(Exception):
    """Raised by a statistics hook once every Linear of the block has seen its input: the rest is not needed."""


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def activation_home(model: nn.Module, windows: torch.Tensor, device: str, act_dtype: torch.dtype | None) -> str:
    """Where the calibration activations are kept between blocks: on the device when two copies of them (a block's
    inputs and outputs) fit in half of its free memory, else in host memory, whence each chunk goes to the device
    for its turn and comes back (128 x 2048 windows of a 8192-wide model are 8.6 GB in fp32)."""
    if not str(device).startswith("cuda"):
        return device
    itemsize = (act_dtype or torch.float32).itemsize
    need = windows.numel() * model.config.hidden_size * itemsize
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return device if 2 * need <= free // 2 else "cpu"


@contextlib.contextmanager
def peak_device_memory(device: str, out: dict[str, Any]) -> Iterator[None]:
    """Record in ``out`` the peak memory allocated on a CUDA ``device`` during the ``with`` body (MiB)."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    yield
    if cuda:
        out["peak_device_memory_mib"] = round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)


def _before_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that run before the first block (embeddings, positions, rotary tables): every module outside the
    blocks except the final norm and the head, which the capture never reaches."""
    inside = {id(m) for m in _arch.blocks(model).modules()}
    after = {id(m) for f in [*_arch.final_modules(model), model.get_output_embeddings()] for m in f.modules()}
    return [m for m in model.modules() if id(m) not in inside and id(m) not in after]


@dataclass(frozen=True)
class _Scratch:
    """Stands for a mutable container that the model hands every block of one forward pass to share state through
    (Gemma 4's ``shared_kv_states``, which a block fills with its keys and values for later blocks to reuse): the
    container is recorded as its type and replayed as a fresh empty one on every call: exact while no block reads what another wrote, which the
    table guarantees by refusing the configs that share (``arch.Arch.refuse``); and no block's state is kept alive
    in the captured arguments, nor merged across chunks."""

    kind: type

    @staticmethod
    def of(value: Any) -> Any:
        return _Scratch(type(value)) if isinstance(value, UserDict) else value


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    kwargs = {k: v.kind() if isinstance(v, _Scratch) else v for k, v in kwargs.items()}
    out = block(hidden, **kwargs)
    # Decoder layers return a tensor in recent transformers releases and a tuple in older ones.
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: str = "cpu",
    act_dtype: torch.dtype | None = None,
    weights=None,
) -> Activations:
    weights = weights or InMemory()
    layers = _arch.blocks(model)
    before = _before_blocks(model)
    store = activation_home(model, windows, device, act_dtype)
    # A lazy model loads only the embedding rows these windows use (first: the rest of the modules before the
    # blocks must not bring in the whole embedding) and renumbers the windows into those rows.
    windows = weights.input_rows(model, windows, device)
    for m in before:
        weights.load(m, device, recurse=False)
    hidden: list[torch.Tensor] = []
    by_block: list[list[dict[str, Any]]] = [[] for _ in layers]

    # Each block is replaced, for the capture, by a stand-in that records its arguments and returns its input (so
    # the model's own loop hands every block what it would hand it, at the cost of none of them); the last one stops
    # the pass. ``forward`` is an instance attribute for the duration: the block keeps every other attribute the
    # model's loop may read (``attention_type``...), and an instance ``forward`` already there is put back after.
    # Arguments after the hidden states that the model's loop passes by position (Gemma 4's per-layer input) are
    # recorded by their names in the block's signature, and replayed as keywords.
    positional = [[n for n, p in inspect.signature(type(layer).forward).parameters.items()
                   if p.kind is p.POSITIONAL_OR_KEYWORD][2:] for layer in layers]

    def stand_in(i: int):
        def forward(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                hidden.append(h.to(device=store, dtype=act_dtype or h.dtype))
            if len(args) - 1 > len(positional[i]):  # a block taking *args: its arguments would be replayed wrongly
                raise RuntimeError(f"block {i} is called with {len(args) - 1} positional arguments its signature "
                                   "does not name")
            named = dict(zip(positional[i], args[1:]))
            by_block[i].append({k: _Scratch.of(v) for k, v in {**named, **kw}.items() if k != "hidden_states"})
            if i == len(layers) - 1:
                raise _Captured
            return h

        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = stand_in(i)
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
    finally:
        for layer, old in zip(layers, saved):
            if old is None:
                del layer.forward
            else:
                layer.forward = old
        for m in before:
            weights.unload(m, recurse=False)
    if len(by_block[-1]) != len(hidden):
        raise RuntimeError("the model did not call each of its decoder blocks once per batch")
    same = all(_same_arguments(kw[c], by_block[0][c]) for kw in by_block for c in range(len(hidden)))
    return Activations(hidden, by_block[0], None if same else by_block)


def run_block(block: nn.Module, acts: Activations, device: str, keep_outputs: bool = True) -> Activations | None:
    """Run ``block`` (already on ``device``) over every chunk; returns its outputs as the next block's inputs."""
    dtype = next(block.parameters()).dtype
    outs = []
    for h, kw in zip(acts.hidden, acts.kwargs):
        try:
            out = block_output(block, h.to(device=device, dtype=dtype), kw)
        except _StopBlock:
            continue
        if keep_outputs:
            outs.append(out.to(device=h.device, dtype=h.dtype))
    return acts.replaced(outs) if keep_outputs else None


@torch.no_grad()
def collect(block: nn.Module, acts: Activations, device: str, make_stat: Callable[[nn.Linear], Stat]) -> dict[str, Stat]:
    """One pass of ``block`` over the activations, feeding every Linear's input to a statistic.

    The pass stops as soon as every Linear has seen its input for a chunk (the block's last Linear is usually
    followed only by a residual add), which saves the tail of the block. Experts are run one by one through their
    views (``experts.routed``): each expert's statistic is of the tokens routed to it, and an expert no token
    reached has none.
    """
    with experts.routed_block(block):
        return _collect(block, acts, device, make_stat)[0]


@torch.no_grad()
def collect_and_run(block: nn.Module, acts: Activations, device: str,
                    make_stat: Callable[[nn.Linear], Stat]) -> tuple[dict[str, Stat], Activations]:
    """``collect`` and ``run_block`` in one pass, for a block whose weights the statistics will not change (a
    walk over the dense model): every chunk runs to the block's end, and its output is the next block's input."""
    with experts.routed_block(block):
        stats, outs = _collect(block, acts, device, make_stat, keep_outputs=True)
    return stats, acts.replaced(outs)


def _collect(block: nn.Module, acts: Activations, device: str, make_stat: Callable[[nn.Linear], Stat],
             keep_outputs: bool = False) -> tuple[dict[str, Stat], list[torch.Tensor]]:
    linears = block_linears(block)
    outs: list[torch.Tensor] = []
    stats: dict[str, Stat] = {}
    # Linears fed the very same tensor (q/k/v, gate/up) share one statistic: a Hessian is computed once, not
    # three times. Found on the first chunk from the tensors' identity, then reused for the others.
    leader: dict[str, str] = {}
    first_inputs: list[tuple[torch.Tensor, str]] = []  # held, so that no later tensor can reuse their memory
    seen: set[str] = set()

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            if name not in leader:
                leader[name] = next((n for t, n in first_inputs if t is x), name)
                first_inputs.append((x, name))
                stats[name] = stats[leader[name]] if leader[name] != name else make_stat(module)
            if leader[name] == name:
                stats[name].add(x)
            seen.add(name)
            if len(seen) == len(linears) and not keep_outputs:
                raise _StopBlock

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        for h, kw in zip(acts.hidden, acts.kwargs):
            seen.clear()
            try:
                out = block_output(block, h.to(device=device, dtype=next(block.parameters()).dtype), kw)
            except _StopBlock:
                pass
            else:
                if keep_outputs:
                    outs.append(out.to(device=h.device, dtype=h.dtype))
            first_inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return stats, outs


@torch.no_grad()
def sequential_pass(
    block: nn.Module,
    acts: Activations,
    device: str,
    make_stat: Callable[[nn.Linear], Stat],
    prune: Callable[[str, nn.Linear, Stat], None],
) -> Activations:
    """One pass of ``block`` over the calibration windows that prunes each Linear as its input arrives.

    The "true sequential" schedule (SparseGPT's ``--true-sequential``, from GPTQ): a Linear's statistic comes from
    the inputs that the *already pruned* Linears before it produce, and the pass's output is the pruned block's --
    the next block's inputs -- so the block is run once instead of twice (statistics, then propagation). A Linear
    must see every window before it is pruned, so the windows must arrive as one chunk. Linears fed the very same
    tensor (q/k/v, gate/up) share one statistic, as in ``collect``; experts are pruned as their tokens arrive, and
    one that none reaches is not pruned here (the caller falls back to magnitude for it).
    """
    if len(acts.hidden) != 1:
        raise ValueError("sequential_pass needs every calibration window in one chunk")
    with experts.routed_block(block):
        return _sequential_pass(block, acts, device, make_stat, prune)


def _sequential_pass(block, acts, device, make_stat, prune) -> Activations:
    last: list[tuple[torch.Tensor, Stat]] = []  # the previous Linear's input (held, so its memory is not reused)

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            if last and last[0][0] is x:
                stat = last[0][1]
            else:
                stat = make_stat(module)
                stat.add(x)
                last[:] = [(x, stat)]
            prune(name, module, stat)

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(n)) for n, lin in block_linears(block).items()]
    try:
        h, kw = acts.hidden[0], acts.kwargs[0]
        out = block_output(block, h.to(device=device, dtype=next(block.parameters()).dtype), kw)
        out = out.to(device=h.device, dtype=h.dtype)
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    return acts.replaced([out])


class Walk:
    """Iterate ``(index, block, inputs)`` with the block loaded on ``device``.

    After the caller's turn, the block is run on the inputs to make the next block's inputs (so later blocks see
    what the *modified* block produces), given to ``sink(index, block)`` if there is one, and unloaded.
    ``outputs`` holds the last block's outputs.
    """

    def __init__(self, model: nn.Module, acts: Activations, device: str, description: str, last_outputs: bool = True,
                 weights=None, sink: Callable[[int, nn.Module], None] | None = None):
        self.model, self.acts, self.device, self.description = model, acts, device, description
        self.weights, self.sink = weights or InMemory(), sink
        self.last_outputs = last_outputs  # pruning needs no outputs of the last block: skip that pass
        self.outputs: Activations | None = None
        # Set by the caller during its turn when it has already produced the block's outputs (a one-pass
        # schedule): the walk then uses them instead of running the block again.
        self.next_inputs: Activations | None = None

    def __iter__(self) -> Iterator[tuple[int, nn.Module, Activations]]:
        layers = _arch.blocks(self.model)
        acts = self.acts
        with progress(self.description, total=len(layers)) as advance:
            for i, block in enumerate(layers):
                acts = acts.feeding(i)
                self.weights.load(block, self.device)
                self.next_inputs = None
                yield i, block, acts
                if self.next_inputs is not None:
                    acts = self.next_inputs
                elif i < len(layers) - 1 or self.last_outputs:
                    with torch.no_grad():
                        acts = run_block(block, acts, self.device)
                if self.sink is not None:
                    self.sink(i, block)
                self.weights.unload(block)
                advance()
        self.outputs = acts


def stream(model: nn.Module, acts: Activations, device: str, description: str, weights=None,
           sink: Callable[[int, nn.Module], None] | None = None) -> Activations:
    """Run all blocks in sequence (no changes) and return the outputs of the last one."""
    w = Walk(model, acts, device, description, weights=weights, sink=sink)
    for _ in w:
        pass
    return w.outputs


