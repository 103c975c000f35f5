"""Where a model's weights live while the engine walks it: all in memory, or in the shards until a module needs them.

The engine asks for one module at a time (a decoder block, the embeddings, the head) through ``load`` and gives it
back through ``unload``. ``InMemory`` moves a resident model between devices. ``Lazy`` builds the model's skeleton
without allocating a weight (accelerate's ``init_empty_weights``: every parameter on the ``meta`` device), reads a
module's tensors from the shards when it is loaded and puts meta tensors back when it is unloaded, so the peak is
one block plus the activations, whatever the size of the model.

A lazy model keeps each tensor in the checkpoint's own dtype (a bf16 release computes in bf16 and is written back in
bf16); statistics are accumulated in fp32 by ``stats``, whatever the weights' dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from llmprune import validate
from llmprune.errors import IntegrityError, first_line
from llmprune.shards import ShardSet


class InMemory:
    """A model held whole in host memory: loading moves a module to the device, unloading moves it back."""

    lazy = False

    def load(self, module: nn.Module, device: str, recurse: bool = True) -> None:
        _move(module, device, recurse)

    def unload(self, module: nn.Module, recurse: bool = True) -> None:
        _move(module, "cpu", recurse)

    def input_rows(self, model: nn.Module, windows: torch.Tensor, device: str) -> torch.Tensor:
        """The token ids to feed the model for ``windows`` (see ``Lazy.input_rows``): here, the windows."""
        return windows


def _move(module: nn.Module, device: str, recurse: bool) -> None:
    if recurse:
        module.to(device)
        return
    for p in module._parameters.values():  # the module's own tensors only (not its children's)
        if p is not None:
            p.data = p.data.to(device)
    for name, b in module._buffers.items():
        if b is not None:
            module._buffers[name] = b.to(device)


def _release_freed_memory() -> None:
    """Give the memory of the tensors just freed back to the system. glibc keeps freed chunks under its (dynamic)
    mmap threshold in the heap, and a walk that loads and frees one block after another leaves it so fragmented that
    the process grows by about a block per block (measured: 1.2 GB instead of 0.65 GB on a 0.6B-parameter model).
    ``malloc_trim`` once per block returns the free pages; a fixed low mmap threshold would too, at 60% more time."""
    global _trim
    if _trim is None:
        import ctypes
        import ctypes.util

        try:
            _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _trim = False
    if _trim:
        _trim(0)


_trim = None


@dataclass
class _Source:
    """What ``_skeleton`` read: the model (on ``meta``), its table row, and what of the checkpoint it does not use --
    a vision-language release's towers (``multimodal``, with ``text_only``) and the tensors the model class itself
    ignores on load (``_keys_to_ignore_on_load_unexpected``: DeepSeek-V3's and GLM-4.5's multi-token-prediction
    block, Qwen3.5's ``mtp.*``)."""

    model: nn.Module
    row: Any
    multimodal: Any  # arch.Multimodal or None
    release_type: str  # the checkpoint's own model_type (a vision-language release's, where text_only)
    unused: list[str]


def _skeleton(folder: Path, shards: ShardSet, what: str, error: type[Exception], text_only: bool) -> _Source:
    """The model built from ``folder``'s config on the ``meta`` device, once the config has been checked against
    itself and against the blocks the shards hold (``validate``). A vision-language release (``arch.MULTIMODAL``)
    gives its language model, when ``text_only`` allows it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from llmprune.arch import MULTIMODAL, arch_for

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:  # anything a config file can make the parser raise is a config that cannot be read
        raise error(f"cannot read the config of {what}: {first_line(e)}") from None
    release_type = config.model_type
    wrapper = MULTIMODAL.get(config.model_type) if text_only else None
    if wrapper is not None:
        config = _text_config(config, folder)
    row = arch_for(config.model_type)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    ignored = [re.compile(p) for p in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ()]
    towers = wrapper.others if wrapper is not None else ()
    unused = {n for n in shards.names() if n.startswith(towers) or any(p.search(n) for p in ignored)}
    names = [n for n in shards.names() if n not in unused]
    validate.check_config(config, what, error)
    validate.check_block_count(config, names, what, error)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # a value the config checks above do not know (a family's own field) that is wrong
        raise error(f"cannot build {what} from its config: {first_line(e)}") from None
    model.tie_weights()  # under init_empty_weights the tie is only declared; make it the same Parameter
    model.eval()
    if wrapper is not None:
        model.config.architectures = [type(model).__name__]  # what a text-only checkpoint of it declares
    return _Source(model, row, wrapper, release_type, sorted(unused))


def _text_config(config, folder: Path):
    """The language model's config of a vision-language release. A release may declare ``tie_word_embeddings`` at
    the top only, which transformers does not hand down: an explicit top-level value is copied in."""
    import json

    text = config.get_text_config()
    top = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if isinstance(top, dict) and "tie_word_embeddings" in top:
        text.tie_word_embeddings = bool(top["tie_word_embeddings"])
    return text


class Lazy:
    """A model whose weights stay in the safetensors shards of ``folder`` until a module is loaded.

    ``model`` is the skeleton (``meta`` parameters; buffers that the modules compute at construction, like rotary
    tables, are real). The shards must cover the skeleton exactly: a tensor missing, of the wrong shape, or not in
    the model is refused at once (``error``), never replaced by random values as ``from_pretrained`` would.
    """

    lazy = True

    def __init__(self, folder: str | Path, error: type[Exception] = IntegrityError, text_only: bool = False):
        from llmprune.arch import blocks

        self.folder = Path(folder)
        self.shards = ShardSet(self.folder, error)
        what = f"the model in {self.folder}"
        src = _skeleton(self.folder, self.shards, what, error, text_only)
        model, row, self.multimodal, self.release_type = src.model, src.row, src.multimodal, src.release_type
        self.model = model
        # Tensors of the checkpoint the model does not use (``_Source``): not read, not kept.
        self.dropped = src.unused
        # Every name a parameter answers to (a tied head and embedding are one Parameter, one tensor on disk).
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        self.key: dict[str, str] = {}  # parameter or persistent buffer name -> its tensor's name in the shards
        # A 3-D expert parameter stored one 2-D tensor per expert and source (how releases and save_pretrained keep
        # them): name -> per expert, the shard tensors whose rows, concatenated, are that expert's slice.
        self.parts: dict[str, list[list[str]]] = {}
        self._own: set[str] = set()
        self._read: set[str] = set()  # persistent buffers read from the shards (``load``)
        missing = self._map(model, row, groups, self._expert_sources(model, row, blocks, self._disk_name))
        shapes = {**{n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)},
                  **{n: tuple(b.shape) for n, b in model.named_buffers()}}
        self._check_cover(missing, shapes, what, error)
        self._shapes = shapes  # the skeleton's shapes: what a tensor is unloaded to, whatever was loaded
        self._names = {id(m): name for name, m in model.named_modules()}
        # The (module, attribute) pairs holding each parameter: a tied head and embedding must stay one Parameter
        # through every load and unload (a parameter count, or a weight tied on save, would otherwise see two).
        self._holders: dict[str, list[tuple[nn.Module, str]]] = {}
        for names in groups.values():
            holders = [(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]
            for n in names:
                self._holders[n] = holders

    def _map(self, model: nn.Module, row, groups: dict[int, list[str]], experts: dict[str, list[list[str]]]
             ) -> list[str]:
        """Fill ``key``, ``parts`` and ``_own`` from the shards' names; returns what the shards lack."""
        def on_disk(n: str) -> str | None:
            if self._disk_name(n) in self.shards:
                return self._disk_name(n)
            if n in self.shards:
                return n
            for ours, theirs in row.renames:
                if ours in n and n.replace(ours, theirs) in self.shards:
                    return n.replace(ours, theirs)
            return None

        missing: list[str] = []
        for names in groups.values():
            stored = [k for k in map(on_disk, names) if k is not None]
            if not stored:
                sources = experts.get(names[0])
                if sources and all(k in self.shards for e in sources for k in e):
                    self.parts[names[0]] = sources
                else:
                    missing.append(names[0])
                continue
            for n in names:
                self.key[n] = stored[0]
            # the name stored as itself (or as its renamed self) owns the tensor; its tied aliases do not
            self._own.add(next(n for n in names if on_disk(n) is not None))
        persistent = set(model.state_dict())
        for name, _ in model.named_buffers():
            if name in persistent and on_disk(name) is not None:
                self.key[name] = on_disk(name)
                self._own.add(name)
            elif name in persistent:
                missing.append(name)
        return missing

    def _check_cover(self, missing: list[str], shapes: dict[str, tuple[int, ...]], what: str,
                     error: type[Exception]) -> None:
        """The shards cover the skeleton exactly -- nothing missing, of the wrong shape or extra -- with weights of
        a dtype llmprune prunes."""
        wrong = sorted({key for name, key in self.key.items() if self.shards.entries[key].shape != shapes[name]})
        wrong += sorted(name for name, sources in self.parts.items() if self._stacked_shape(sources) != shapes[name])
        used = set(self.key.values()) | {k for sources in self.parts.values() for e in sources for k in e}
        # a tied weight stored twice is not extra; nor a vision-language release's towers, taken text-only
        extra = sorted(set(self.shards.names()) - used - set(self.key) - set(self.dropped))
        problems = [f"{len(names)} tensor(s) {label} ({', '.join(names[:3])}"
                    + (f" and {len(names) - 3} more)" if len(names) > 3 else ")")
                    for names, label in ((missing, "missing"), (wrong, "of the wrong shape"),
                                         (extra, "not in the model")) if names]
        if problems:
            raise error(f"the model in {self.folder} does not match its config.json: {'; '.join(problems)}")
        params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        validate.check_dtypes({**{k: self.shards.entries[k].dtype for n, k in self.key.items() if n in params},
                               **{k: self.shards.entries[k].dtype for sources in self.parts.values()
                                  for e in sources for k in e}}, what, error)

    @staticmethod
    def _expert_sources(model: nn.Module, row, blocks, disk_name) -> dict[str, list[list[str]]]:
        """Where a checkpoint in the per-expert layout keeps each 3-D expert parameter of ``model``: ``{name: [[shard
        tensors of expert 0], ...]}`` (the table's ``Experts.disk_path`` and sources)."""
        spec = row.experts
        if spec is None:
            return {}
        out = {}
        for i, block in enumerate(blocks(model)):
            mod = block.get_submodule(spec.path) if _has(block, spec.path) else None
            if mod is None:
                continue
            for param, sources in spec.params:
                if not sources:  # stored as the 3-D parameter itself (gpt-oss, Llama 4)
                    continue
                p = getattr(mod, param)
                out[f"{row.layers}.{i}.{spec.path}.{param}"] = [
                    [disk_name(f"{row.layers}.{i}.{spec.disk_path}.{e}.{src}.weight") for src in sources]
                    for e in range(p.shape[0])
                ]
        return out

    def _stacked_shape(self, sources: list[list[str]]) -> tuple[int, ...]:
        shapes = [[self.shards.entries[k].shape for k in e] for e in sources]
        first = shapes[0]
        if any(len(s) != 2 for e in shapes for s in e) or any(e != first for e in shapes):
            return ()
        return (len(shapes), sum(s[0] for s in first), first[0][1])

    def _stacked(self, name: str) -> torch.Tensor:
        """A 3-D expert parameter read from its per-expert tensors: ``stack_e(cat(sources of e))``."""
        return torch.stack([torch.cat([self.shards.get(k) for k in e]) for e in self.parts[name]])

    def _disk_name(self, name: str) -> str:
        """Where a checkpoint keeps the model's tensor ``name``: under the language model's prefix in a
        vision-language release, as itself otherwise."""
        for ours, theirs in self.multimodal.text if self.multimodal is not None else ():
            if name.startswith(ours):
                return theirs + name[len(ours):]
        return name

    def own_name(self, stored: str) -> str:
        """The name the model gives a stored tensor, where it differs from the checkpoint's (the language model of a
        vision-language release); otherwise the stored name, which copies keep (a release's per-expert layout)."""
        for ours, theirs in self.multimodal.text if self.multimodal is not None else ():
            if stored.startswith(theirs):
                return ours + stored[len(theirs):]
        return stored

    def owned(self, name: str) -> list[str]:
        """The shard tensors that hold the model's tensor ``name`` (none for an alias of a tied weight)."""
        if name in self.parts:
            return [k for e in self.parts[name] for k in e]
        return [self.key[name]] if name in self._own else []

    def stored(self, names: set[str]) -> set[str]:
        """The shard tensor names behind a set of the model's tensor names."""
        return {k for n in names for k in self.owned(n)}

    def order(self) -> list[str]:
        """Every stored tensor, once, in the model's own order."""
        return [k for n in self.model.state_dict() for k in self.owned(n)]

    def _members(self, module: nn.Module, recurse: bool = True) -> Iterator[tuple[nn.Module, str, str, bool]]:
        """``(owner, attribute, full name, is_parameter)`` of every tensor held by ``module`` (and its children)."""
        prefix = self._names[id(module)]
        for sub_name, sub in (module.named_modules() if recurse else [("", module)]):
            full = ".".join(p for p in (prefix, sub_name) if p)
            for attr, p in sub._parameters.items():
                if p is not None:
                    yield sub, attr, f"{full}.{attr}" if full else attr, True
            for attr, b in sub._buffers.items():
                if b is not None:
                    yield sub, attr, f"{full}.{attr}" if full else attr, False

    def load(self, module: nn.Module, device: str, recurse: bool = True) -> None:
        for owner, attr, name, is_param in self._members(module, recurse):
            if is_param:
                p = owner._parameters[attr]
                if p.device.type == "meta":
                    t = self._stacked(name) if name in self.parts else self.shards.get(self.key[name])
                    self._set(name, nn.Parameter(t.to(device), requires_grad=p.requires_grad))
                else:
                    p.data = p.data.to(device)
            else:
                # A persistent buffer the shards hold is read once: the skeleton's may be a real tensor at its init
                # value (a router's correction bias is built as zeros), not a meta one.
                b = owner._buffers[attr]
                fresh = name in self.key and (b.device.type == "meta" or name not in self._read)
                owner._buffers[attr] = (self.shards.get(self.key[name]) if fresh else b).to(device)
                if fresh:
                    self._read.add(name)

    def unload(self, module: nn.Module, recurse: bool = True) -> None:
        for owner, attr, name, is_param in self._members(module, recurse):
            if is_param:
                p = owner._parameters[attr]
                if p.device.type != "meta":
                    self._set(name, nn.Parameter(torch.empty(self._shapes[name], dtype=p.dtype, device="meta"),
                                                 requires_grad=p.requires_grad))
            else:
                owner._buffers[attr] = owner._buffers[attr].to("cpu")
        if recurse:
            _release_freed_memory()

    def input_rows(self, model: nn.Module, windows: torch.Tensor, device: str) -> torch.Tensor:
        """Load only the rows of the input embedding that ``windows`` use, and return the windows renumbered into
        them. A few thousand distinct tokens of a 128k-262k vocabulary: the capture needs megabytes of the
        embedding, not its gigabyte(s). The embedding goes back to ``meta`` (full shape) with the other modules
        before the first block."""
        from llmprune.arch import arch_for

        emb = model.get_input_embeddings()
        names = [f"{self._names[id(emb)]}.weight"]
        names += [f"{n}.weight" for n in arch_for(model.config.model_type).token_embeddings
                  if f"{n}.weight" in self._shapes]  # Gemma 4 has per-layer embeddings in some configs only
        used, renumbered = torch.unique(windows, return_inverse=True)
        for name in names:  # each embedding the token ids index (Gemma 4's per-layer one too): the same rows
            vocab = self._shapes[name][0]
            if used.numel() and not 0 <= int(used[0]) <= int(used[-1]) < vocab:
                raise IndexError(f"token ids {int(used[0])}..{int(used[-1])} outside the vocabulary ({vocab})")
            self._set(name, nn.Parameter(self.shards.pick_rows(self.key[name], used).to(device), requires_grad=False))
        return renumbered.reshape(windows.shape)

    def head_rows(self, model: nn.Module, start: int, stop: int, device: str):
        """Rows ``start:stop`` of the output embedding (and its bias), read alone: ``(weight, bias or None)``."""
        head = model.get_output_embeddings()
        base = self._names[id(head)]
        w = self.shards.rows(self.key[f"{base}.weight"], start, stop).to(device)
        b = self.key.get(f"{base}.bias")
        return w, (self.shards.rows(b, start, stop).to(device) if b else None)

    def _set(self, name: str, param: nn.Parameter) -> None:
        for owner, attr in self._holders[name]:
            owner._parameters[attr] = param

    def tensors(self, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name in the shards, tensor)`` of every stored tensor of a loaded ``module`` (an alias of a tied weight
        is not stored twice)."""
        for owner, attr, name, is_param in self._members(module):
            stored = self.owned(name)
            if not stored:
                continue
            t = owner._parameters[attr] if is_param else owner._buffers[attr]
            if t.device.type == "meta":
                raise RuntimeError(f"{name} is not loaded")
            t = t.detach()
            if name not in self.parts:
                yield stored[0], t
                continue
            for e, sources in enumerate(self.parts[name]):  # back to one 2-D tensor per expert and source
                start = 0
                for k in sources:
                    rows = self.shards.entries[k].shape[0]
                    yield k, t[e, start : start + rows]
                    start += rows

    def names(self, module: nn.Module) -> set[str]:
        """The shard tensors ``module`` holds."""
        return {k for _, _, name, _ in self._members(module) for k in self.owned(name)}


def _has(root: nn.Module, dotted: str) -> bool:
    try:
        root.get_submodule(dotted)
    except AttributeError:
        return False
    return True


class Rewrite:
    """A step's new model folder ``out`` written while the walk goes: the source's shard layout, each finished
    block's changed tensors written at once (``block``), the rest copied byte for byte (``close``), shards with
    nothing changed hard-linked. Files other than weights (config, tokenizer, generation config) are copied.

    ``changed`` names the tensors the step may change. A block holding NaN or infinite values stops the step before
    anything is committed, as ``modeling.save_model`` does for a model in memory.
    """

    def __init__(self, source: Lazy, out: Path, changed: set[str]):
        import shutil

        from llmprune.shards import INDEX, ShardWriter

        self.source, self.out, self.changed = source, Path(out), changed
        self.writer = ShardWriter.like(self.out, source.shards, changed)
        for f in source.folder.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX:
                shutil.copy2(f, self.out / f.name)

    def block(self, index: int, module: nn.Module) -> None:
        for name, t in self.source.tensors(module):
            if name in self.changed:
                validate.refuse_produced(validate.non_finite_count(t), name)
                self.writer.put(name, t)

    def close(self) -> dict[str, str]:
        """Finish the folder; returns the files that are hard links of the source's (their digests need no re-hash)."""
        self.writer.close(fill_from=self.source.shards)
        return {f: f for f in self.writer.linked}

    def abort(self) -> None:
        self.writer.abort()
