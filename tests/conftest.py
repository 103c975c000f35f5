from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

from llmprune.cli import run  # noqa: E402


# The GPU machines' image lacks datasets, gguf, lm-eval and pyarrow: there a test marked ``needs(package)`` is
# skipped for a missing one; everywhere else a missing package is a failure, so CI never counts such a skip as a pass.
# scripts/device_venv.sh marks its virtual environment (a file in it); on a GPU machine set LLMPRUNE_DEVICE_IMAGE=1.
DEVICE_IMAGE = os.environ.get("LLMPRUNE_DEVICE_IMAGE") == "1" or (Path(sys.prefix) / "llmprune-device-image").is_file()


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        for package in mark.args:
            if importlib.util.find_spec(package) is None:
                if DEVICE_IMAGE:
                    pytest.skip(f"needs {package}, which the GPU machines' image lacks")
                pytest.fail(f"needs {package}, which is not installed (bash scripts/setup.sh installs it)")


def killed_at_evaluation(monkeypatch, args, n: int) -> None:
    """Run the CLI with ``args`` and interrupt it, as Ctrl-C would, at its ``n``-th held-out evaluation
    (``train.heldout_nll``, the first ones being those before training): exit 130, nothing committed."""
    import llmprune.train as train_mod

    real, calls = train_mod.heldout_nll, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "heldout_nll", dying)
        assert run([*map(str, args)]) == 130


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


@pytest.fixture(scope="session")
def _calibrated_cache(tiny_root, tmp_path_factory):
    """Calibrated tiny workdirs, made once per (arch, samples, seqlen) for the whole session; never handed out
    themselves (tests get copies), so no test sees another's steps."""
    root = tmp_path_factory.mktemp("calibrated")
    made: dict[tuple[str, int, int], Path] = {}

    def get(arch: str, samples: int, seqlen: int) -> Path:
        key = (arch, samples, seqlen)
        if key not in made:
            wd = root / f"{arch}-{samples}x{seqlen}"
            code, _ = cli("calibrate", wd, "--model", tiny_root / arch, "--dataset", tiny_root / "corpus.txt",
                          "--samples", samples, "--seqlen", seqlen)
            assert code == 0
            made[key] = wd
        return made[key]

    return get


@pytest.fixture
def calibrated(_calibrated_cache, tmp_path):
    """A function: arch -> a calibrated workdir of that tiny model, this test's own copy (the calibrate step's
    record is identical to a fresh calibration's but for its timestamps)."""

    def make(arch: str = "llama", samples: int = 16, seqlen: int = 64) -> Path:
        wd = tmp_path / f"wd-{arch}"
        shutil.copytree(_calibrated_cache(arch, samples, seqlen), wd)
        return wd

    return make


# Free space the session needs under pytest's temporary directory (passed tests' directories are removed as they
# pass, pyproject.toml): the real tier's largest test writes ~3 GB beside the session's shared real-model workdirs
# (~2 GB); the fast tier stays under 1 GB.
NEED_GB = {"real": 8.0, "fast": 1.0}


def pytest_collection_modifyitems(config, items):
    """The real-model tier is slow by definition: it is marked so, wherever a test sits under tests/real/."""
    for item in items:
        if "real" in item.keywords:
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    """A disk too full for the tiers that will run stops the session here with one line, instead of 200 errors
    written mid-run. Here, after -m / -k deselected (the hook above runs before them, so `-m "not slow"` is
    judged as the fast tier it is)."""
    tier = "real" if any("real" in item.keywords for item in session.items) else "fast"
    where = Path(session.config.option.basetemp or tempfile.gettempdir()).absolute()
    while not where.exists():  # a --basetemp pytest will create: the disk of the nearest folder that exists
        where = where.parent
    free = shutil.disk_usage(where).free / 2**30
    if free < NEED_GB[tier]:
        pytest.exit(f"only {free:.1f} GB free under {where}; the {tier} tier needs about {NEED_GB[tier]:.0f} GB "
                    f"(free space, or point --basetemp elsewhere)", returncode=3)
