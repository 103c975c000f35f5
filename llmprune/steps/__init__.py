"""The workdir's steps: the one list of them, and what each is to the rest of the tool.

The manifest's reader (which commands may appear in a step record), the recipe loader (which commands a recipe may
name, in which order) and the CLI (which commands exist) read this table instead of keeping lists of their own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepKind:
    """``records``: the step appends a record to the manifest (``export`` writes outside the workdir and records
    nothing: a recipe always runs it). ``order``: its place among the steps that change the model, which a recipe
    must respect (None: anywhere after ``calibrate``, as ``eval``)."""

    name: str
    records: bool
    order: int | None


STEPS: dict[str, StepKind] = {s.name: s for s in (
    StepKind("calibrate", records=True, order=0),
    StepKind("regularize", records=True, order=1),
    StepKind("prune", records=True, order=2),
    StepKind("recover", records=True, order=3),
    StepKind("eval", records=True, order=None),
    StepKind("export", records=False, order=4),
)}
RECORDED = frozenset(name for name, s in STEPS.items() if s.records)  # what a manifest's step list may hold
