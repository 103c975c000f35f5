"""``llmprune export``: a clean Hugging Face folder, optionally pushed to the Hub (the step is ``steps/export.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune import report


def render(res: dict[str, Any], o: Any, workdir: Path) -> None:
    out = o.out
    if res.get("dry_run"):
        report.table(f"would write {out}" + (f" and upload to {o.push_to_hub}" if o.push_to_hub else ""),
                     ["file", "bytes"],
                     [[f["path"], f["bytes"] if f["path"] != "README.md" else "(model card)"] for f in res["files"]])
        return
    url = res["url"]
    report.table(f"exported {out}" + (f" → {url}" if url else ""), ["file", "bytes"],
                 [[f["path"], f["bytes"]] for f in res["files"]])

