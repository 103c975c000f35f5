"""The first blocks of a streamed prune, timed one by one: cost and peak memory of a run too long to finish here.

A streamed prune holds one block at a time, so its peak RSS is reached within the first blocks (every block has
the same shapes) and its time is the capture plus a cost per block. This runs the very path `llmprune prune` runs
(`pruning.prune_model` on the workdir's lazily read model, nothing written) for the first ``--blocks`` blocks of a
calibrated workdir, in a fresh process, and prints and saves (``results/block-cost-DATE.{md,json}``) the capture
seconds, each block's seconds, the peak RSS, and the whole run extrapolated (capture + blocks x mean block time).

    python benchmarks/block_cost.py runs/scale/work-8b --method sparsegpt --blocks 3
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prune_bench import save_results  # noqa: E402


class Enough(Exception):
    """Raised by the sink once the blocks asked for are done."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path, help="a calibrated workdir (scale_bench.py's work-SIZE, kept)")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    import torch

    import llmprune.engine
    from llmprune import arch
    from llmprune.masks import parse_pattern
    from llmprune.methods import METHODS
    from llmprune.methods.base import PruneSpec
    from llmprune.current import open_current
    from llmprune.pruning import prune_model
    from llmprune.workdir import Workdir

    torch.set_num_threads(2)
    ws = Workdir(args.workdir)
    lm, _, weights = open_current(ws, tokenizer=False)
    method = METHODS[args.method]
    pat, s = parse_pattern(args.pattern, None)
    spec = PruneSpec(pat, s, method.options({}))
    n_blocks = len(arch.blocks(lm))
    marks = [time.perf_counter()]
    capture = []

    def sink(i: int, block) -> None:  # after block i is pruned (and the next inputs made)
        marks.append(time.perf_counter())
        if i + 1 >= args.blocks:
            raise Enough

    real_capture = llmprune.engine.capture

    def timed_capture(*a, **k):
        t = time.perf_counter()
        out = real_capture(*a, **k)
        capture.append(time.perf_counter() - t)
        marks[0] = time.perf_counter()
        return out

    llmprune.engine.capture = timed_capture  # prune_model reaches it through the module: the capture is timed apart
    windows = ws.windows()  # read and hashed once
    try:
        prune_model(lm, method, spec, windows, "cpu", 4, torch.float32, weights=weights, sink=sink)
    except Enough:
        pass
    per_block = [round(b - a, 1) for a, b in zip(marks, marks[1:])]
    mean = sum(per_block) / len(per_block)
    row = {"workdir": str(args.workdir), "method": args.method, "pattern": args.pattern,
           "parameters": sum(p.numel() for p in lm.parameters()), "blocks_run": len(per_block),
           "blocks": n_blocks, "windows": list(windows.shape), "capture_s": round(capture[0], 1),
           "block_s": per_block, "extrapolated_s": round(capture[0] + mean * n_blocks, 1),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    row["extrapolated_s_per_b"] = round(row["extrapolated_s"] / (row["parameters"] / 1e9), 1)
    print(json.dumps(row), flush=True)
    table = ("| workdir | method | blocks run | capture s | seconds per block | extrapolated s (all blocks) | "
             "s / B params | peak RSS GB |\n|---|---|---|---|---|---|---|---|\n"
             f"| {row['workdir']} | {row['method']} {row['pattern']} | {row['blocks_run']} of {n_blocks} | "
             f"{row['capture_s']} | {', '.join(map(str, per_block))} | {row['extrapolated_s']} | "
             f"{row['extrapolated_s_per_b']} | {row['peak_rss_gb']} |")
    save_results(args.results, "block-cost", [row],
                 f"`python benchmarks/block_cost.py {args.workdir} --method {args.method} --pattern {args.pattern} "
                 f"--blocks {args.blocks}` (2 CPU threads; the first blocks of the streamed prune, nothing written)",
                 table)


if __name__ == "__main__":
    main()
