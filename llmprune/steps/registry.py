"""``STEPS``: every workdir step by name -- the one registry the CLI builds its commands from and recipes and
sweeps run steps through (``STEPS[name].run(workdir, options)``).

Each step is the module of its name (``steps/prune.py`` -> ``"prune"``), listed once, in ``KINDS``: a new step is its
module and that line.
"""

from __future__ import annotations

import importlib

from llmprune.steps import KINDS
from llmprune.steps.base import Step

STEPS: dict[str, Step] = {name: importlib.import_module(f"llmprune.steps.{name}").STEP for name in KINDS}
for _name, _step in STEPS.items():
    assert _step.name == _name and _step.kind is KINDS[_name], f"steps/{_name}.py defines STEP for {_step.name!r}"
