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

    @property
    def linears(self) -> dict[str, nn.Linear]:
        return block_linears(self.block)

    def collect(self, make_stat: Callable[[nn.Linear], Any]) -> dict[str, Any]:
        """One pass of the block over the calibration inputs, feeding every Linear's input to a statistic."""
        assert self.acts is not None, "this method declared NEEDS_DATA = False"
        return engine.collect(self.block, self.acts, self.device, make_stat)
