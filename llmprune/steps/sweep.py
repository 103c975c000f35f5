"""``sweep``: a grid of prune configurations from one calibrated workdir, each evaluated, with tables and plots.

Each configuration runs in its own workdir under ``WORK/sweep/runs/NAME``, made by hard-linking the calibrated
workdir's files (free in space: steps never modify a file in place), through the very command lines a user would
type. A configuration is done once its row is in ``WORK/sweep/results.json`` (rewritten atomically after each
one), keyed by a fingerprint of its command lines and of the calibrated state, so a killed or re-run sweep skips
what is done and redoes only a configuration whose row is missing. The pruned models are deleted once measured
unless ``--keep-models`` (a grid over an 8B model would otherwise hold one 16 GB copy per point).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmprune import budget as _budget
from llmprune import data, report
from llmprune import owl as _owl
from llmprune.errors import UserError
from llmprune.fsio import atomic_write_text, dumps
from llmprune.options import (batch_option, check_all, check_device, device_option, option, positive,
                              text_field_option)
from llmprune.paths import component
from llmprune.steps.base import Step, from_argv
from llmprune.steps.eval import calibration_seqlen
from llmprune.steps.registry import STEPS
from llmprune.workdir import SWEEP, Workdir

GRID, EVAL = "The grid", "Evaluation of each point"


@dataclass(frozen=True)
class SweepOptions:
    """What ``llmprune sweep`` was asked for (each point records its own steps in its own workdir)."""

    methods: Optional[str] = option(None, "Score methods, comma-separated (wanda,sparsegpt,wandapp,...).", panel=GRID)
    sparsities: Optional[str] = option(None, "Unstructured sparsities for every method, e.g. 0.3,0.5,0.6,0.7.",
                                       panel=GRID)
    patterns: Optional[str] = option(None, "N:M patterns for every method, e.g. 2:4,4:8.", panel=GRID)
    structures: Optional[str] = option(None, "Structured removals (direct, prune --method dress): STRUCTURE:RATIO or "
                                       "STRUCTURE@BUDGET (--target-params; A+B splits it), e.g. "
                                       "hidden:0.1,mlp:0.25,layers+mlp@0.8.", panel=GRID)
    owl: Optional[str] = option(None, "OWL lambdas, e.g. 0.08: every method at every --sparsities again with prune "
                                "--owl-lambda (a line of its own in the plots).", panel=GRID)
    prune_args: str = option("", "Extra options for every score-method prune, e.g. '--batch-size 8'.", panel=GRID)
    dataset: Optional[str] = option(None, "Evaluation source (default: the test split of the calibration dataset).",
                                    panel=EVAL)
    seqlen: Optional[int] = option(None, "Tokens per evaluation window (default: the calibration's).", check=positive,
                                   panel=EVAL, show_default=False)
    max_windows: Optional[int] = option(None, "Evaluate at most this many windows.", panel=EVAL)
    text_field: str = text_field_option()
    tasks: Optional[str] = option(None, "Zero-shot tasks for every point (as eval --tasks).", panel=EVAL)
    limit: Optional[int] = option(None, "With --tasks: at most this many examples per task.", panel=EVAL)
    num_fewshot: Optional[int] = option(None, "With --tasks: few-shot examples for lm-eval tasks.", panel=EVAL)
    speed: bool = option(True, "Time structured points against the dense model (eval --speed).", panel=EVAL)
    prompt_len: int = option(512, "With --speed: prompt tokens of the prefill.", check=positive, panel=EVAL)
    new_tokens: int = option(64, "With --speed: tokens decoded through the KV cache.", check=positive, panel=EVAL)
    keep_models: bool = option(False, "Keep every point's pruned model under WORK/sweep/runs/ (default: delete it once "
                               "measured).")
    device: str = device_option()
    batch_size: int = batch_option()

PATTERNS_SPARSITY = 0.5  # where an N:M row sits on a sparsity axis is N/M; 2:4 and 4:8 are both 0.5


@dataclass(frozen=True)
class Config:
    """One point of the grid: its name, what it is, and the prune options (none for the dense row)."""

    name: str
    kind: str  # dense, unstructured, pattern, structured
    method: str | None = None
    sparsity: float | None = None
    pattern: str | None = None
    structure: str | None = None
    ratio: float | None = None
    owl: float | None = None  # OWL's lambda (``prune --owl-lambda``); None: uniform sparsity
    budget: str | None = None  # ``--target-params`` of a structured point given as STRUCTURE@BUDGET
    prune: list[str] = field(default_factory=list)

    @property
    def series(self) -> str | None:
        """The line a point belongs to in the plots: its method, with OWL a line of its own."""
        return self.method if self.owl is None else f"{self.method}+owl{self.owl:g}"


def _floats(spec: str | None, what: str) -> list[float]:
    out = []
    for v in (spec or "").split(","):
        if v.strip():
            try:
                out.append(float(v))
            except ValueError:
                raise UserError(f"{what}: {v!r} is not a number") from None
    return out


def grid(methods: str | None, sparsities: str | None, patterns: str | None, structures: str | None,
         prune_args: str = "", owl: str | None = None) -> list[Config]:
    """The configurations, dense first: every method at every sparsity (and with each OWL lambda of ``owl`` at
    each, too) and every pattern, then every structure (direct removal, ``prune --method dress``) at its ratio
    (``STRUCTURE:RATIO``) or parameter budget (``STRUCTURE@BUDGET``, ``--target-params``; a combination such as
    ``layers+mlp`` splits the budget by the search of ``llmprune.budget``)."""
    extra = shlex.split(prune_args)
    names = [m.strip() for m in (methods or "").split(",") if m.strip()]
    sp = _floats(sparsities, "--sparsities")
    lambdas = _floats(owl, "--owl")
    if lambdas and not sp:
        raise UserError("--owl sets block sparsities at unstructured sparsity: give --sparsities too")
    if any(a.startswith("--owl") for a in extra):
        raise UserError("give OWL as --owl LAMBDAS (a line of its own in the plots), not in --prune-args")
    from_argv(STEPS["prune"], extra, "--prune-args")  # a bad option is refused before any point runs
    for lam in lambdas:
        for v in sp:
            try:
                _owl.check(v, lam, _owl.DEFAULT_M)
            except UserError as e:
                raise UserError(f"--owl {lam:g} at sparsity {v:g}: {e}") from None
    pats = [p.strip() for p in (patterns or "").split(",") if p.strip()]
    if (sp or pats) and not names:
        raise UserError("--sparsities and --patterns need --methods")
    if names and not (sp or pats):
        raise UserError("--methods needs --sparsities or --patterns")
    if "dress" in names:
        raise UserError("dress removes whole units: give it as --structures STRUCTURE:RATIO, not in --methods")
    out = [Config("dense", "dense")]
    for m in names:
        out += [Config(f"{m}-{s:g}", "unstructured", m, s, prune=["--method", m, "--sparsity", f"{s:g}", *extra])
                for s in sp]
        out += [Config(f"{m}-{s:g}-owl{lam:g}", "unstructured", m, s, owl=lam,
                       prune=["--method", m, "--sparsity", f"{s:g}", "--owl-lambda", f"{lam:g}", *extra])
                for lam in lambdas for s in sp]
        out += [Config(f"{m}-{p.replace(':', 'of')}", "pattern", m, PATTERNS_SPARSITY, p,
                       prune=["--method", m, "--pattern", p, *extra]) for p in pats]
    for spec in (s.strip() for s in (structures or "").split(",") if s.strip()):
        if "@" in spec:
            structure, _, target = spec.partition("@")
            # The format is refused before anything runs; whether it is below the model is prune's to say.
            _budget.parse_budget(target, total=2**62)
            out.append(Config(f"{structure}@{target}", "structured", "dress", structure=structure, budget=target,
                              prune=["--method", "dress", "--structure", structure, "--target-params", target]))
            continue
        if "+" in spec:
            raise UserError(f"--structures {spec!r}: a combination splits a budget; give it as {spec.split(':')[0]}@0.8")
        structure, _, ratio = spec.partition(":")
        r = _floats(ratio, f"--structures {spec}")
        if len(r) != 1:
            raise UserError(f"--structures {spec!r}: give STRUCTURE:RATIO or STRUCTURE@BUDGET, e.g. hidden:0.25 "
                            "or layers+mlp@0.8")
        out.append(Config(f"{structure}-{r[0]:g}", "structured", "dress", structure=structure, ratio=r[0],
                          prune=["--method", "dress", "--structure", structure, "--ratio", f"{r[0]:g}"]))
    if len(out) == 1:
        raise UserError("nothing to sweep: give --methods with --sparsities/--patterns, or --structures")
    seen = set()
    for c in out:
        # each name is a folder under WORK/sweep/runs: one plain name, never a way out of it
        component(c.name, "the sweep point (a folder named from --methods/--patterns/--structures)")
        if c.name in seen:
            raise UserError(f"configuration {c.name} appears twice")
        seen.add(c.name)
    return out


def fingerprint(cfg: Config, eval_args: list[str], base_manifest: dict[str, Any]) -> str:
    """What makes a row reusable: the command lines and the calibrated state they start from."""
    doc = {"prune": cfg.prune, "eval": eval_args, "files": base_manifest.get("files"),
           "steps": [(s.get("command"), s.get("params")) for s in base_manifest.get("steps", [])]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _point(cfg: Config) -> dict[str, Any]:
    """The fields of a row that say which point it is."""
    return {"name": cfg.name, "kind": cfg.kind, "method": cfg.method, "series": cfg.series, "sparsity": cfg.sparsity,
            "pattern": cfg.pattern, "structure": cfg.structure, "ratio": cfg.ratio, "owl_lambda": cfg.owl,
            "budget": cfg.budget}


def row_of(cfg: Config, run: Path, key: str) -> dict[str, Any]:
    """The result row of a finished configuration, from its workdir's manifest."""
    steps = json.loads((run / "manifest.json").read_text(encoding="utf-8"))["steps"]
    prune = next((s for s in steps if s["command"] == "prune"), None)
    ev = steps[-1]["metrics"]
    sp = ev.get("speed", {})
    pm = (prune or {}).get("metrics", {})
    blocks = {str(i): v for i, v in enumerate(pm.get("block_sparsity") or [])}
    split = (pm.get("budget") or {}).get("chosen", {}).get("ratios")
    point = _point(cfg)
    if cfg.budget is not None and split is None:  # one structure to a budget: the ratio the budget resolved to
        point["ratio"] = (pm.get("plan") or {}).get("ratio")
    return {**point, "split": split, "status": "done",
            "perplexity": ev.get("perplexity"), "parameters": ev.get("parameters"),
            "model_bytes": ev.get("model_bytes"), "achieved_sparsity": ev.get("sparsity", {}).get("all"), "tasks": ev.get("tasks"),
            "tasks_mean": ev.get("tasks_mean"), "prefill_speedup": sp.get("prefill_speedup"),
            "decode_speedup": sp.get("decode_speedup"), "prune_s": (prune or {}).get("duration_s"),
            "block_sparsity": blocks, "outlier_ratio": pm.get("outlier_ratio"), "key": key}


def save(root: Path, rows: list[dict[str, Any]]) -> None:
    """``results.json`` (every field) and ``results.csv`` (the scalar ones), each written whole then renamed."""
    atomic_write_text(root / "results.json", dumps(rows, indent=2) + "\n")
    cols = ["name", "kind", "method", "owl_lambda", "sparsity", "pattern", "structure", "ratio", "budget", "status",
            "perplexity",
            "parameters", "model_bytes", "achieved_sparsity", "tasks_mean", "prefill_speedup", "decode_speedup", "prune_s", "error"]
    tmp = root / f".results.csv.tmp-{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, root / "results.csv")


def run_sweep(ws: Workdir, configs: list[Config], eval_args: list[str], keep_models: bool = False,
              speed: list[str] | None = None) -> dict[str, Any]:
    """Run every configuration not done yet (see the module's docstring); returns the rows and what ran.
    ``speed``: the eval options of the timing of structured points against the dense model (None: not timed)."""
    base = ws.path
    manifest = ws.manifest()
    if not manifest.get("calibration"):
        raise UserError(f"{base} is not calibrated; run `llmprune calibrate` first")
    root = base / SWEEP
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    old = {}
    if (root / "results.json").is_file():
        try:
            old = {r["key"]: r for r in json.loads((root / "results.json").read_text(encoding="utf-8"))
                   if isinstance(r, dict) and r.get("status") == "done" and "key" in r}
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            report.warn(f"{root / 'results.json'} cannot be read; every configuration runs again")
    rows: list[dict[str, Any]] = []
    ran, skipped, failed = [], [], []
    names = {c.name for c in configs}
    others = [r for r in old.values() if r["name"] not in names]  # points of earlier sweeps, not of this grid
    with report.progress("sweep", len(configs)) as advance:
        for cfg in configs:
            timed = cfg.kind == "structured" and speed is not None
            ev = [*eval_args, *(["--speed", "--speed-baseline", str(base), *speed] if timed else [])]
            key = fingerprint(cfg, ev, manifest)
            if key in old:
                rows.append(old[key])
                skipped.append(cfg.name)
                advance(note=f"{cfg.name}: done before")
                continue
            run = runs / cfg.name
            if run.exists():  # a configuration killed half-way: its row is missing, so it starts again
                shutil.rmtree(run)
            ws.link_to(run)
            advance(0, note=cfg.name)
            try:
                for name, args in ([("prune", cfg.prune)] if cfg.prune else []) + [("eval", ev)]:
                    _run_point_step(name, run, args, ws.verify_inputs, cfg.name)
            except UserError as e:
                rows.append({**_point(cfg), "status": "failed", "error": str(e), "key": key})
                failed.append(cfg.name)
                report.warn(f"{cfg.name}: {e}")
            else:
                rows.append(row_of(cfg, run, key))
                ran.append(cfg.name)
                if not keep_models:
                    for sub in ("model", "adapter"):
                        shutil.rmtree(run / sub, ignore_errors=True)
            save(root, rows + others)
            advance()
    # Every point results.json holds -- this grid's and earlier grids' -- is plotted: a sweep extended by a point
    # redraws the whole picture, not the last command's part of it.
    plots = plot(root, [r for r in rows + others if r["status"] == "done"])
    return {"results": str(root / "results.json"), "csv": str(root / "results.csv"), "plots": plots,
            "rows": rows, "ran": ran, "skipped": skipped, "failed": failed}


def _run_point_step(name: str, run: Path, args: list[str], verify: bool, point: str) -> None:
    """One step of a point: the options its command line ``llmprune NAME RUN ARGS`` gives, run by the step itself
    (quietly: each point's own table would bury the grid's)."""
    step = STEPS[name]
    options = from_argv(step, args, f"sweep point {point} ({name})")
    with report.quiet():
        step.run(Workdir(run, verify=verify), options)


def run(ws: Workdir, o: SweepOptions) -> dict[str, Any]:
    """``llmprune sweep``: every point of the grid from the calibrated workdir, with the workdir locked meanwhile
    (the points start from its state: nothing may change it while they run)."""
    ws.manifest()
    check_all(o)
    device = check_device(o.device)
    configs = grid(o.methods, o.sparsities, o.patterns, o.structures, o.prune_args, o.owl)
    if o.dataset is not None:
        data.check_local(o.dataset)
    ev = ["--seqlen", str(o.seqlen or calibration_seqlen(ws)), "--text-field", o.text_field, "--device", device, "--batch-size",
          str(o.batch_size)]
    for flag, value in (("--dataset", o.dataset), ("--max-windows", o.max_windows), ("--tasks", o.tasks),
                        ("--limit", o.limit), ("--num-fewshot", o.num_fewshot)):
        if value is not None:
            ev += [flag, str(value)]
    with ws.locked():
        res = run_sweep(ws, configs, ev, keep_models=o.keep_models,
                        speed=["--prompt-len", str(o.prompt_len), "--new-tokens", str(o.new_tokens)] if o.speed
                        else None)
    return {"workdir": str(ws.path), **res}


STEP = Step("sweep", SweepOptions, run, "Prune and evaluate a grid of configurations from one calibrated workdir "
            "(resumable); results and plots in WORK/sweep/.")


def plot(root: Path, rows: list[dict[str, Any]]) -> list[str]:
    """PNG plots of the rows: perplexity (and task accuracy) against sparsity per method; for structured rows
    perplexity against parameters and against the measured prefill speed-up; per-block sparsity where it varies."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a CI machine
    import matplotlib.pyplot as plt

    dense = next((r for r in rows if r["kind"] == "dense"), None)
    made: list[str] = []

    def finish(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(root / name, dpi=130)
        plt.close(fig)
        made.append(str(root / name))

    _plot_scored(plt, rows, dense, finish)
    _plot_structured(plt, rows, dense, finish)
    _plot_block_sparsity(plt, rows, finish)
    return made


def _styles(series: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, line style) of each plotted series: one colour per method, OWL's lines (``METHOD+owlL``) in their
    method's colour, dashed (dotted, dash-dotted for a second and third lambda)."""
    methods = sorted({s.split("+owl")[0] for s in series})
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    dashes = ["--", ":", "-."]
    out = {}
    for m in methods:
        owls = sorted((s for s in series if s.startswith(m + "+owl")), key=lambda s: float(s.split("+owl")[1]))
        out[m] = (colour[m], "-")
        out.update({s: (colour[m], dashes[i % len(dashes)]) for i, s in enumerate(owls)})
    return out


def _plot_scored(plt, rows: list[dict[str, Any]], dense: dict[str, Any] | None, finish) -> None:
    """Perplexity (and the tasks' mean accuracy) against sparsity, one line per method (N:M points marked)."""
    from matplotlib.ticker import FuncFormatter, PercentFormatter  # matplotlib only where a plot is drawn

    scored = [r for r in rows if r["kind"] in ("unstructured", "pattern")]
    methods = sorted({r.get("series") or r["method"] for r in scored})
    styles = _styles(methods)
    metrics = [("perplexity", "perplexity (log scale)", True)]
    if any(r.get("tasks_mean") is not None for r in rows):
        metrics.append(("tasks_mean", "zero-shot accuracy (mean of the tasks)", False))
    for key, label, log in metrics if scored else []:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for m in methods:
            color, dash = styles[m]
            mine = [r for r in scored if (r.get("series") or r["method"]) == m]
            line = sorted((r["sparsity"], r[key]) for r in mine if r["kind"] == "unstructured" and r.get(key) is not None)
            if line:
                ax.plot(*zip(*line), marker="o", color=color, linestyle=dash, label=m.replace("+owl", " + OWL λ="))
            for r in (r for r in mine if r["kind"] == "pattern" and r.get(key) is not None):
                ax.scatter([r["sparsity"]], [r[key]], marker="s" if r["pattern"] == "2:4" else "D", color=color,
                           edgecolors="black", zorder=3)
                ax.annotate(r["pattern"], (r["sparsity"], r[key]), textcoords="offset points", xytext=(6, -3),
                            fontsize=8)
        if dense and dense.get(key) is not None:
            ax.axhline(dense[key], color="gray", linestyle="--", label=f"dense ({dense[key]:.3g})")
        if log:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 600, not 6 x 10^2
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "2356" else ""))
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_title(f"{'Perplexity' if key == 'perplexity' else 'Zero-shot accuracy'} against sparsity "
                     f"({len(scored)} points)")
        ax.set_xlabel("sparsity of the block Linears (N:M patterns: squares and diamonds)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
        finish(fig, f"{key.replace('_mean', '')}_vs_sparsity.png")


def _plot_structured(plt, rows: list[dict[str, Any]], dense: dict[str, Any] | None, finish) -> None:
    """Structured points: perplexity against parameters, and against the measured prefill speed-up."""
    structured = [r for r in rows if r["kind"] == "structured"]
    if not structured:
        return
    with_speed = [r for r in structured if r.get("prefill_speedup")]
    fig, axes = plt.subplots(1, 2 if with_speed else 1, figsize=(11 if with_speed else 6.4, 4.4), squeeze=False)
    ax = axes[0][0]
    for i, s in enumerate(sorted({r["structure"] for r in structured})):
        pts = sorted((r["parameters"] / 1e6, r["perplexity"]) for r in structured if r["structure"] == s)
        ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=s)
    if dense:
        ax.scatter([dense["parameters"] / 1e6], [dense["perplexity"]], marker="*", s=120, color="black",
                   label="dense", zorder=3)
    ax.set_title(f"Structured removal: perplexity against size ({len(structured)} points)")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if with_speed:
        ax = axes[0][1]
        for i, s in enumerate(sorted({r["structure"] for r in with_speed})):
            pts = sorted((r["prefill_speedup"], r["perplexity"]) for r in with_speed if r["structure"] == s)
            ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=s)
        if dense:
            ax.scatter([1.0], [dense["perplexity"]], marker="*", s=120, color="black", label="dense", zorder=3)
        ax.set_title("… and against the measured speed-up")
        ax.set_xlabel("prefill speed-up over dense (measured, batch 1; median of paired runs)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    finish(fig, "structured.png")


def _plot_block_sparsity(plt, rows: list[dict[str, Any]], finish) -> None:
    """Each block's sparsity, for the points where it varies (OWL)."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    varies = [r for r in rows if r.get("block_sparsity") and
              max(r["block_sparsity"].values()) - min(r["block_sparsity"].values()) > 1e-4]
    if not varies:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = _styles(sorted({r.get("series") or r["method"] for r in varies}))  # each method's colour, as above
    for r in varies:
        xs = [int(b) for b in r["block_sparsity"]]
        color, dash = styles[r.get("series") or r["method"]]
        ax.plot(xs, list(r["block_sparsity"].values()), marker=".", color=color, linestyle=dash, label=r["name"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_title("Sparsity of each block (where it varies: OWL)")
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity of the block's Linears")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    finish(fig, "block_sparsity.png")
