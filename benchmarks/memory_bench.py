"""The memory estimate of regularize/recover (llmprune.memory) against the measured peak of the same run.

Each row is one `llmprune recover` (or `regularize`) process on the benchmark's SmolLM2-135M: its recorded estimate
(``memory_estimate.peak_mib``: the parts plus this process's size when the check ran) beside its peak resident size
(``wait4``'s ru_maxrss), a few steps each (the peak is reached by the second step: the optimizer state exists from
the first).

    python benchmarks/memory_bench.py                       # full b1, full b2, LoRA b1, full + distill b1, regularize
    python benchmarks/memory_bench.py --rows full-b1,lora-b1 --steps 3
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, calibrated_base, popen_rss, save_results  # noqa: E402

ROWS = {
    "full-b1": ["recover", "--full"],
    "full-b2": ["recover", "--full", "--batch-size", "2"],
    "lora-b1": ["recover"],
    "lora-b2": ["recover", "--batch-size", "2"],
    "full-kd-b1": ["recover", "--full", "--distill"],
    "regularize-b1": ["regularize", "--structure", "mlp", "--ratio", "0.3"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="full-b1,full-b2,lora-b1,full-kd-b1,regularize-b1")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/memory-bench"))
    args = ap.parse_args()
    paths = assets.fetch()
    base = calibrated_base(args.out, paths, 64, 512)
    teacher = [] if (base / "teacher").is_dir() else ["--teacher", paths["model"]]
    rows = []
    for name in args.rows.split(","):
        cmd = ROWS[name]
        wd = args.out / name
        if wd.exists():
            shutil.rmtree(wd)
        subprocess.run([*LLMPRUNE, "branch", str(base), str(wd)], check=True, stdout=subprocess.DEVNULL)
        extra = ["--save-every", "0", "--eval-every", str(args.steps), "--steps", str(args.steps)]
        res, wall, rss = popen_rss([*LLMPRUNE, cmd[0], str(wd), *cmd[1:], *extra,
                                    *(teacher if "--distill" in cmd else [])])
        est = res["memory_estimate"]
        rows.append(dict(row=name, command=" ".join(["llmprune", *cmd, *extra]), estimate_mib=est["peak_mib"],
                         process_mib=est["base_mib"], measured_mib=round(rss), error=est["peak_mib"] / rss - 1,
                         parts={k: est.get(k) for k in ("weights", "gradients", "optimizer", "teacher", "activations",
                                                        "training", "optimizer_step", "evaluation")}, wall_s=wall))
        print(rows[-1], flush=True)
        shutil.rmtree(wd)
    lines = ["| run | estimate MiB | of it, the process before loading | measured peak RSS MiB | estimate / measured |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['estimate_mib']:,} | {r['process_mib']:,} | {r['measured_mib']:,} | "
              f"{1 + r['error']:.2f} |" for r in rows]
    caption = (f"SmolLM2-135M (benchmark GGUF), 64 x 512 calibration windows, {args.steps} steps per run, this CPU. "
               f"Command: python benchmarks/memory_bench.py {' '.join(sys.argv[1:])}")
    save_results(Path(__file__).parent / "results", "memory-estimate", rows, caption, "\n".join(lines))


if __name__ == "__main__":
    main()
