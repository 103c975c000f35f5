"""``llmprune calibrate``: start a workdir (the step is ``steps/calibrate.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune import report


def render(res: dict[str, Any], o: Any, workdir: Path) -> None:
    report.table(f"calibrated {workdir}", ["what", "value"],
                 [["model", o.model], ["model type", res["model_type"]], ["parameters", res["parameters"]],
                  ["dataset tokens", res["source_tokens"]], ["windows", " × ".join(map(str, res["windows"]))]])

