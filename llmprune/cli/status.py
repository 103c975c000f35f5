"""``llmprune status``: a workdir's steps, size, parameters and sparsity (reads only)."""

from __future__ import annotations

from typing import Any

import typer

from llmprune import report
from llmprune.cli._core import JsonOpt, WorkdirArg, finish, open_workdir

# The parameters a step's row shows, and how its result is summed up.
_BRIEF = ("model", "dataset", "samples", "seqlen", "method", "pattern", "sparsity", "max_windows", "structure", "ratio",
          "steps", "lam", "owl_lambda")


def _outcome(m: dict[str, Any]) -> str:
    # Every number is read back as written: strict JSON records a NaN or infinite value as null.
    num = report.number
    if "perplexity" in m:
        tasks = f", tasks mean {num(m['tasks_mean'], '.4f')}" if m.get("tasks_mean") is not None else ""
        backend = f" (llama.cpp, {m.get('gguf_type')})" if m.get("backend") == "llama.cpp" else ""
        return f"ppl {num(m['perplexity'])}{backend}{tasks}"
    if "units_removed" in m and "parameters" in m:
        return f"{num(m['parameters'], ',')} parameters"
    if "ppl_adapter" in m:
        return f"held-out ppl {num(m.get('ppl_before'), '.2f')} → {num(m.get('ppl_remasked', m['ppl_adapter']), '.2f')}"
    if "gap" in m:
        return f"zeroing gap {num(m['gap'], '.2%')}"
    if not isinstance(m.get("sparsity"), dict):
        return ""
    blocks = [b for b in m.get("block_sparsity") or [] if isinstance(b, (int, float))]
    spread = (f", blocks {min(blocks):.1%}–{max(blocks):.1%}"
              if blocks and max(blocks) - min(blocks) > 1e-3 else "")  # OWL: one sparsity per block
    return f"sparsity {num(m['sparsity'].get('all'), '.2%')}{spread}"


def status(ctx: typer.Context, workdir: WorkdirArg, as_json: JsonOpt = False) -> None:
    """The steps of a workdir, its size, parameter count and sparsity."""
    from llmprune import current, resume

    ws = open_workdir(ctx, workdir)
    manifest = ws.manifest()
    steps = manifest["steps"]
    adapter = None if not current.has_adapter(manifest) else (
        "unmerged" if current.pending_adapter(manifest) else "merged")
    # Bytes on disk: a file hard-linked under two names (teacher/ and model/ until a step replaces the model)
    # takes its space once.
    inodes = {}
    for rel in manifest["files"]:
        if (ws.path / rel).is_file():
            st = (ws.path / rel).stat()
            inodes[(st.st_dev, st.st_ino)] = st.st_size
    size = sum(inodes.values())
    teacher = any(k.startswith("teacher/") for k in manifest["files"])
    last_metrics = next((s["metrics"] for s in reversed(steps) if isinstance(s["metrics"].get("parameters"), int)), {})
    result = {"workdir": str(workdir), "format_version": manifest["format_version"],
              "base_model": manifest.get("base_model"), "model_type": manifest.get("model_type"),
              "bytes": size, "parameters": last_metrics.get("parameters"),
              "sparsity": last_metrics.get("sparsity", {}), "adapter": adapter, "teacher": teacher, "steps": steps,
              "checkpoints": resume.pending(ws.path)}

    def render() -> None:
        rows = []
        for i, s in enumerate(steps, 1):
            brief = ", ".join(f"{k}={v}" for k, v in s["params"].items() if v is not None and k in _BRIEF)
            rows.append([i, s["command"], brief, f"{s['duration_s']:.1f} s", _outcome(s["metrics"]), s["started"]])
        report.table(f"{workdir} ({manifest.get('model_type')}, {size / 2**20:,.1f} MiB, "
                     f"{report.number(last_metrics.get('parameters'), ',')} parameters"
                     + (f", LoRA adapter {adapter}" if adapter else "") + (", teacher kept" if teacher else "") + ")",
                     ["#", "step", "parameters", "duration", "result", "started"], rows)
        for c in result["checkpoints"]:
            at = f"step {c['step']}" if c["step"] is not None else "an unreadable state"
            report.info(f"an interrupted {c['command']} left a checkpoint at {at} ({c['bytes'] / 2**20:,.1f} MiB"
                        + (", with its corrected teacher" if c["teacher"] else "") + f", {c['path']}): the same "
                        f"command with the same options resumes from it; any {c['command']} that commits removes it")

    finish(result, as_json, render)
