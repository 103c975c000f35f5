"""The GPU check: what a lent GPU machine (about 15 minutes, no network, one command of at most 10) must show.

    bash benchmarks/gpu_check.sh               # on the GPU machine, from the repository root (.gpu/ carried)
    bash benchmarks/gpu_check.sh --rehearse    # the same script on this CPU, tiny geometry, under 3 minutes

Steps, each under a cap and all under one deadline (default 9 minutes), each row of the table written as its step
ends (``$OUT/gpu-check.{md,json}``, or benchmarks/results/gpu-check[-rehearsal]/), every error kept in the table:

1. **preflight** (seconds): torch sees a CUDA device, the carried files are present (``.gpu/tokenizer``,
   ``.gpu/calib.txt``), the work folder and ``/dev/shm`` have room, the CLI's packages import.
2. **cuda tests**: ``tests/test_cuda.py`` with its whole output kept; a skip counts as a failure (a torch that
   sees no GPU skips them all). The rehearsal collects them only (no GPU to run them on).
3. **build**: a random-init model of Llama-2-7B's geometry with ``--blocks`` blocks (4 by default: a block's
   seconds and peak device memory are a 32-block model's per block), drawn on the GPU.
4. **calibrate**, then **Wanda, SparseGPT, Wanda++** at 2:4 with ``--device cuda``, each in its own process: wall
   seconds, the step's capture / prune / propagate seconds, peak device memory, peak host RSS, and the 7B estimate
   (the per-block seconds x 32 plus the fixed cost).

The exit status is non-zero when any step failed or was cut off. Why fewer blocks: hashing and writing a 13.5 GB
model several times (calibrate, each prune) costs minutes on a cloud disk without telling anything a block does
not; a 4-block model is about 2.4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL_BLOCKS = 32  # Llama-2-7B
METHODS = ("wanda", "sparsegpt", "wandapp")
CAPS = {"cuda tests": 150, "build": 90, "calibrate": 90, "wanda": 90, "sparsegpt": 150, "wandapp": 150}


class Check:
    """The rows of the check, rewritten to disk after every step; the deadline every step's cap is cut to."""

    def __init__(self, out: Path, deadline_s: float, rehearse: bool):
        self.out, self.rows, self.rehearse = out, [], rehearse
        self.t0, self.deadline_s = time.monotonic(), deadline_s
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.t0)

    def add(self, step: str, ok: bool, seconds: float, detail: str = "", error: str = "", **extra) -> bool:
        self.rows.append(dict(step=step, ok=ok, seconds=round(seconds, 1), detail=detail, error=error, **extra))
        self.write()
        print(f"{'ok  ' if ok else 'FAIL'} {step:<12} {seconds:7.1f} s  {detail}{'  ' + error if error else ''}",
              flush=True)
        return ok

    def write(self) -> None:
        (self.out / "gpu-check.json").write_text(json.dumps(dict(rehearsal=self.rehearse, rows=self.rows), indent=1))
        cols = ("step", "ok", "seconds", "detail", "error")
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = [str(r[c]).replace("|", "/").replace("\n", " ") for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        (self.out / "gpu-check.md").write_text("\n".join(lines) + "\n")

    def run(self, step: str, cmd: list[str], cap: float, log: Path) -> tuple[int | None, str, float, float]:
        """(exit code or None when cut off, stdout, seconds, peak RSS MiB) of ``cmd`` under min(cap, time left);
        its stderr goes whole to ``log``."""
        limit = min(cap, self.left())
        if limit < 5:
            return None, "", 0.0, 0.0
        t0 = time.monotonic()
        with open(log, "wb") as err:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, start_new_session=True, cwd=ROOT)
            cut = threading.Timer(limit, os.killpg, (p.pid, signal.SIGKILL))  # the whole group: pytest's children
            cut.start()
            out = p.stdout.read()
            _, status, usage = os.wait4(p.pid, 0)  # its own peak RSS, not the largest of every child so far
            cut.cancel()
        secs = time.monotonic() - t0
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and secs >= limit - 1:
            return None, "", secs, 0.0
        code = os.waitstatus_to_exitcode(status)
        return code, out.decode(errors="replace"), secs, usage.ru_maxrss / 1024


def tail(log: Path, n: int = 300) -> str:
    text = log.read_text(errors="replace").strip() if log.is_file() else ""
    lines = [ln for ln in text.splitlines() if ln.strip() and "Warning" not in ln]
    return (lines[-1] if lines else "")[-n:]


def preflight(check: Check, args) -> bool:
    t0 = time.monotonic()
    problems, facts = [], []
    try:
        import torch

        facts.append(f"torch {torch.__version__}")
        if args.rehearse:
            facts.append("CPU rehearsal")
        elif not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} sees no CUDA device (CUDA {torch.version.cuda}; a driver "
                            "older than the build's CUDA does this)")
        else:
            props = torch.cuda.get_device_properties(0)
            facts.append(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
        import accelerate, peft, rich, safetensors, transformers, typer  # noqa: E401,F401 the CLI's packages

        facts.append(f"transformers {transformers.__version__}")
        subprocess.run([sys.executable, "-c", "import llmprune.cli"], check=True, cwd=ROOT, capture_output=True)
    except Exception as e:  # any import or CUDA failure is this step's reason, in one line
        problems.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    for need in (args.carried / "tokenizer" / "tokenizer.json", args.carried / "calib.txt"):
        if not need.is_file():
            problems.append(f"{need} is missing (make it with: python benchmarks/gpu_check.py --prepare "
                            f"{args.carried})")
    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free / 2**30
    # the model, the calibrated copy and one prune's output at a time: a 7B-geometry block is 0.40 GB in bf16, the
    # embedding and head 0.81 GB; 1 GB to spare
    need_gb = 0.05 if args.rehearse else 3 * (0.40 * args.blocks + 0.81) + 1
    if free < need_gb:
        problems.append(f"{args.work}: {free:.1f} GB free, the check needs about {need_gb:.0f} GB")
    if Path("/dev/shm").is_dir() and shutil.disk_usage("/dev/shm").free < 2**30:
        problems.append(f"/dev/shm has {shutil.disk_usage('/dev/shm').free / 2**20:.0f} MiB free (1 GiB needed)")
    facts.append(f"{free:.0f} GB free in {args.work}")
    return check.add("preflight", not problems, time.monotonic() - t0, ", ".join(facts), "; ".join(problems))


def cuda_tests(check: Check, args) -> bool:
    log, xml = check.out / "cuda-tests.txt", check.out / "cuda-tests.xml"
    pytest = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"]
    cmd = [*pytest, "--collect-only", "-q"] if args.rehearse else [*pytest, "-rA", f"--junitxml={xml}"]
    code, out, secs, _ = check.run("cuda tests", cmd, CAPS["cuda tests"], log)
    (check.out / "cuda-tests.out").write_text(out)
    if code is None:
        return check.add("cuda tests", False, secs, error="cut off at the cap or the deadline")
    if args.rehearse:
        n = len([ln for ln in out.splitlines() if "::" in ln])
        return check.add("cuda tests", code == 0 and n > 0, secs, f"{n} collected (rehearsal: not run, no GPU)",
                         "" if code == 0 and n > 0 else tail(log) or out[-300:])
    counts = {k: int(v) for k, v in re.findall(r'(tests|failures|errors|skipped)="(\d+)"',
                                                xml.read_text() if xml.is_file() else "")}
    passed = counts.get("tests", 0) - sum(counts.get(k, 0) for k in ("failures", "errors", "skipped"))
    ok = code == 0 and passed > 0 and not counts.get("skipped") and not counts.get("failures")
    failed = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR", "SKIPPED"))]
    return check.add("cuda tests", ok, secs, f"{passed} passed, {counts.get('failures', 0)} failed, "
                     f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped (a skip fails the check)",
                     "; ".join(failed)[:600])


def build(check: Check, args) -> Path | None:
    model, log = args.work / "model", check.out / "build.log"
    if model.exists():
        shutil.rmtree(model)
    cmd = [sys.executable, "benchmarks/random_model.py", str(model), "--size", "tiny" if args.rehearse else "7b",
           "--layers", str(args.blocks), "--tokenizer", str(args.carried / "tokenizer"),
           "--device", "cpu" if args.rehearse else "cuda"]
    code, _, secs, _ = check.run("build", cmd, CAPS["build"], log)
    ok = code == 0
    check.add("build", ok, secs, f"{'tiny' if args.rehearse else 'Llama-2-7B'} geometry, {args.blocks} blocks",
              "" if ok else ("cut off" if code is None else tail(log)))
    return model if ok else None


def calibrate(check: Check, args, model: Path) -> Path | None:
    wd, log = args.work / "w", check.out / "calibrate.log"
    cmd = [sys.executable, "-m", "llmprune", "calibrate", str(wd), "--model", str(model), "--dataset",
           str(args.carried / "calib.txt"), "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--force",
           "--json"]
    code, _, secs, _ = check.run("calibrate", cmd, CAPS["calibrate"], log)
    ok = code == 0
    check.add("calibrate", ok, secs, f"{args.samples} x {args.seqlen} windows",
              "" if ok else ("cut off" if code is None else tail(log)))
    return wd if ok else None


def prune(check: Check, args, wd: Path, method: str) -> bool:
    branch, log = args.work / f"w-{method}", check.out / f"prune-{method}.log"
    if branch.exists():
        shutil.rmtree(branch)
    subprocess.run(["cp", "-al", str(wd), str(branch)], check=True)  # hard links: no copy, no re-hash of inputs
    cmd = [sys.executable, "-m", "llmprune", "prune", str(branch), "--method", method, "--pattern", "2:4",
           "--device", "cpu" if args.rehearse else "cuda", "--json"]
    code, out, secs, rss = check.run(method, cmd, CAPS[method], log)
    shutil.rmtree(branch, ignore_errors=True)
    if code != 0:
        return check.add(method, False, secs, error="cut off at the cap or the deadline" if code is None
                         else f"exit {code}: {tail(log)}")
    res = json.loads(out)
    blocks_s = sum(res.get(k, 0.0) for k in ("capture_s", "prune_s", "propagate_s"))
    est = blocks_s / args.blocks * FULL_BLOCKS + (secs - blocks_s)
    detail = (f"capture {res.get('capture_s', 0):.1f} s, prune {res.get('prune_s', 0):.1f} s, propagate "
              f"{res.get('propagate_s', 0):.1f} s; peak device {res.get('peak_device_memory_mib', '-')} MiB, host "
              f"RSS {rss:.0f} MiB; 32-block estimate {est:.0f} s")
    return check.add(method, True, secs, detail, estimate_32_blocks_s=round(est), blocks_s=round(blocks_s, 1),
                     peak_device_memory_mib=res.get("peak_device_memory_mib"), sparsity=res["sparsity"]["all"])


def prepare(carried: Path) -> None:
    """Make the carried folder here (the GPU machine has no network): SmolLM2's tokenizer and the calibration text."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import assets
    import random_model

    carried.mkdir(parents=True, exist_ok=True)
    random_model.tokenizer().save_pretrained(carried / "tokenizer")
    shutil.copy(assets.fetch()["calib"], carried / "calib.txt")
    print(carried)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rehearse", action="store_true", help="on this CPU, tiny geometry, under 3 minutes")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole check (default 540; 170 "
                    "rehearsing)")
    ap.add_argument("--blocks", type=int, default=None, help="blocks of the model (default 4; 2 rehearsing)")
    ap.add_argument("--samples", type=int, default=None, help="calibration windows (default 128; 4 rehearsing)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; 32 rehearsing)")
    ap.add_argument("--carried", type=Path, default=ROOT / ".gpu", help="the carried folder (tokenizer, calib.txt)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("WORK", "/tmp/llmprune-gpu-check")))
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT, else benchmarks/results/gpu-check")
    ap.add_argument("--prepare", type=Path, default=None, metavar="DIR", help="only make the carried folder DIR")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return 0
    r = args.rehearse
    args.deadline = args.deadline or (170 if r else 540)
    args.blocks, args.samples = args.blocks or (2 if r else 4), args.samples or (4 if r else 128)
    args.seqlen = args.seqlen or (32 if r else 2048)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       ROOT / "benchmarks/results" / ("gpu-check-rehearsal" if r else "gpu-check"))
    check = Check(out, args.deadline, r)
    ok = preflight(check, args)
    if ok:  # the rest is worth running only on a machine that passed the preflight
        ok = cuda_tests(check, args)
        model = build(check, args)
        wd = calibrate(check, args, model) if model else None
        if model is None:  # every step keeps its row: the table says what did not run and why
            check.add("calibrate", False, 0.0, error="no model built")
        ok = ok and wd is not None
        for m in METHODS:
            ok = (prune(check, args, wd, m) if wd else check.add(m, False, 0.0, error="no calibrated model")) and ok
    total = time.monotonic() - check.t0
    print(f"{'passed' if ok else 'FAILED'} in {total:.0f} s; table: {out / 'gpu-check.md'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
