"""The Wanda++ / OWL table of issue #22, composed from saved ``prune_bench.py`` runs.

The whole table (two models x four methods x OWL or not x five patterns) is hours of CPU time, more than one run
can hold, so it is measured in pieces (``prune_bench.py --cells ... --save NAME``) and put together here. Each
piece times a full forward pass over the calibration windows in the same run, so a row's prune seconds are read
as ``prune_s / forward_s`` of its own run, and a cell's time against Wanda's is the ratio of those two ratios
(Wanda's cell of the same pattern, whichever run it came from) -- the machine's pace divided out.

    python benchmarks/wandapp_table.py                       # every saved run of both models
    python benchmarks/wandapp_table.py --save wandapp-owl-table   # also benchmarks/results/NAME-DATE.md

A later run's cell replaces an earlier one's (files are read in date order). A cell nobody measured reads "–".
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODELS = {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}  # model -> the prefix of its results files
METHODS = ["wanda", "wanda-owl", "sparsegpt", "sparsegpt-owl", "wandapp", "wandapp-owl", "wandapp-paper",
           "wandapp-paper-owl"]
PATTERNS = ["0.5", "0.6", "0.7", "2:4", "4:8"]
# A variant's cells count only from runs on or after the day its meaning last changed: ``wandapp`` is
# ``prune --method wandapp`` with no options, whose defaults changed on these days (the paper's settings until
# 2026-12-03; the relative step from 12-04; --ro-norms mixed from 12-05).
SINCE = {"wandapp": "2026-12-05", "wandapp-owl": "2026-12-05"}
# ... and on 2026-12-06 the fixed RO mask, within the day: those cells count from rows that recorded the options
# their step ran with (prune_bench.py's ``options``, since then) and show these. Until such a row exists, the cell
# shows the latest earlier row, marked with STALE.
REQUIRES = {"wandapp": {"ro_mask": "fixed"}, "wandapp-owl": {"ro_mask": "fixed"}}
STALE = "†"
STALE_NOTE = (f"{STALE} measured with the Wanda++ defaults before 2026-12-06 (`--ro-mask free`), not yet with "
              "today's (`--ro-mask fixed`).")
LABEL = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "wandapp": "Wanda++ defaults", "wandapp-paper": "Wanda++ paper"}


def pattern_key(p: str) -> str:
    return "0.5" if p == "unstructured" else (str(float(p)) if re.fullmatch(r"[0-9.]+", p) else p)


def _of(name: str, model: str) -> bool:
    """Whether a results file is of ``model``: named after it, or -- SmolLM2, the protocol's first model, whose
    early runs carry no model prefix (``baselines-2026-11-25.json``) -- named after no model."""
    if name.startswith(MODELS[model]):
        return True
    return model == "smollm2-135m" and not any(name.startswith(p) for p in MODELS.values())


def load(model: str, files: list[Path], owl_lambda: float = 0.08) -> dict[tuple[str, str], dict]:
    """(method, pattern) -> the latest row of ``model`` among the saved prune_bench runs; an OWL variant's only
    from runs at ``owl_lambda`` (rows from before prune_bench recorded it ran the paper's 0.08)."""
    cells: dict[tuple[str, str], dict] = {}
    stale: dict[tuple[str, str], dict] = {}
    dated = [(re.search(r"\d{4}-\d{2}-\d{2}", f.name), f) for f in files]
    for day, f in sorted((d.group(0), f) for d, f in dated if d):
        rows = json.loads(f.read_text())
        for r in rows if isinstance(rows, list) else []:
            if not {"method", "pattern", "ppl", "prune_s", "forward_s"} <= r.keys():
                continue  # not a prune_bench row (an ablation's, a sweep's)
            if r.get("model", model) != model or not _of(f.name, model):
                continue
            if day < SINCE.get(r["method"], ""):
                continue  # measured with what the variant meant then
            if r["method"].endswith("-owl") and r.get("owl_lambda", 0.08) != owl_lambda:
                continue
            current = all((r.get("options") or {}).get(k) == v for k, v in REQUIRES.get(r["method"], {}).items())
            (cells if current else stale)[r["method"], pattern_key(r["pattern"])] = dict(
                r, source=f.name, stale=not current)
    return {**stale, **cells}


def cell(cells: dict, method: str, pattern: str) -> str:
    r = cells.get((method, pattern))
    if r is None:
        return "–"
    w = cells.get(("wanda", pattern))
    text = f"{r['ppl']:.2f}"
    if w and method != "wanda":
        pace = (r["prune_s"] / r["forward_s"]) / (w["prune_s"] / w["forward_s"])
        text += f" ({r['ppl'] / w['ppl']:.2f}x, {pace:.1f}x s)"
    elif method == "wanda":
        text += f" ({r['prune_s'] / r['forward_s']:.2f} fwd)"
    return text + (f" {STALE}" if r.get("stale") else "")


def table(model: str, cells: dict, owl_lambda: float = 0.08) -> str:
    lines = [f"| {model} | " + " | ".join("50%" if p == "0.5" else (f"{float(p):.0%}" if "." in p else p)
                                        for p in PATTERNS) + " |",
             "|---" * (len(PATTERNS) + 1) + "|"]
    for m in METHODS:
        base = m.removesuffix("-owl")
        label = LABEL[base] + (f" + OWL (lambda {owl_lambda:g})" if m.endswith("-owl") else "")
        lines.append(f"| {label} | " + " | ".join("n/a" if m.endswith("-owl") and ":" in p else cell(cells, m, p)
                                                  for p in PATTERNS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="default: every benchmarks/results/*.json")
    ap.add_argument("--save", default="", help="also write benchmarks/results/NAME-DATE.md")
    ap.add_argument("--owl-lambda", type=float, default=0.08, help="the OWL rows' lambda (prune_bench --owl-lambda)")
    args = ap.parse_args()
    files = args.files or sorted(RESULTS.glob("*.json"))
    out = ["Perplexity on the test split (x Wanda's perplexity, x Wanda's prune seconds at the same pattern, each "
           "run's seconds divided by its own forward pass); Wanda's cells give prune seconds in forward passes. "
           "Composed by `python benchmarks/wandapp_table.py` from saved `prune_bench.py` runs."]
    for model in MODELS:
        cells = load(model, files, args.owl_lambda)
        out += ["", table(model, cells, args.owl_lambda), "", "Sources: " + ", ".join(sorted({r["source"] for r in cells.values()
                                                                          if r["method"] in METHODS}))]
    if any(STALE in line for line in out):
        out += ["", STALE_NOTE]
    text = "\n".join(out)
    print(text)
    if args.save:
        import datetime

        (RESULTS / f"{args.save}-{datetime.date.today().isoformat()}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
