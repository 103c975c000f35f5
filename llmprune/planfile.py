"""DReSS's plan file, ``WORK/dress/plan.json``: the units ``regularize`` chose and how far the workdir has gone with
them -- regularised and pending, or applied by ``prune --method dress``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmprune.structured import Plan

if TYPE_CHECKING:
    from llmprune.workdir import Transaction, Workdir


PLAN = "dress/plan.json"


@dataclass
class PlanRecord:
    """``WORK/dress/plan.json``: the units chosen and how far the workdir has gone with them. ``regularize`` writes
    it regularised and not applied; ``prune --method dress`` applies it (or, on a workdir never regularised, selects
    and applies in one go). Only a plan that is not yet applied is pending for the next prune."""

    plan: Plan
    regularized: bool
    applied: bool

    def write(self, tx: Transaction) -> None:
        d = tx.stage("dress")
        d.mkdir()
        (d / "plan.json").write_text(json.dumps({**self.plan.to_json(), "regularized": self.regularized,
                                                 "applied": self.applied}, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def pending(cls, ws: Workdir) -> PlanRecord | None:
        """The regularised plan the next ``prune --method dress`` must apply, checked against its hash; or None."""
        path = ws.path / PLAN
        if not path.is_file():
            return None
        ws.verify("dress")
        d = json.loads(path.read_text(encoding="utf-8"))
        if d.get("applied"):
            return None
        plan = Plan.from_json({k: v for k, v in d.items() if k not in ("regularized", "applied")})
        return cls(plan, bool(d.get("regularized")), False)
