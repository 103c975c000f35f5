"""``STEPS``: every workdir step by name, one line each -- the one registry the CLI builds its commands from and
recipes and sweeps run steps through (``STEPS[name].run(workdir, options)``)."""

from __future__ import annotations

from llmprune.steps import KINDS
from llmprune.steps import calibrate, eval, export, prune, recover, regularize
from llmprune.steps.base import Step

STEPS: dict[str, Step] = {s.name: s for s in (
    calibrate.STEP,
    regularize.STEP,
    prune.STEP,
    recover.STEP,
    eval.STEP,
    export.STEP,
)}
assert list(STEPS) == list(KINDS), "steps/registry.py and steps/__init__.py list the same steps, in the same order"
