"""Tokenizing a corpus-sized text: one tokenizer call against ``data.tokenize``'s pieces (peak memory and time).

``calibrate --dataset c4`` reads the first shard of C4's training split (about 800 M characters) and tokenizes it
whole; ``regularize`` reads it again for fresh windows. One call of a fast tokenizer on such a text holds every
token's encoding at once. The Hub (and C4) cannot be reached here, so the text is the benchmark's calibration text
repeated to ``--mchars`` million characters, tokenized with SmolLM2's tokenizer (docs/benchmarks.md), each way in its own
process (peak RSS from ``wait4``).

    python benchmarks/tokenize_bench.py --mchars 40      # about two minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import save_results  # noqa: E402

CHILD = r"""
import json, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from llmprune import data
model, calib, mchars, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(str(Path(model).parent), gguf_file=Path(model).name)
base = Path(calib).read_text(encoding="utf-8")
text = "\n\n".join([base] * int(mchars * 1e6 // len(base) + 1))[: int(mchars * 1e6)]
if mode == "one":
    data.ONE_CALL_CHARS = len(text)  # the whole text in one call, as before pieces existed
t0 = time.perf_counter()
ids = data.tokenize(tok, text)
print(json.dumps({"tokens": ids.numel(), "seconds": time.perf_counter() - t0, "chars": len(text)}))
"""


def run(paths: dict, mchars: float, mode: str) -> dict:
    import os

    proc = subprocess.Popen([sys.executable, "-c", CHILD, paths["model"], paths["calib"], str(mchars), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"the {mode} run failed ({os.waitstatus_to_exitcode(status)})")
    return {**json.loads(out.decode().strip().splitlines()[-1]), "mode": mode, "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mchars", type=float, default=40.0, help="millions of characters of text")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--save", default="tokenize")
    args = ap.parse_args()
    paths = assets.fetch()
    t0 = time.perf_counter()
    rows = [run(paths, args.mchars, mode) for mode in ("one", "pieces")]
    one = rows[0]
    lines = ["| tokenize | characters | tokens | seconds | peak RSS MiB | RSS / one call |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'one call' if r['mode'] == 'one' else 'pieces'} | {r['chars']:,} | {r['tokens']:,} | "
                     f"{r['seconds']:.1f} | {r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] / one['peak_rss_mib']:.2f} |")
    caption = (f"`python benchmarks/tokenize_bench.py --mchars {args.mchars:g}` ({time.perf_counter() - t0:.0f} s): "
               "SmolLM2's tokenizer on the calibration text repeated; each way in its own process.")
    save_results(args.results, args.save, rows, caption, "\n".join(lines))


if __name__ == "__main__":
    main()
