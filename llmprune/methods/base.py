"""What a pruning method is: its options, what it can do, and what it receives for one block.

A method is one module under ``llmprune/methods/`` that defines ``METHOD``, an instance of a ``Method`` subclass, and
one line in the registry (``methods/__init__.py``). Everything else reads the declaration: the ``prune`` command
builds its options and help from ``Options``, the recipe loader checks a step's options against it, ``prune`` refuses
``--true-sequential`` for a method that does not declare it, and ``recover`` asks ``exact_zeros`` whether a pruned
model has a zero pattern to keep.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from llmprune import engine
from llmprune.units import block_linears
from llmprune.masks import Pattern
from llmprune.options import check_value, specs
from llmprune.stats import Stat

if TYPE_CHECKING:
    from llmprune.workdir import Workdir


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


# --- the method -------------------------------------------------------------------------------------------------
class Method:
    """A pruning method's declaration. Subclasses set the class attributes and implement ``prune_block`` (methods
    that zero weights) or ``prune_workdir`` (structured methods, which change the model's shape)."""

    name: ClassVar[str]  # the registry key and the ``--method`` value
    label: ClassVar[str]  # how help texts and tables name it
    summary: ClassVar[str]  # one line for ``prune --help``
    Options: ClassVar[type] = NoOptions
    needs_data: ClassVar[bool] = True  # reads calibration activations
    per_sample: ClassVar[bool] = False  # the engine gives it chunks of one window
    true_sequential: ClassVar[bool] = False  # supports the one-pass schedule (BlockContext.prune_each_linear)
    exact_zeros: ClassVar[bool] = True  # the pruned model holds a zero pattern that later steps must keep
    structured: ClassVar[bool] = False  # removes whole units: the model gets a smaller config

    def options(self, given: dict[str, Any]) -> Any:
        """The typed options: the declared defaults, overridden by the values ``given`` (None = not given)."""
        values = {}
        for o in specs(self.Options):
            v = given.get(o.name)
            if v is not None:
                check_value(o, v)
                values[o.name] = v
        return self.Options(**values)

    def check_request(self, options: Any, true_sequential: bool) -> None:
        """Refuse (``UserError``) a schedule these options leave nothing to do for."""

    def warnings(self, options: Any, calibration_samples: int) -> list[str]:
        """What to warn the user about before a run with these options (e.g. too few samples)."""
        return []

    def prune_block(self, ctx: BlockContext) -> None:
        raise NotImplementedError(f"{self.name} does not prune block by block")

    def prune_workdir(self, ws: Workdir, options: Any, *, device: str, batch_size: int) -> dict[str, Any]:
        """Structured methods: the whole ``prune`` step on the workdir; returns its result."""
        raise NotImplementedError(f"{self.name} is not a structured method")


class ScoreMethod(Method):
    """A method that zeroes, in each Linear, the weights of lowest ``score(weight, ||X_j||, options)`` (Wanda, RIA):
    one statistic of the inputs (``RowNorms``), either schedule, the pattern's comparison group."""

    true_sequential = True

    def score(self, weight: torch.Tensor, norms: torch.Tensor, options: Any) -> torch.Tensor:
        raise NotImplementedError

    def per_row(self, options: Any) -> bool:
        """Unstructured sparsity compares scores per output row (True) or across the whole layer (False)."""
        return True

    @torch.no_grad()
    def prune_block(self, ctx: BlockContext) -> None:
        from llmprune.masks import select
        from llmprune.stats import RowNorms

        opts = ctx.spec.options

        def prune_linear(lin: nn.Linear, stat: RowNorms) -> None:
            w = lin.weight.data
            # masked_fill_, not w[mask] = 0: boolean indexing builds the masked entries' int64 coordinates first
            # (134 MB for half of a 16M-weight layer).
            w.masked_fill_(select(self.score(w, stat.norms("sum"), opts), ctx.spec.pattern, ctx.spec.sparsity,
                                  per_row=self.per_row(opts)), 0)

        ctx.prune_each_linear(RowNorms, prune_linear)


# --- what a method receives for one block ---------------------------------------------------------------------------
@dataclass
class PruneSpec:
    pattern: Pattern
    sparsity: float
    options: Any = field(default_factory=NoOptions)  # the method's Options instance
    true_sequential: bool = False
    # One sparsity per block instead of ``sparsity`` everywhere (what OWL chose, set by ``prune_model``).
    block_sparsity: list[float] | None = None

    def for_block(self, index: int) -> "PruneSpec":
        """What block ``index`` is pruned to: the same spec with that block's own sparsity."""
        if self.block_sparsity is None:
            return self
        return dataclasses.replace(self, sparsity=self.block_sparsity[index], block_sparsity=None)


@dataclass
class BlockContext:
    index: int
    block: nn.Module
    acts: engine.Activations | None  # None for methods that need no data
    device: str
    spec: PruneSpec
    # Set by a method that ran the one-pass schedule: the pruned block's outputs, so the engine need not run it again.
    outputs: engine.Activations | None = None
    # Prunable weights that had no calibration input (experts no token was routed to), pruned by magnitude instead.
    no_tokens: list[str] = field(default_factory=list)

    @torch.no_grad()
    def fallback(self, name: str, lin: nn.Linear) -> None:
        """Prune a weight that received no calibration token by magnitude (compared over the whole weight, as the
        magnitude method does): it has no statistics to score with. Counted, and reported by the step."""
        from llmprune.masks import select

        w = lin.weight.data
        w.masked_fill_(select(w.abs(), self.spec.pattern, self.spec.sparsity, per_row=False), 0)
        self.no_tokens.append(name)

    @property
    def linears(self) -> dict[str, nn.Linear]:
        return block_linears(self.block)

    def collect(self, make_stat: Callable[[nn.Linear], Stat]) -> dict[str, Stat]:
        """One pass of the block over the calibration inputs, feeding every Linear's input to a statistic."""
        assert self.acts is not None, "this method declared needs_data = False"
        return engine.collect(self.block, self.acts, self.device, make_stat)

    def prune_each_linear(self, make_stat: Callable[[nn.Linear], Stat],
                          prune_linear: Callable[[nn.Linear, Stat], None]) -> None:
        """Prune every Linear from one statistic of its inputs, on either schedule.

        Default (the reference implementations'): all statistics from the block as it was, then prune, then the
        engine runs the pruned block for the next one -- two passes. ``true_sequential``: one pass that prunes each
        Linear as its input arrives (``engine.sequential_pass``), so later Linears see the pruned earlier ones.
        """
        assert self.acts is not None, "this method declared needs_data = False"
        if self.spec.true_sequential:
            done: set[str] = set()

            def prune(name: str, lin: nn.Linear, stat: Stat) -> None:
                prune_linear(lin, stat)
                done.add(name)

            self.outputs = engine.sequential_pass(self.block, self.acts, self.device, make_stat, prune)
            for name, lin in self.linears.items():
                if name not in done:
                    self.fallback(name, lin)
            return
        stats = self.collect(make_stat)
        for name, lin in self.linears.items():
            if name not in stats:  # an expert no calibration token was routed to
                self.fallback(name, lin)
                continue
            stat = stats.pop(name)  # popped: each statistic is freed once its last Linear is done
            # Its last user may consume it in place (SparseGPT factorises the Hessian itself instead of a copy).
            stat.last_use = all(s is not stat for s in stats.values())
            prune_linear(lin, stat)
