"""The workdir's steps: one module each (``steps/calibrate.py`` ... ``steps/export.py``), each an options class
declared once with ``llmprune.options.option`` and a ``run(workdir, options) -> result``; ``recipe`` and ``sweep``
sit on top of them. ``steps/registry.py`` holds ``STEPS``, the one registry the CLI, recipes and sweeps read.

This module is the steps' vocabulary alone -- which exist, which the manifest records, in which order a recipe may
run them -- so the manifest's reader can check a step record without importing the steps themselves.
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


KINDS: dict[str, StepKind] = {s.name: s for s in (
    StepKind("calibrate", records=True, order=0),
    StepKind("regularize", records=True, order=1),
    StepKind("prune", records=True, order=2),
    StepKind("recover", records=True, order=3),
    StepKind("eval", records=True, order=None),
    StepKind("export", records=False, order=4),
)}
RECORDED = frozenset(name for name, s in KINDS.items() if s.records)  # what a manifest's step list may hold
