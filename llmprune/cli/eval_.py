"""``llmprune eval``: measure the workdir's model and record it as a step (the step is ``steps/eval.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmprune import report
from llmprune.tasks import primary


def render(res: dict[str, Any], o: Any, workdir: Path) -> None:
    for m in res.get("evaluations") or [res]:  # one table per --dataset, each an eval step of its own
        _table(m, workdir)


def _table(m: dict[str, Any], workdir: Path) -> None:
    sp = m.get("speed", {})
    gguf = m.get("backend") == "llama.cpp"
    size = m["gguf_bytes"] if gguf else m["model_bytes"]
    report.table(
        f"eval {workdir} on {m['dataset']}" + (f" (llama.cpp, {m['gguf_type']} GGUF)" if gguf else ""),
        ["metric", "value"],
        [["perplexity", m["perplexity"]], ["windows", f"{m['windows']} × {m['seqlen']}"], ["parameters", m["parameters"]],
         ["size on disk", f"{size / 2**20:,.1f} MiB" + (" (the GGUF file)" if gguf else "")]]
        + [[f"sparsity {k}", f"{v:.2%}"] for k, v in m.get("sparsity", {}).items()]
        + [[k.replace("_", " "), " – ".join(map(report.fmt, v)) if isinstance(v, list) else v]
           for k, v in sp.items() if k not in ("prompt_len", "new_tokens", "batches", "reps", "threads")]
        + task_rows(m.get("tasks", {}), m.get("tasks_mean")))


def task_rows(results: dict, mean) -> list[list]:
    """One row per task: its accuracy ± stderr over its examples; and the mean."""
    rows = []
    for name, metrics in results.items():
        value, err = primary(metrics), metrics.get("acc_stderr")
        shown = "–" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else "")
        rows.append([f"{name} ({int(metrics.get('examples', 0))} examples)", shown])
    if len(results) > 1 and mean is not None:
        rows.append(["tasks mean", f"{mean:.4f}"])
    return rows

