"""What a method receives for one block."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from llmprune import engine
from llmprune.arch import block_linears
from llmprune.masks import Pattern


@dataclass
class PruneSpec:
    pattern: Pattern
    sparsity: float
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockContext:
    index: int
    block: nn.Module
    acts: engine.Activations | None  # None for methods that need no data
    device: str
    spec: PruneSpec
    # Set by a method that ran the one-pass schedule: the pruned block's outputs, so the engine need not run it again.
    outputs: engine.Activations | None = None

    @property
    def linears(self) -> dict[str, nn.Linear]:
        return block_linears(self.block)

    def collect(self, make_stat: Callable[[nn.Linear], Any]) -> dict[str, Any]:
        """One pass of the block over the calibration inputs, feeding every Linear's input to a statistic."""
        assert self.acts is not None, "this method declared NEEDS_DATA = False"
        return engine.collect(self.block, self.acts, self.device, make_stat)

    def prune_each_linear(self, make_stat: Callable[[nn.Linear], Any], prune_linear: Callable[[nn.Linear, Any], None]) -> None:
        """Prune every Linear from one statistic of its inputs, on either schedule.

        Default (the reference implementations'): all statistics from the block as it was, then prune, then the
        engine runs the pruned block for the next one -- two passes. ``true_sequential``: one pass that prunes each
        Linear as its input arrives (``engine.sequential_pass``), so later Linears see the pruned earlier ones.
        """
        assert self.acts is not None, "this method declared NEEDS_DATA = False"
        if self.spec.options.get("true_sequential"):
            self.outputs = engine.sequential_pass(self.block, self.acts, self.device, make_stat,
                                                  lambda _name, lin, stat: prune_linear(lin, stat))
            return
        stats = self.collect(make_stat)
        for name, lin in self.linears.items():
            prune_linear(lin, stats.pop(name))  # popped: each statistic is freed once its last Linear is done
