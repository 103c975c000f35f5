"""Unstructured / N:M pruning on the real model of docs/benchmarks.md: perplexity, prune seconds and peak RSS.

For every method x pattern: copy a calibrated workdir, run ``llmprune prune`` in its own process (peak RSS from
``wait4``), then ``llmprune eval`` on the protocol's test split. A full forward pass of the model over the same
calibration windows is timed in the same run, so speed is reported as a ratio measured on one machine at one time.

    python benchmarks/prune_bench.py                                   # the 3 x 3 table (about 40 minutes on 2 cores)
    python benchmarks/prune_bench.py --methods wanda --patterns 2:4    # one cell
    python benchmarks/prune_bench.py --methods wanda,sparsegpt,wandapp --patterns 2:4   # the Wanda++ targets
    python benchmarks/prune_bench.py --methods wanda,wandapp-rgs,wandapp-paper --patterns 2:4
    python benchmarks/prune_bench.py --methods wanda,wanda-seq,sparsegpt,sparsegpt-seq   # the two schedules
    python benchmarks/prune_bench.py --model gemma3-270m --methods magnitude,wanda,sparsegpt,wandapp
    python benchmarks/prune_bench.py --methods wanda,wanda-owl --patterns unstructured,0.6,0.7   # OWL

A pattern is ``unstructured`` (50%), an N:M pattern, or an unstructured sparsity (``0.6``).

The peers' reference rows exist for SmolLM2 only; Gemma-3-270M rows compare against its dense perplexity. Every
run is saved under benchmarks/results/ (``--save NAME``, default ``MODEL-prune``) as well as ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402

# docs/benchmarks.md reference rows: (perplexity, prune wall s, peak RSS MiB) from locuslab/wanda on this protocol.
REFERENCE = {
    ("magnitude", "unstructured"): (362.7, 9, 901),
    ("magnitude", "4:8"): (713.1, 3, 881),
    ("magnitude", "2:4"): (1378.7, 3, 881),
    ("wanda", "unstructured"): (36.12, 121, 1302),
    ("wanda", "4:8"): (68.37, 122, 1278),
    ("wanda", "2:4"): (137.65, 124, 1288),
    ("sparsegpt", "unstructured"): (28.20, 174, 1615),
    ("sparsegpt", "4:8"): (40.59, 183, 1609),
    ("sparsegpt", "2:4"): (55.21, 189, 1603),
}
DENSE_PPL = {"smollm2-135m": 14.59, "gemma3-270m": 30.47}  # docs/benchmarks.md
# Named variants: the label in the table -> the prune options.
VARIANTS = {
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "sparsegpt": ["--method", "sparsegpt"],
    # One pass per block that prunes each Linear as its inputs arrive (--true-sequential).
    "wanda-seq": ["--method", "wanda", "--true-sequential"],
    "sparsegpt-seq": ["--method", "sparsegpt", "--true-sequential"],
    # Wanda++ defaults (benchmarks/wandapp_ablation.py on the calibration slices of both models): no gradient
    # term in the score, two RO rounds of 32 windows with a step relative to each weight's RMS.
    "wandapp": ["--method", "wandapp"],
    "wandapp-paper": ["--method", "wandapp", "--preset", "paper"],  # the paper's settings exactly
    # Where RO's re-prunes take their norms (--ro-norms, under the free mask, which re-prunes): the defaults until
    # 2026-12-06 but for that one option.
    "wandapp-steps": ["--method", "wandapp", "--ro-mask", "free", "--ro-norms", "steps"],
    "wandapp-mixed": ["--method", "wandapp", "--ro-mask", "free", "--ro-norms", "mixed"],
    "wandapp-pass": ["--method", "wandapp", "--ro-mask", "free", "--ro-norms", "pass"],
    "wandapp-rgs": ["--method", "wandapp", "--alpha", "100", "--ro-iters", "0"],  # the RGS score alone, no RO
    # The RO mask (--ro-mask): fixed (the default since 2026-12-06: RO reconstructs under the first round's mask, the
    # pruned weights' gradients masked) or free (the paper's, the default until then: RO moves them, prunes again).
    "wandapp-fixed": ["--method", "wandapp", "--ro-mask", "fixed"],
    "wandapp-free": ["--method", "wandapp", "--ro-mask", "free"],
    # The 11-26 setting chosen on SmolLM2 alone (an absolute RMSprop step), kept for comparison.
    "wandapp-tuned": ["--method", "wandapp", "--alpha", "0", "--ro-lr", "1e-4", "--ro-step", "absolute",
                      "--ro-iters", "5"],
    "wandapp-owl": ["--method", "wandapp", "--owl-lambda", "0.08"],
    "wandapp-paper-owl": ["--method", "wandapp", "--preset", "paper", "--owl-lambda", "0.08"],
    "ria-row": ["--method", "ria", "--compare", "row"],  # RIA scores compared per output row (Wanda's group)
    # OWL block sparsities (the paper's lambda 0.08, M 5) over each score method.
    "magnitude-owl": ["--method", "magnitude", "--owl-lambda", "0.08"],
    "wanda-owl": ["--method", "wanda", "--owl-lambda", "0.08"],
    "sparsegpt-owl": ["--method", "sparsegpt", "--owl-lambda", "0.08"],
}
LLMPRUNE = [sys.executable, "-m", "llmprune"]


def popen_rss(cmd: list[str]) -> tuple[dict, float, float]:
    """Run a command with --json; return (its JSON, wall seconds, peak RSS MiB of that process, from wait4)."""
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen([*cmd, "--json"], stdout=subprocess.PIPE, stderr=devnull)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(out), wall, usage.ru_maxrss / 1024


def calibrated_base(out: Path, paths: dict, samples: int, seqlen: int, dtype: str = "auto") -> Path:
    """The calibrated workdir every run of a benchmark copies, made once per (samples, seqlen, dtype) and reused."""
    base = out / (f"base-{samples}x{seqlen}" + ("" if dtype == "auto" else f"-{dtype}"))
    if not (base / "manifest.json").exists():
        subprocess.run([*LLMPRUNE, "calibrate", str(base), "--model", paths["model"], "--dataset", paths["calib"],
                        "--samples", str(samples), "--seqlen", str(seqlen), "--dtype", dtype, "--force"], check=True,
                       stdout=subprocess.DEVNULL)
    return base


FORWARD = """
import json, sys, time, torch
from safetensors.torch import load_file
from llmprune.modeling import load_model
model, _ = load_model(sys.argv[1] + "/model")
windows = load_file(sys.argv[1] + "/calib/windows.safetensors")["input_ids"]
bs = int(sys.argv[2])
with torch.no_grad():
    t0 = time.perf_counter()
    for i in range(0, windows.shape[0], bs):
        model(input_ids=windows[i:i + bs], use_cache=False)
    print(json.dumps({"forward_s": time.perf_counter() - t0}))
"""


def append_results(out: Path, rows: list[dict]) -> None:
    """Add this run's rows to ``OUT/results.json``, where a script's runs accumulate."""
    path = out / "results.json"
    old = json.loads(path.read_text()) if path.exists() else []
    tmp = path.with_suffix(".json.tmp")  # written whole, then renamed: a kill mid-write leaves the old file
    tmp.write_text(json.dumps(old + rows, indent=2))
    os.replace(tmp, path)


def save_results(results: Path, name: str, rows: list[dict], caption: str, table: str) -> None:
    """Print ``table`` and save the run under ``results/NAME-DATE.{json,md}`` (the rows, and the caption + table)."""
    import datetime

    print("\n" + table)
    stamp = datetime.date.today().isoformat()
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}-{stamp}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (results / f"{name}-{stamp}.md").write_text(caption + "\n\n" + table + "\n")


def forward_seconds(workdir: Path, batch_size: int) -> float:
    out = subprocess.run([sys.executable, "-c", FORWARD, str(workdir), str(batch_size)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["forward_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt", help=f"comma-separated: a registered method, or one of the variants {', '.join(VARIANTS)}")
    ap.add_argument("--patterns", default="unstructured,4:8,2:4")
    ap.add_argument("--cells", default="", help="METHOD:PATTERN,... instead of --methods x --patterns, e.g. "
                    "wanda:0.7,wanda-owl:0.7,sparsegpt:unstructured")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=None, help="default: the whole test split (105 windows)")
    ap.add_argument("--out", type=Path, default=None, help="default: runs/bench (SmolLM2), runs/bench-MODEL (others)")
    ap.add_argument("--owl-lambda", type=float, default=0.08,
                    help="the lambda of every -owl variant (default the paper's 0.08; recorded in each row)")
    ap.add_argument("--extra", default="", help="extra options for prune, e.g. '--act-dtype bfloat16'")
    ap.add_argument("--model", choices=assets.MODELS, default=assets.MODELS[0])
    ap.add_argument("--lastword", type=int, default=200,
                    help="last-word accuracy on this many test paragraphs beside perplexity (0: none)")
    ap.add_argument("--save", default="", help="results name under benchmarks/results/ (default: MODEL-prune)")
    args = ap.parse_args()

    paths = assets.fetch(model=args.model)
    if args.out is None:
        args.out = Path("runs/bench" + ("" if args.model == assets.MODELS[0] else f"-{args.model}"))
    reference = REFERENCE if args.model == "smollm2-135m" else {}
    base = calibrated_base(args.out, paths, args.samples, args.seqlen)
    evalargs = ["--dataset", paths["test"], "--seqlen", str(args.seqlen)]
    if args.eval_windows:
        evalargs += ["--max-windows", str(args.eval_windows)]
    task = f"lastword:{paths['test']}"
    if args.lastword:
        evalargs += ["--tasks", task, "--limit", str(args.lastword)]

    dense_acc = None
    if args.lastword:  # the dense model's last-word accuracy, on a copy (eval records a step)
        dense_wd = args.out / "dense-lastword"
        if dense_wd.exists():
            shutil.rmtree(dense_wd)
        shutil.copytree(base, dense_wd)
        ev, _, _ = popen_rss([*LLMPRUNE, "eval", str(dense_wd), "--dataset", paths["test"], "--seqlen",
                              str(args.seqlen), "--max-windows", "1", "--tasks", task, "--limit", str(args.lastword)])
        dense_acc = ev["tasks"][task]["acc"]
    fwd = forward_seconds(base, args.batch_size)
    print(f"full forward pass over {args.samples} x {args.seqlen} calibration tokens: {fwd:.1f} s", flush=True)
    rows = []
    cells = ([tuple(c.split(":", 1)) for c in args.cells.split(",")] if args.cells else
             [(m, p) for m in args.methods.split(",") for p in args.patterns.split(",")])
    for method, pattern in cells:
        if "--owl-lambda" in VARIANTS.get(method, []) and ":" in pattern:
            print(f"{method} {pattern}: skipped (OWL sets per-block sparsities; N:M fixes them)", flush=True)
            continue
        wd = args.out / f"{method}-{pattern.replace(':', 'of')}"
        if wd.exists():
            shutil.rmtree(wd)
        shutil.copytree(base, wd)
        shape = ["--sparsity", pattern] if pattern[:1].isdigit() and ":" not in pattern else ["--pattern", pattern]
        variant = VARIANTS.get(method, ["--method", method])
        owl = "--owl-lambda" in variant
        if owl:
            variant = [str(args.owl_lambda) if a == "0.08" else a for a in variant]
        cmd = [*LLMPRUNE, "prune", str(wd), *variant, *shape,
               "--batch-size", str(args.batch_size), *args.extra.split()]
        res, wall, rss = popen_rss(cmd)
        prune_s = res["capture_s"] + res["prune_s"] + res["propagate_s"] + res.get("owl_s", 0.0)
        ev, _, _ = popen_rss([*LLMPRUNE, "eval", str(wd), *evalargs])
        # The options the step ran with, defaults resolved, as its record has them: what a variant meant that day.
        params = step_params(wd, "prune")
        ref = reference.get((method.removesuffix("-seq"), pattern), (float("nan"),) * 3)
        row = dict(model=args.model, method=method, pattern=pattern, ppl=ev["perplexity"], ref_ppl=ref[0], prune_s=prune_s,
                   step_s=wall, forward_s=fwd, ref_s=ref[1], rss_mib=rss, ref_rss_mib=ref[2],
                   sparsity=res["sparsity"]["all"], windows=ev["windows"],
                   lastword=ev.get("tasks", {}).get(task, {}).get("acc"),
                   **({"owl_lambda": args.owl_lambda} if owl else {}),
                   options={k: v for k, v in params.items() if k not in ("device", "batch_size")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    fwd_end = forward_seconds(base, args.batch_size)
    print(f"full forward pass again at the end: {fwd_end:.1f} s (a large change means the machine was busy)")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    caption = (f"{args.model}, {args.samples} x {args.seqlen} calibration windows, batch {args.batch_size}; "
               f"forward pass over them {fwd:.1f} s at the start, {fwd_end:.1f} s at the end; dense perplexity "
               f"{DENSE_PPL[args.model]} (docs/benchmarks.md)"
               + (f"; last-word accuracy over {args.lastword} test paragraphs, dense {dense_acc:.3f}"
                  if dense_acc is not None else "") + ". Command: python benchmarks/prune_bench.py "
               + " ".join(sys.argv[1:]))
    save_results(Path(__file__).parent / "results", args.save or f"{args.model}-prune", rows, caption,
                 table(rows, fwd, reference, DENSE_PPL[args.model]))


def step_params(wd: Path, command: str) -> dict:
    """The parameters the workdir's last ``command`` step recorded (its options, defaults resolved)."""
    steps = json.loads((wd / "manifest.json").read_text())["steps"]
    return next(s["params"] for s in reversed(steps) if s["command"] == command)


def table(rows: list[dict], fwd: float, reference: dict, dense: float) -> str:
    lines = ["| method | pattern | ppl | ppl/dense | last-word acc | ref ppl | ppl/ref | ppl/Wanda ref | prune s | prune/forward "
             "| ref s | peak RSS MiB | ref RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "–" if r.get("lastword") is None else f"{r['lastword']:.3f}"
        wanda_ref = reference[("wanda", r["pattern"])][0] if ("wanda", r["pattern"]) in reference else float("nan")
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['ppl']:.2f} | {r['ppl'] / dense:.2f} | {acc} | {r['ref_ppl']} | "
            f"{r['ppl'] / r['ref_ppl']:.3f} | {r['ppl'] / wanda_ref:.3f} | {r['prune_s']:.1f} | "
            f"{r['prune_s'] / fwd:.2f} | {r['ref_s']} | {r['rss_mib']:.0f} | {r['ref_rss_mib']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
