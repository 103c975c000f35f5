"""The structured-compression table of issue #20, composed from saved ``structured_bench.py`` runs.

One row per pruned model and recovery, for both real models: the structure (or combination and its budget), how
it was removed (DReSS or directly) and what regularize trained on, parameters, size on disk, test perplexity with
no recovery and after each recovery, prefill and decode speed-ups over dense at batch 1 and 8, and the seconds and
peak memory of regularize and of the recovery. Every cell comes from a saved run (``results/*-structured*.json``,
read in date order: a later run of the same row replaces an earlier one); the source column names the file, whose
``.md`` twin holds the command.

    python benchmarks/structured_table.py
    python benchmarks/structured_table.py --save structured-table    # also benchmarks/results/NAME-DATE.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}
# Dense test perplexity over the whole test split (docs/benchmarks.md), for rows saved before they recorded their own.
DENSE = {("smollm2-135m", 105): 14.59, ("gemma3-270m", 101): 30.47}
RECOVERY = {"none": "none", "lora-lm": "LoRA, LM loss", "lora-kd": "LoRA, distilled", "full-lm": "all weights, LM loss",
            "full-kd": "all weights, distilled"}


def trained_on(row: dict) -> str:
    """What regularize trained on. Rows saved before ``reg_trained_on`` existed (2026-12-06) trained on the
    calibration windows unless their options named the calibration text (``--dataset CALIB``)."""
    if row["mode"] != "dress":
        return "–"
    where = row.get("reg_trained_on")
    if where is None:
        where = "CALIB" if "--dataset CALIB" in (row.get("reg_options") or "") else "calibration windows"
    return "fresh windows" if where == "CALIB" else where


def size(row: dict) -> str:
    if row.get("budget"):
        split = row.get("split") or {}
        parts = ", ".join(f"{k} {v:.1%}" for k, v in split.items()) if isinstance(split, dict) else ""
        return f"{row['structure']} @ {row['budget']}" + (f" ({parts})" if parts else "")
    return f"{row['structure']} {float(row['ratio']):.0%}"


def regularize_options(row: dict) -> str:
    opts = re.sub(r"\s*--dataset CALIB", "", row.get("reg_options") or "").strip()
    return (opts or "defaults") if row["mode"] == "dress" else "–"


def recovery(row: dict) -> str:
    if row["recovery"] == "none":
        return "none"
    label = f"{RECOVERY.get(row['recovery'], row['recovery'])}, {row['steps']} steps"
    if row["recovery"].endswith("-kd") and row.get("teacher"):
        label += f" (teacher corrected {row['teacher']['steps']} steps)"
    return label


def calibration(row: dict) -> tuple:
    """The unit selection and calibration windows. Rows saved before they recorded them (2026-12-06) used the
    benchmark's defaults."""
    return row.get("select", "activation"), row.get("samples", 64), row.get("seqlen", 512)


def removal(row: dict) -> str:
    """DReSS or direct, with the selection and calibration where they are not the defaults."""
    select, samples, seqlen = calibration(row)
    notes = ([f"--select {select}"] if select != "activation" else []) + (
        [f"{samples} x {seqlen} calibration"] if (samples, seqlen) != (64, 512) else [])
    return ("DReSS" if row["mode"] == "dress" else "direct") + (f" ({', '.join(notes)})" if notes else "")


def fmt(v, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def collect(model: str) -> tuple[list[dict], list[str]]:
    rows: dict[tuple, dict] = {}
    sources = []
    files = sorted(RESULTS.glob(f"{MODELS[model]}-structured*.json"), key=lambda f: (f.stem[-10:], f.stem))
    for f in files:
        used = False
        for r in json.loads(f.read_text()):
            if r.get("model") != model or "structure" not in r:
                continue
            key = (size(r), r["mode"], trained_on(r), regularize_options(r), recovery(r), r.get("windows"),
                   *calibration(r))
            rows[key] = {**r, "source": f.stem}
            used = True
        if used:
            sources.append(f.name)
    return list(rows.values()), sources


def table(model: str) -> str:
    rows, sources = collect(model)
    if not rows:
        return f"No saved structured runs of {model}."
    rows.sort(key=lambda r: (r["budget"] is not None, size(r), r["mode"], trained_on(r), regularize_options(r),
                             r["recovery"] != "none", r.get("steps", 0), r["ppl"]))
    head = ("| structure | removal | regularize trained on | regularize options | parameters (removed) | MiB | "
            "recovery | test ppl (windows) | / dense | prefill x b1 / b8 | decode x b1 / b8 | regularize s / MiB | "
            "recover s / MiB | source |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        dense = r.get("dense_ppl") or DENSE.get((model, r.get("windows")))
        out.append("| " + " | ".join([
            size(r), removal(r), trained_on(r), regularize_options(r),
            f"{r['parameters']:,} ({r['removed']:.1%})", f"{r['model_mib']:.0f}", recovery(r),
            f"{r['ppl']:.2f} ({r['windows']})", f"{r['ppl'] / dense:.2f}" if dense else "–",
            f"{fmt(r.get('prefill_1'))} / {fmt(r.get('prefill_8'))}", f"{fmt(r.get('decode_1'))} / {fmt(r.get('decode_8'))}",
            f"{fmt(r.get('regularize_s'), '.0f')} / {fmt(r.get('regularize_rss_mib'), '.0f')}" if r.get("regularize_s") else "–",
            f"{fmt(r.get('recover_s'), '.0f')} / {fmt(r.get('recover_rss_mib'), '.0f')}" if r.get("recover_s") else "–",
            r["source"]]) + " |")
    return "\n".join(out) + "\n\nSources: " + ", ".join(sources)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--save", default="", help="also write benchmarks/results/NAME-DATE.md")
    args = ap.parse_args()
    text = "\n\n".join(f"## {m}\n\n{table(m)}" for m in MODELS)
    print(text)
    if args.save:
        out = RESULTS / f"{args.save}-{datetime.date.today().isoformat()}.md"
        out.write_text(f"Composed by `python benchmarks/structured_table.py --save {args.save}`.\n\n{text}\n")
        print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
