from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from llmprune.cli import run  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    for arch in tiny.ARCH_TYPES:
        tiny.build(arch, root / arch)
    (root / "corpus.txt").write_text(tiny.corpus(), encoding="utf-8")
    (root / "heldout.txt").write_text(tiny.corpus(4000, seed=7), encoding="utf-8")
    return root


def cli(*args: str) -> tuple[int, dict | None]:
    """Run the CLI in-process with --json; returns (exit code, parsed JSON or None)."""
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = run([*map(str, args), "--json"])
    text = buf.getvalue().strip()
    return code, (json.loads(text) if code == 0 and text else None)


@pytest.fixture
def calibrated(tiny_root, tmp_path):
    """A function: arch -> a freshly calibrated workdir of that tiny model."""

    def make(arch: str = "llama", samples: int = 16, seqlen: int = 64) -> Path:
        wd = tmp_path / f"wd-{arch}"
        code, _ = cli("calibrate", wd, "--model", tiny_root / arch, "--dataset", tiny_root / "corpus.txt",
                      "--samples", samples, "--seqlen", seqlen)
        assert code == 0
        return wd

    return make
