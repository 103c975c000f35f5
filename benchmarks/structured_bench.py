"""Structured compression that ships (issue #20): remove units with DReSS (or directly), then recover them with each
recovery -- LoRA or all weights, on the LM loss or distilled from the dense teacher -- on the calibration split only.

One row per (structure, mode, recovery): parameters, size on disk, test perplexity, prefill and decode speed-ups over
the dense model at batch 1 and 8 (timed in the same run, on the pruned model before recovery: recovery changes no
shape), and the recovery's seconds and peak RSS. Recovery trains on fresh windows of the calibration text (the
recipe's practice: DReSS already trained on the calibration windows), never on the test split.

    python benchmarks/structured_bench.py                                       # layers 25%, DReSS, 3 recoveries
    python benchmarks/structured_bench.py --rows layers:0.25,mlp:0.3 --modes direct,dress --recoveries none,lora-lm
    python benchmarks/structured_bench.py --model gemma3-270m --rows mlp:0.5 --steps 100 --eval-windows 32
    python benchmarks/structured_bench.py --rows layers+mlp@0.78 --modes direct        # a budget split by search

Recoveries: none, lora-lm, lora-kd, full-lm, full-kd (``--steps`` each; equal steps, so LM against KD is a fair
comparison). Every run is saved under benchmarks/results/ (``--save NAME``, default ``MODEL-structured``).

``--reuse`` keeps a pruned workdir an earlier run left when the same selection, regularize options and base made it
(its regularize seconds and speed-ups are then that run's); ``--teacher-steps N`` distils from a "corrected"
teacher (Sreenivas et al. 2024): a copy of the dense model fine-tuned N steps (``recover --full``) on the
calibration text first, its test perplexity and cost in the caption:

    python benchmarks/structured_bench.py --reuse --recoveries lora-kd --steps 100 --teacher-steps 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import DENSE_PPL, LLMPRUNE, append_results, calibrated_base, popen_rss, save_results  # noqa: E402

RECOVERIES = {
    "none": None,
    "lora-lm": [],
    "lora-kd": ["--distill"],
    "full-lm": ["--full"],
    "full-kd": ["--full", "--distill"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="layers:0.25",
                    help="comma-separated STRUCTURE:RATIO or STRUCTURE@BUDGET (--target-params: 0.78, 100M; "
                         "a combination such as layers+mlp needs a budget)")
    ap.add_argument("--modes", default="dress", help="direct (no regularisation) and/or dress")
    ap.add_argument("--recoveries", default="none,lora-lm,lora-kd,full-kd", help=", ".join(RECOVERIES))
    ap.add_argument("--steps", type=int, default=150, help="recovery steps, the same for every recovery")
    ap.add_argument("--select", default="activation")
    ap.add_argument("--reg", default="", help="extra options for `llmprune regularize`")
    ap.add_argument("--reg-fresh", action="store_true",
                    help="regularise on fresh windows of the calibration text, named (regularize --dataset CALIB); "
                         "regularize's default since 2026-12-06 reads the same text again. The rows of earlier days "
                         "trained on the 56 calibration windows: --reg=--calibration-windows")
    ap.add_argument("--recover", default="", help="extra options for every `llmprune recover`")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--out", type=Path, default=None, help="default: runs/structured-bench[-MODEL]")
    ap.add_argument("--model", choices=assets.MODELS, default=assets.MODELS[0])
    ap.add_argument("--save", default="", help="results name under benchmarks/results/ (default: MODEL-structured)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep a pruned workdir a previous run left (same rows) instead of regularising again")
    ap.add_argument("--teacher-steps", type=int, default=0,
                    help="'teacher correction' (Sreenivas et al. 2024): fine-tune a copy of the dense model on the "
                         "calibration text for N steps (recover --full) and distil from it instead")
    args = ap.parse_args()
    recoveries = args.recoveries.split(",")
    unknown = [r for r in recoveries if r not in RECOVERIES]
    if unknown:
        sys.exit(f"unknown recoveries {unknown}; use {', '.join(RECOVERIES)}")

    paths = assets.fetch(model=args.model)
    if args.out is None:
        args.out = Path("runs/structured-bench" + ("" if args.model == assets.MODELS[0] else f"-{args.model}"))
    base = calibrated_base(args.out, paths, args.samples, args.seqlen)
    evalargs = ["--dataset", paths["test"], "--seqlen", str(args.seqlen)]
    if args.eval_windows:
        evalargs += ["--max-windows", str(args.eval_windows)]
    speed = ["--speed", "--speed-batches", "1,8", "--speed-baseline", str(base)]
    dense_params = json.loads((base / "manifest.json").read_text())["steps"][0]["metrics"]["parameters"]
    # The teacher is the model the base was calibrated from (a base made before calibrate kept teacher/ has none).
    teacher = [] if (base / "teacher").is_dir() else ["--teacher", str(paths["model"])]
    # The dense model's perplexity on the same windows: docs/benchmarks.md's figure is over the whole test split.
    dense_ppl = DENSE_PPL[args.model]
    if args.eval_windows:
        dense_ppl = popen_rss([*LLMPRUNE, "eval", str(base), *evalargs])[0]["perplexity"]
        print(f"dense perplexity over {args.eval_windows} test windows: {dense_ppl:.2f}", flush=True)
    corrected = None
    if args.teacher_steps:
        teacher, corrected = correct_teacher(base, args, paths, evalargs)
    rows = []
    for spec in args.rows.split(","):
        structure, ratio = spec.split("@" if "@" in spec else ":")
        size = ["--target-params" if "@" in spec else "--ratio", ratio]
        for mode in args.modes.split(","):
            pruned = args.out / f"{structure}-{ratio}-{mode}"
            sel = ["--structure", structure, *size, "--select", args.select]
            reg_args = [*args.reg.split(), *(["--dataset", str(paths["calib"])] if args.reg_fresh else [])]
            made_by = dict(sel=sel, reg=" ".join(reg_args) if mode == "dress" else None, base=base.name)
            if mode == "dress" and not {"--dataset", "--calibration-windows"} & set(reg_args):
                # regularize's default text changed on 2026-12-06 (the calibration windows -> fresh windows of the
                # calibration text): a workdir made with the old default is not reused as the new one
                made_by["reg_text"] = "calibration text, fresh windows"
            reused = _reused(pruned, made_by) if args.reuse else None
            if reused:
                reg, reg_s, reg_rss, res, ev = reused
            else:
                if pruned.exists():
                    shutil.rmtree(pruned)
                shutil.copytree(base, pruned)
                (pruned / "bench.json").write_text(json.dumps(made_by))
                reg, reg_s, reg_rss = {}, None, None
                if mode == "dress":
                    reg, reg_s, reg_rss = popen_rss([*LLMPRUNE, "regularize", str(pruned), *sel, *reg_args,
                                                   *(teacher if "--distill" in args.reg else [])])
                res, _, _ = popen_rss([*LLMPRUNE, "prune", str(pruned), "--method", "dress",
                                       *(sel if mode == "direct" else [])])
                ev, _, _ = popen_rss([*LLMPRUNE, "eval", str(pruned), *evalargs, *speed])
            sp = ev["speed"]
            budget = res.get("budget") or reg.get("budget") or {}
            shape = dict(model=args.model, structure=structure, ratio=res["ratio"], mode=mode,
                         budget=ratio if "@" in spec else None, split=budget.get("chosen", {}).get("ratios"),
                         units=res["units_removed"], parameters=res["parameters"],
                         removed=1 - res["parameters"] / dense_params, model_mib=ev["model_bytes"] / 2**20,
                         prefill_1=sp.get("prefill_speedup"), decode_1=sp.get("decode_speedup"),
                         prefill_8=sp.get("prefill_speedup_b8"), decode_8=sp.get("decode_speedup_b8"),
                         regularize_s=reg_s, regularize_rss_mib=reg_rss, reg_options=(args.reg + (" --dataset CALIB" if args.reg_fresh else "")).strip()
                         if mode == "dress" else "",
                         windows=ev["windows"], dense_ppl=dense_ppl, reused=bool(reused), teacher=corrected,
                         select=args.select, samples=args.samples, seqlen=args.seqlen,
                         # what regularize trained on (its record; since 12-06 fresh windows of the calibration
                         # text unless told otherwise), the benchmark's paths named as in reg_options
                         reg_trained_on={str(paths["calib"]): "CALIB"}.get(reg.get("trained_on"), reg.get("trained_on")))
            for rec in recoveries:
                row = dict(shape, recovery=rec)
                if RECOVERIES[rec] is None:
                    row.update(ppl=ev["perplexity"], recover_s=None, recover_rss_mib=None, steps=0)
                else:
                    wd = args.out / f"{pruned.name}-{rec}"
                    if wd.exists():
                        shutil.rmtree(wd)
                    shutil.copytree(pruned, wd)
                    extra = [*RECOVERIES[rec], *(teacher if "--distill" in RECOVERIES[rec] else [])]
                    r, wall, rss = popen_rss([*LLMPRUNE, "recover", str(wd), "--steps", str(args.steps), "--dataset",
                                              str(paths["calib"]), *extra, *args.recover.split()])
                    after, _, _ = popen_rss([*LLMPRUNE, "eval", str(wd), *evalargs])
                    row.update(ppl=after["perplexity"], recover_s=wall, train_s=r["train_s"], recover_rss_mib=rss,
                               steps=r["steps"], heldout_before=r["ppl_before"], heldout_after=r["ppl_after"],
                               trainable=r["trainable_parameters"], final_kd=r.get("final_kd"))
                    shutil.rmtree(wd)
                rows.append(row)
                print(json.dumps(row), flush=True)
                append_results(args.out, [row])  # each row as it is measured: a killed run keeps what it did
    windows = rows[0]["windows"] if rows else 0
    caption = (f"{args.model}, {args.samples} x {args.seqlen} calibration windows, test perplexity over {windows} "
               f"windows of {args.seqlen}; "
               + (f"{args.steps} recovery steps on fresh windows of the calibration text; "
                  if any(r != "none" for r in recoveries) else "no recovery; ")
               + f"regularize options: {args.reg or 'the defaults'}"
               + (f"; distilled from a teacher corrected by {args.teacher_steps} full fine-tuning steps on the "
                  f"calibration text (test perplexity {corrected['ppl']:.2f}, {corrected['recover_s']:.0f} s)"
                  if corrected else "")
               + ". Command: python benchmarks/structured_bench.py "
               + " ".join(sys.argv[1:]))
    save_results(Path(__file__).parent / "results", args.save or f"{args.model}-structured", rows, caption,
                 table(rows, dense_params, dense_ppl))


def correct_teacher(base: Path, args, paths: dict, evalargs: list[str]) -> tuple[list[str], dict]:
    """Fine-tune a copy of the dense model on the calibration text (all weights, LM loss) and return the --teacher
    option naming it, with its test perplexity and cost. Made once per step count and reused."""
    wd = args.out / f"teacher-{args.teacher_steps}"
    if not (wd / "corrected.json").exists():
        if wd.exists():
            shutil.rmtree(wd)
        shutil.copytree(base, wd)
        r, wall, rss = popen_rss([*LLMPRUNE, "recover", str(wd), "--full", "--steps", str(args.teacher_steps),
                                  "--dataset", str(paths["calib"])])
        ev, _, _ = popen_rss([*LLMPRUNE, "eval", str(wd), *evalargs])
        info = dict(steps=args.teacher_steps, ppl=ev["perplexity"], recover_s=wall, recover_rss_mib=rss,
                    heldout_before=r["ppl_before"], heldout_after=r["ppl_after"])
        (wd / "corrected.json").write_text(json.dumps(info))
    info = json.loads((wd / "corrected.json").read_text())
    print(f"corrected teacher: {json.dumps(info)}", flush=True)
    return ["--teacher", str(wd / "model")], info


def _reused(pruned: Path, made_by: dict):
    """(regularize metrics, its seconds, None, prune metrics, eval metrics) of a pruned workdir a previous run left
    with the same selection, regularize options and base, or None (then it is made again): when it has no prune and
    speed-timed eval on record, or was made otherwise."""
    try:
        steps = json.loads((pruned / "manifest.json").read_text())["steps"]
    except (OSError, ValueError, KeyError):
        return None
    by = {}
    for s in steps:
        by[s["command"]] = s
    if "prune" not in by or "speed" not in by.get("eval", {}).get("metrics", {}):
        return None
    if (pruned / "bench.json").is_file():
        if json.loads((pruned / "bench.json").read_text()) != made_by:
            return None
    elif not _made_with_defaults(by.get("regularize"), made_by):
        return None
    reg = by.get("regularize")
    res = dict(by["prune"]["metrics"], ratio=by["prune"]["params"].get("ratio"))
    return (reg or {}).get("metrics", {}), reg and reg["duration_s"], None, res, by["eval"]["metrics"]


def _made_with_defaults(reg: dict | None, made_by: dict) -> bool:
    """A pruned workdir from before bench.json was written: reusable when it was regularised with every default
    (what an empty --reg asks for) and the selection asked for."""
    from llmprune.steps.regularize import RegularizeOptions

    if reg is None or made_by["reg"] != "":
        return False
    if made_by.get("reg_text") and "dataset" not in reg["params"]:  # trained on the calibration windows
        return False
    sel = dict(zip(made_by["sel"][::2], made_by["sel"][1::2]))
    p, defaults = reg["params"], RegularizeOptions().prepare()  # the defaults as a run records them
    if p.get("structure") != sel["--structure"] or p.get("select") != sel["--select"]:
        return False
    if "--ratio" in sel and p.get("ratio") != float(sel["--ratio"]):
        return False
    if "--target-params" in sel and p.get("target_params") != sel["--target-params"]:
        return False
    return all(p[k] == getattr(defaults, k) for k in p
               if k not in ("ratio", "structure", "select", "device", "target_params") and hasattr(defaults, k))


def table(rows: list[dict], dense_params: int, dense_ppl: float) -> str:
    f = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
    lines = ["| structure | mode | parameters | removed | MiB | recovery | ppl | / dense | prefill × b1 / b8 "
             "| decode × b1 / b8 | regularize s | recover s | recover RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['structure']} {_size(r)} | {r['mode']} | {r['parameters']:,} | {r['removed']:.1%} | "
            f"{r['model_mib']:.0f} | {r['recovery']} | {r['ppl']:.2f} | {r['ppl'] / dense_ppl:.2f} | "
            f"{f(r['prefill_1'], '.2f')} / {f(r['prefill_8'], '.2f')} | {f(r['decode_1'], '.2f')} / "
            f"{f(r['decode_8'], '.2f')} | {f(r['regularize_s'], '.0f')} | {f(r['recover_s'], '.0f')} | "
            f"{f(r['recover_rss_mib'], '.0f')} |")
    lines.append(f"\ndense: {dense_params:,} parameters, perplexity {dense_ppl:.2f} on the same windows")
    return "\n".join(lines)


def _size(r: dict) -> str:
    if r.get("split"):
        return "(" + ", ".join(f"{s} {v:.2f}" for s, v in r["split"].items()) + ")"
    return f"{r['ratio']:g}" + (f" (budget {r['budget']})" if r.get("budget") else "")


if __name__ == "__main__":
    main()
