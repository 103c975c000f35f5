"""What limits how well a structurally pruned model holds on text it was never tuned on (issue #51).

One structured compression (SmolLM2-135M, DReSS, --structure layers+mlp --target-params 0.78 by default), measured
after each stage on two domains: the Wikipedia test split (the calibration text's domain) and the documentation's
**tuning slice** (docs-tune.txt; choices are made on it, the documentation's evaluation text is kept for reported
figures, docs/benchmarks.md "Second domain"). Every number is a perplexity ratio to the dense model on the same
windows. Runs, in order, each a workdir branched from the previous stage and kept (a rerun reuses what is done):

    direct                       the removal alone (units chosen by activation, no regularisation, no recovery)
    reg=DATA                     regularise on DATA (regularize --dataset), then remove: no recovery
    rec=REG/KIND/STEPS/DATA      recover the reg=REG model with KIND (lora-lm, lora-kd, full-lm, full-kd,
                                 full-kdc: distilled from a teacher corrected first) for STEPS steps on DATA

DATA is ``calib`` (the calibration text, fresh windows), ``fiction`` (a public-domain novel, benchmarks/assets.py)
or a mixture ``calib:0.7+fiction:0.3`` (regularize/recover --dataset a:0.7,b:0.3). Equal time, not equal steps, is
the fair comparison of recoveries (a distilled step runs the teacher too): each row records its seconds.

    python benchmarks/generalisation_study.py --runs direct,reg=calib,rec=calib/lora-lm/100/calib
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, append_results, calibrated_base, popen_rss, save_results  # noqa: E402

KINDS = {"lora-lm": [], "lora-kd": ["--distill"], "full-lm": ["--full"], "full-kd": ["--full", "--distill"],
         "full-kdc": ["--full", "--distill"], "lora-kdc": ["--distill"]}


def data_spec(name: str, paths: dict) -> str:
    """A DATA name of this study as a --dataset value (a mixture of named parts: calib:0.7+fiction:0.3)."""
    parts = name.split("+")
    if len(parts) == 1:
        return paths[name]
    return ",".join(f"{paths[p.split(':')[0]]}:{p.split(':')[1]}" for p in parts)


def evaluate(wd: Path, paths: dict, args) -> dict:
    """Perplexity on both domains in one eval call (one step each); the documentation capped at --docs-windows."""
    cmd = [*LLMPRUNE, "eval", str(wd), "--dataset", paths["test"], "--dataset", paths[args.docs], "--seqlen",
           str(args.seqlen)]
    res, wall, _ = popen_rss(cmd + (["--max-windows", str(args.docs_windows)] if args.docs_windows else []))
    ev = res.get("evaluations") or [res]
    return dict(wiki_ppl=ev[0]["perplexity"], wiki_windows=ev[0]["windows"], docs_ppl=ev[1]["perplexity"],
                docs_windows=ev[1]["windows"], eval_s=wall)


def held_out_test(wd: Path, paths: dict, args) -> dict:
    """The documentation's evaluation text (docs-test), measured once per stage for the reported rows (``--test``)
    and kept in the stage's record: choices are made on docs-tune, figures are reported on docs-test."""
    rec = wd / "study.json"
    info = json.loads(rec.read_text())
    if "docs_test_ppl" not in info:
        cmd = [*LLMPRUNE, "eval", str(wd), "--dataset", paths["docs_test"], "--seqlen", str(args.seqlen)]
        res, _, _ = popen_rss(cmd + (["--max-windows", str(args.docs_windows)] if args.docs_windows else []))
        info.update(docs_test_ppl=res["perplexity"], docs_test_windows=res["windows"])
        rec.write_text(json.dumps(info))
    return info


def stage(out: Path, name: str, make) -> tuple[Path, dict]:
    """A stage's workdir and its record, made by ``make(wd) -> dict`` once (record in WD/study.json) and reused."""
    wd = out / name.replace("/", "_").replace("=", "-").replace(":", "").replace("+", "_")
    rec = wd / "study.json"
    if rec.is_file():
        return wd, json.loads(rec.read_text())
    info = make(wd)
    rec.write_text(json.dumps(info))
    return wd, info


def tag(extra: str, what: str = "reg") -> str:
    """A stage's name suffix for the extra options it ran with: a stage run with other options is another stage."""
    return f"@{what}" + extra.replace("--", "").replace(" ", "") if extra else ""


def branch(src: Path, wd: Path) -> None:
    if wd.exists():
        shutil.rmtree(wd)
    subprocess.run([*LLMPRUNE, "branch", str(src), str(wd)], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="direct,reg=calib")
    ap.add_argument("--structure", default="layers+mlp")
    ap.add_argument("--target-params", default="0.78")
    ap.add_argument("--reg", default="", help="extra options for every `llmprune regularize`")
    ap.add_argument("--recover", default="", help="extra options for every `llmprune recover`")
    ap.add_argument("--teacher-steps", type=int, default=50, help="full LM steps on calib that correct the teacher "
                    "of the *-kdc recoveries (Sreenivas et al. 2024)")
    ap.add_argument("--docs", choices=("docs_tune", "docs_test"), default="docs_tune")
    ap.add_argument("--test", action="store_true", help="also measure every row (and dense) on the documentation's "
                    "evaluation text, docs-test: the figures to report")
    ap.add_argument("--docs-windows", type=int, default=105, help="documentation windows evaluated (0: all)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--model", choices=assets.MODELS, default=assets.MODELS[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--save", default="", help="results name (default MODEL-generalisation)")
    args = ap.parse_args()
    paths = assets.fetch(model=args.model)
    out = args.out or Path(f"runs/generalisation-{args.model}")
    base = calibrated_base(out, paths, args.samples, args.seqlen)
    sel = ["--structure", args.structure, "--target-params", args.target_params, "--select", "activation"]
    teacher = [] if (base / "teacher").is_dir() else ["--teacher", paths["model"]]

    dense_wd, dense = stage(out, "dense", lambda wd: (branch(base, wd), evaluate(wd, paths, args))[1])
    if args.test:
        dense = held_out_test(dense_wd, paths, args)
    rows = []

    def row(run: str, info: dict, wd: Path | None = None) -> None:
        if args.test and wd is not None:
            info = held_out_test(wd, paths, args)
        r = dict(info, run=run, model=args.model, structure=args.structure, target_params=args.target_params,
                 docs=args.docs, wiki_x=info["wiki_ppl"] / dense["wiki_ppl"],
                 docs_x=info["docs_ppl"] / dense["docs_ppl"])
        if "docs_test_ppl" in info and "docs_test_ppl" in dense:
            r["docs_test_x"] = info["docs_test_ppl"] / dense["docs_test_ppl"]
        rows.append(r)
        print(json.dumps(r), flush=True)
        append_results(out, [r])

    def removed(wd: Path, reg_data: str | None) -> dict:
        branch(base, wd)
        info = dict(regularize_s=None, reg_data=reg_data)
        if reg_data:
            reg, wall, rss = popen_rss([*LLMPRUNE, "regularize", str(wd), *sel, "--dataset",
                                        data_spec(reg_data, paths), *args.reg.split()])
            info.update(regularize_s=wall, regularize_rss_mib=rss, reg_steps=reg.get("steps"))
        res, _, _ = popen_rss([*LLMPRUNE, "prune", str(wd), "--method", "dress", *([] if reg_data else sel)])
        info.update(parameters=res["parameters"], split=(res.get("budget") or {}).get("chosen", {}).get("ratios"))
        return dict(info, **evaluate(wd, paths, args))

    def corrected() -> list[str]:
        def make(wd: Path) -> dict:
            branch(base, wd)
            _, wall, _ = popen_rss([*LLMPRUNE, "recover", str(wd), "--full", "--steps", str(args.teacher_steps),
                                    "--dataset", paths["calib"]])
            return dict(teacher_s=wall, **evaluate(wd, paths, args))
        wd, info = stage(out, f"teacher-{args.teacher_steps}", make)
        row(f"corrected teacher ({args.teacher_steps} full LM steps on calib)", info)
        return ["--teacher", str(wd / "model")]

    for run in args.runs.split(","):
        kind, _, spec = run.partition("=")
        if run == "direct":
            wd, info = stage(out, "direct", lambda wd: removed(wd, None))
        elif kind == "reg":
            wd, info = stage(out, run + tag(args.reg), lambda wd: removed(wd, spec))
        elif kind == "rec":
            reg_data, how, steps, data = spec.split("/")
            src, reg_info = stage(out, f"reg={reg_data}" + tag(args.reg), lambda wd: removed(wd, reg_data))
            extra = [*KINDS[how], *((corrected() if how.endswith("kdc") else teacher) if "kd" in how else [])]

            def make(wd: Path) -> dict:
                branch(src, wd)
                r, wall, rss = popen_rss([*LLMPRUNE, "recover", str(wd), "--steps", steps, "--dataset",
                                          data_spec(data, paths), *extra, *args.recover.split()])
                return dict(reg_info, recover_s=wall, recover_rss_mib=rss, train_s=r.get("train_s"),
                            rec_kind=how, rec_steps=int(steps), rec_data=data, **evaluate(wd, paths, args))
            wd, info = stage(out, run + tag(args.reg) + tag(args.recover, "rec"), make)
        else:
            sys.exit(f"unknown run {run!r}")
        row(run + (f" [regularize {args.reg}]" if args.reg and kind != "direct" else "")
            + (f" [recover {args.recover}]" if args.recover and kind == "rec" else ""), info, wd)
    f = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
    test = args.test and "docs_test_ppl" in dense
    lines = ["| run | parameters | Wikipedia test ppl | x dense | docs-tune ppl | x dense | "
             + ("docs-test ppl | x dense | " if test else "") + "regularize s | recover s |",
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if test else ""),
             f"| dense | – | {dense['wiki_ppl']:.2f} | 1.00 | {dense['docs_ppl']:.2f} | 1.00 | "
             + (f"{dense['docs_test_ppl']:.2f} | 1.00 | " if test else "") + "– | – |"]
    for r in rows:
        lines.append(f"| {r['run']} | {f(r.get('parameters'), ',')} | {r['wiki_ppl']:.2f} | {r['wiki_x']:.2f} | "
                     f"{r['docs_ppl']:.2f} | {r['docs_x']:.2f} | "
                     + (f"{r['docs_test_ppl']:.2f} | {r['docs_test_x']:.2f} | " if test else "")
                     + f"{f(r.get('regularize_s'), '.0f')} | {f(r.get('recover_s') or r.get('teacher_s'), '.0f')} |")
    caption = (f"{args.model}, {args.structure} @ {args.target_params}, {args.samples} x {args.seqlen} calibration "
               f"windows; Wikipedia test {rows[0]['wiki_windows'] if rows else '?'} windows, {args.docs} "
               f"{rows[0]['docs_windows'] if rows else '?'} windows of {args.seqlen}. Command: python "
               f"benchmarks/generalisation_study.py {' '.join(sys.argv[1:])}")
    save_results(Path(__file__).parent / "results", args.save or f"{args.model}-generalisation", rows, caption,
                 "\n".join(lines))


if __name__ == "__main__":
    main()
