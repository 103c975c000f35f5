"""What every structure kind is, and the helpers they share (docs/methods.md, section 8.2).

A kind (``hidden``, ``heads``, ...) is one module of this package that defines ``KIND``, an instance of a
``Structure`` subclass. It owns everything that differs from one kind to another: its vocabulary (what its units are
called, how many a model has, the ratios that remove any, the selections it takes), the parameter slices that couple
with its units (``couple``), the smaller config its removal needs (``resize``) and the scores ``--select
activation`` ranks its units by (``scorer``, or ``measure`` for a selection of its own). The modules that act on a
``structured.Plan`` -- ``structured``, ``surgery``, ``selection``, ``budget``, ``penalty`` -- look the kind up in
``structures.STRUCTURES`` and never branch on its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import engine
from llmprune.errors import UserError
from llmprune.stats import RowNorms

# The selections every kind takes: lowest score on calibration data, the last indices, seeded random.
COMMON_SELECTS = ("activation", "tail", "random")


@dataclass(frozen=True)
class Geometry:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    experts: int = 0  # routed experts per mixture-of-experts block (0: a dense model)
    expert_groups: int = 1  # groups a group-limited router chooses among (DeepSeek-V3: 8), contiguous in index

    @property
    def rep(self) -> int:  # query heads per KV group
        return self.heads // self.kv_heads


def geometry(model: nn.Module) -> Geometry:
    c = model.config
    parts = _arch.arch_for(c.model_type).parts
    heads = c.num_attention_heads
    # the global values of a heterogeneous config (Gemma 4), whose heads the table refuses to remove
    kv = _arch.config_value(c, "num_key_value_heads") or heads
    head_dim = _arch.config_value(c, "head_dim") or c.hidden_size // heads
    spec = _arch.arch_for(c.model_type).experts
    experts = int(getattr(c, spec.count, 0) or 0) if spec is not None else 0
    # An all-MoE config has no dense MLP width (Qwen3.5-MoE): 0, and its mlp structure is refused
    return Geometry(c.hidden_size, c.num_hidden_layers, heads, kv, head_dim, getattr(c, parts.mlp_width, 0), experts,
                    _arch.expert_groups(c))


@dataclass
class Slice:
    """Positions ``index`` along ``dim`` of parameter ``param`` belong to removed units; ``unit[i]`` is the unit
    (channel, KV group or block) of ``index[i]``, which the group norms of the DReSS penalty need."""

    param: str
    dim: int
    index: torch.Tensor
    unit: torch.Tensor


def module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


class Coupling:
    """The slices of one model being gathered: ``add`` a parameter's rows or columns, ``add_module`` a module's weight
    (and bias), ``blk`` a block's module name. What couples with each kind is its ``Structure.couple``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.a = _arch.arch_for(model.config.model_type)
        self.p = self.a.parts
        self.g = geometry(model)
        # Parameters, and buffers that are cut with them (a router's per-expert correction bias); the penalty and
        # ``structured.zero`` act on the parameters among the slices only.
        self.params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
        self.out: list[Slice] = []

    def add(self, name: str, dim: int, index: list[int], unit: list[int]) -> None:
        if name in self.params and index:
            self.out.append(Slice(name, dim, torch.tensor(index, dtype=torch.long),
                                  torch.tensor(unit, dtype=torch.long)))

    def add_module(self, mod: str, dim: int, index: list[int], unit: list[int], bias: bool) -> None:
        self.add(f"{mod}.weight", dim, index, unit)
        if bias:
            self.add(f"{mod}.bias", 0, index, unit)

    def blk(self, i: int, name: str) -> str:
        return f"{self.a.layers}.{i}.{name}"


@dataclass
class Surgery:
    """What a kind's removal does beyond cutting its slices out (``surgery.Removal`` holds it with the cuts)."""

    scale: dict[str, tuple[float, float]] = field(default_factory=dict)  # parameter -> (a, b): kept v -> a v + b
    gone: set[int] = field(default_factory=set)  # removed blocks
    renumber: dict[int, int] = field(default_factory=dict)  # old block index -> new, for blocks that stay
    # block -> {old expert index: new one, or None for one that goes}, for checkpoints with one tensor per expert
    experts: dict[int, dict[int, int | None]] = field(default_factory=dict)


def same_count(lengths: list[int], what: str, where: str = "block") -> int:
    """The one number of units removed from every block: a standard config holds one width per structure (which
    units go may differ per block)."""
    counts = set(lengths)
    if len(counts) > 1:
        raise UserError(f"a standard config needs the same number of {what} removed in every {where}")
    return counts.pop() if counts else 0


class Scorer(Protocol):
    """The ``activation`` scores of one kind, gathered on one walk of the dense model (``selection.scores``):
    ``block`` sees each block with its inputs, in order; ``result`` gets the last block's outputs."""

    def block(self, block: nn.Module, inputs: engine.Activations) -> None: ...

    def result(self, outputs: engine.Activations) -> torch.Tensor: ...


def contribution(x_norms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """How much each input channel of an output projection adds to the residual stream: ``||X_j|| * ||W_:,j||``
    (the Wanda score summed over a column, Sun et al. 2023)."""
    return x_norms.float() * weight.detach().float().norm(dim=0)


class Contribution:
    """Per block, the ``contribution`` of every input column of the output projection ``name``, folded into units
    by ``fold`` (KV groups sum their heads' columns); one row per block."""

    def __init__(self, name: str, device: str, fold=lambda c: c):
        self.name, self.device, self.fold = name, device, fold
        self.rows: list[torch.Tensor] = []

    def block(self, block: nn.Module, inputs: engine.Activations) -> None:
        stats = engine.collect(block, inputs, self.device, RowNorms)
        c = contribution(stats[self.name].norms("sum"), _arch.get_module(block, self.name).weight).cpu()
        self.rows.append(self.fold(c))

    def result(self, outputs: engine.Activations) -> torch.Tensor:
        return torch.stack(self.rows)


class Structure(ABC):
    """One structure kind: what ``--structure NAME`` removes. The class attributes are its vocabulary; the methods
    with a default hold for most kinds and are overridden where one differs."""

    name: str  # --structure NAME, and its module's name
    what: str  # its units in messages: "--ratio 0.9 would leave no {what}"
    # Its place in a combination's removal order (``structured.ORDER``): each part's indices refer to the original
    # model, which holds while the parts are independent index spaces and blocks go last.
    order: int
    per_block: bool  # a plan lists its units once per block (else once for the model)
    selects: tuple[str, ...] = COMMON_SELECTS  # the --select values it takes
    own_selects: tuple[str, ...] = ()  # selections only it takes, measured by its ``measure``
    activation: str = "activation"  # what a plan records for --select activation
    drops_blocks: bool = False  # its removal drops whole blocks rather than cutting slices out of them
    zeroing_removes: bool = True  # its units at zero compute what the model with them removed computes

    @abstractmethod
    def units(self, g: Geometry) -> int:
        """How many units one ratio applies to (per block for a per-block kind)."""

    def count(self, g: Geometry, n: int) -> int:
        """The number of units a ratio asking for ``n`` removes (``n``, unless the config allows only some)."""
        return n

    def fewest(self, g: Geometry) -> float:
        """The units a ratio must ask for before ``count`` removes any (half a unit: the rounding is half up)."""
        return 0.5

    def tail(self, g: Geometry, n: int) -> list[int]:
        """The last ``n`` unit indices (``--select tail``, and any ``n`` units where only their number matters)."""
        total = self.units(g)
        return list(range(total - n, total))

    def groups(self, g: Geometry) -> int:
        """Contiguous equal groups of units that must each lose the same number (1: any units may go)."""
        return 1

    def removable(self, config: Any, total: int, n: int) -> bool:
        """Whether a model of ``config`` can do without ``n`` of its ``total`` units (beyond what ``count``
        refuses)."""
        return True

    def keep_one(self, config: Any) -> tuple[set[int], str] | None:
        """A set of units of which a selection must leave at least one, and why; None if any units may go."""
        return None

    def missing(self, a: _arch.Arch, config: Any) -> str | None:
        """Why a model of this architecture and ``config`` has no units of this kind that can go, or None."""
        return None

    def where_present(self, model: nn.Module, removed: list[Any]) -> list[Any]:
        """A selection's per-block lists, emptied for blocks that have no units of this kind."""
        return removed

    @abstractmethod
    def couple(self, c: Coupling, removed: list[Any]) -> None:
        """Add to ``c`` every parameter slice that belongs to the ``removed`` units."""

    @abstractmethod
    def resize(self, model: nn.Module, removed: list[Any], g: Geometry, cfg: Any) -> Surgery:
        """Change ``cfg`` (a copy of the model's) into the smaller model's; what else the removal does."""

    def scorer(self, g: Geometry, parts: _arch.Parts, tokens: int, device: str) -> Scorer:
        """The ``activation`` scores' gatherer, for a walk over ``tokens`` calibration tokens."""
        raise ValueError(f"--structure {self.name} has no activation scores of its own")

    def measure(self, model: nn.Module, how: str, windows: torch.Tensor, device: str, batch_size: int,
                weights) -> tuple[list[torch.Tensor | None], dict[str, Any]]:
        """The scores of one of ``own_selects``: a row per block, and what the plan records of them."""
        raise ValueError(how)
