"""Cost as the model grows: calibrate, prune and eval on random-init Llama-shaped bf16 models streamed from disk.

For each size (``random_model.py`` builds it shard by shard): ``calibrate`` (16 x 512 windows of the benchmark
text), ``prune --method wanda --pattern 2:4`` and ``prune --method sparsegpt --pattern 2:4`` (each on a hard-linked
copy of the calibrated workdir: steps never write a file in place, so the copy is free and safe), and
``eval --max-windows 8``. Every command runs in its own process; peak RSS comes from ``wait4``. With
``--in-memory``, the old path (the whole model loaded with ``from_pretrained``, pruned in place, saved with
``save_pretrained``) is measured beside it for the sizes given.

    python benchmarks/scale_bench.py --sizes 0.5b,1b                   # about 25 minutes on 2 cores
    python benchmarks/scale_bench.py --sizes 0.5b,1b,3b,8b --samples 16
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, popen_rss, save_results  # noqa: E402

SIZE_ORDER = ("0.5b", "1b", "3b", "7b", "8b")  # random_model.SIZES, without importing torch into this process

IN_MEMORY = """
import sys, torch
from llmprune.workdir import Workdir
from llmprune.current import load_current
from llmprune.modeling import save_model
from llmprune.methods import METHODS
from llmprune.methods.base import PruneSpec
from llmprune.masks import parse_pattern
from llmprune.pruning import prune_model
ws = Workdir(sys.argv[1])
model, tok = load_current(ws)
pat, s = parse_pattern("2:4", None)
m = METHODS[sys.argv[2]]
prune_model(model, m, PruneSpec(pat, s, m.options({})), ws.windows(), batch_size=4)
save_model(model, tok, sys.argv[3], ws.shard_size)
print("{}")
"""


def linked_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    subprocess.run(["cp", "-al", str(src), str(dst)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5b,1b")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--in-memory", default="", help="sizes to measure the in-memory path for too")
    ap.add_argument("--add", action="store_true",
                    help="keep the rows of today's results file for the sizes this run does not measure (a long "
                         "table measured in several runs); the caption then lists each run's command")
    ap.add_argument("--skip", action="append", default=[], metavar="SIZE:METHOD",
                    help="a prune not to run (e.g. 8b:sparsegpt, hours on 2 cores); its cells read 'not run'")
    ap.add_argument("--out", type=Path, default=Path("runs/scale"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    paths = assets.fetch()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        src = args.out / f"random-{size}"
        # Built in a child process: Linux carries a process's peak RSS across exec into the ru_maxrss that wait4
        # reports, so every command started from a parent that had built a model in memory would report at least
        # the parent's peak (all four columns read the same 1.44 GB at 0.6B that way).
        subprocess.run([sys.executable, str(Path(__file__).parent / "random_model.py"), str(src), "--size", size],
                       check=True, stdout=subprocess.DEVNULL)
        disk = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        params = json.loads((args.out / f"random-{size}" / "config.json").read_text())
        base = args.out / f"work-{size}"
        if base.exists():
            shutil.rmtree(base)
        res, wall, rss = popen_rss([*LLMPRUNE, "calibrate", str(base), "--model", str(src), "--dataset",
                                    paths["calib"], "--samples", str(args.samples), "--seqlen", str(args.seqlen)])
        n = res["parameters"]
        row = dict(size=size, parameters=n, disk_gb=round(disk / 1e9, 2), hidden=params["hidden_size"],
                   layers=params["num_hidden_layers"], calibrate_s=round(wall, 1), calibrate_rss_gb=round(rss / 1024, 2))
        for method in ("wanda", "sparsegpt"):
            if f"{size}:{method}" in args.skip:
                continue
            wd = args.out / f"{size}-{method}"
            linked_copy(base, wd)
            res, wall, rss = popen_rss([*LLMPRUNE, "prune", str(wd), "--method", method, "--pattern", "2:4"])
            row[f"{method}_s"] = round(wall, 1)
            row[f"{method}_s_per_b"] = round(wall / (n / 1e9), 1)
            row[f"{method}_rss_gb"] = round(rss / 1024, 2)
            if size in args.in_memory.split(","):
                tmp = args.out / f"{size}-{method}-inmem"
                shutil.rmtree(tmp, ignore_errors=True)
                _, wall2, rss2 = popen_rss([sys.executable, "-c", IN_MEMORY, str(base), method, str(tmp)])
                row[f"{method}_inmem_s"], row[f"{method}_inmem_rss_gb"] = round(wall2, 1), round(rss2 / 1024, 2)
                shutil.rmtree(tmp, ignore_errors=True)
            if method == "sparsegpt":
                shutil.rmtree(wd)
        if "wanda_s" not in row:
            sys.exit("eval runs on the Wanda workdir: --skip SIZE:wanda is not supported")
        ev, wall, rss = popen_rss([*LLMPRUNE, "eval", str(args.out / f"{size}-wanda"), "--dataset", paths["test"],
                                   "--seqlen", str(args.seqlen), "--max-windows", "8"])
        row.update(eval_s=round(wall, 1), eval_rss_gb=round(rss / 1024, 2))
        shutil.rmtree(args.out / f"{size}-wanda")
        shutil.rmtree(base)
        # The parent's own peak: below every command's, or their figures would be its (see above).
        row["bench_process_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, args)  # after every size: a long run cut short keeps what it measured


def write(rows: list[dict], args) -> None:
    """Print the table and save it (markdown and JSON) under ``args.results``."""
    import datetime

    command = (f"python benchmarks/scale_bench.py --sizes {','.join(r['size'] for r in rows)}"
               + (f" --in-memory {args.in_memory}" if args.in_memory else "")
               + "".join(f" --skip {x}" for x in args.skip) + (" --add" if args.add else ""))
    for r in rows:
        r["command"] = command
    today = args.results / f"scale-{datetime.date.today().isoformat()}.json"
    if args.add and today.exists():
        mine = {r["size"] for r in rows}
        order = list(SIZE_ORDER)
        rows = sorted([r for r in json.loads(today.read_text()) if r["size"] not in mine] + rows,
                      key=lambda r: order.index(r["size"]) if r["size"] in order else len(order))
    lines = ["| size | parameters | on disk GB | calibrate s | Wanda 2:4 s | s / B params | peak RSS GB | RSS / disk "
             "| SparseGPT 2:4 s | s / B params | peak RSS GB | RSS / disk | eval s | eval peak RSS GB | in-memory peak "
             "RSS GB (Wanda / SparseGPT) |", "|---|" * 1 + "---|" * 14]
    for r in rows:
        inmem = (f"{r['wanda_inmem_rss_gb']} / {r['sparsegpt_inmem_rss_gb']}" if "wanda_inmem_rss_gb" in r else "")
        cells = []
        for m in ("wanda", "sparsegpt"):
            cells += ([r[f"{m}_s"], r[f"{m}_s_per_b"], r[f"{m}_rss_gb"], f"{r[f'{m}_rss_gb'] / r['disk_gb']:.2f}"]
                      if f"{m}_s" in r else ["not run"] * 4)
        lines.append(f"| {r['size']} | {r['parameters'] / 1e9:.2f} B | {r['disk_gb']} | {r['calibrate_s']} | "
                     + " | ".join(str(c) for c in cells) + f" | {r['eval_s']} | {r['eval_rss_gb']} | {inmem} |")
    commands = list(dict.fromkeys(r.get("command", "") for r in rows))
    save_results(args.results, "scale", rows,
                 f"Random-init Llama-shaped bf16 models, {args.samples} x {args.seqlen} calibration windows, 2 CPU "
                 "threads. " + "; ".join(f"`{c}`" for c in commands if c), "\n".join(lines))


if __name__ == "__main__":
    main()
