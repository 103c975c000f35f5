"""The GPU check rehearsed on the CPU (``bash benchmarks/gpu_check.sh --rehearse``), in a virtual environment with the
package versions of the lent GPU machines (``.venv-device``, built by ``bash scripts/setup.sh --tests``): the script
that gets one chance on a GPU runs here first, and its failures fail it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import tiny

ROOT = Path(__file__).resolve().parents[1]
DEVICE_PY = ROOT / ".venv-device" / "bin" / "python"
STEPS = ["preflight", "cuda tests", "build", "calibrate", "wanda", "sparsegpt", "wandapp"]


def carried(where: Path) -> Path:
    """The carried folder the check reads (a tokenizer and a calibration text), built offline."""
    tiny.tokenizer().save_pretrained(where / "tokenizer")
    (where / "calib.txt").write_text(tiny.corpus(), encoding="utf-8")
    return where


def check(tmp_path: Path, py: Path, *args: str) -> tuple[int, list[dict], str]:
    out = tmp_path / "out"
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--rehearse", "--out", str(out), "--work",
                        str(tmp_path / "work"), *args], cwd=ROOT, env=dict(os.environ, PY=str(py)),
                       capture_output=True, text=True, timeout=300)
    rows = json.loads((out / "gpu-check.json").read_text())["rows"] if (out / "gpu-check.json").is_file() else []
    return p.returncode, rows, p.stdout + p.stderr


def test_the_device_environment_has_the_images_versions_and_lacks_its_missing_packages():
    assert DEVICE_PY.is_file(), "no .venv-device: `bash scripts/setup.sh --tests` (scripts/device_venv.sh) builds it"
    probe = ("import importlib.util as u, transformers, accelerate; print(transformers.__version__, "
             "accelerate.__version__, [m for m in ('datasets', 'gguf', 'lm_eval', 'pyarrow') if u.find_spec(m)])")
    out = subprocess.run([str(DEVICE_PY), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["5.17.0", "1.15.0"] and out[2] == "[]"


def test_the_rehearsal_passes_every_step_in_the_device_environment(tmp_path):
    assert DEVICE_PY.is_file(), "no .venv-device: `bash scripts/setup.sh --tests` (scripts/device_venv.sh) builds it"
    code, rows, log = check(tmp_path, DEVICE_PY, "--carried", str(carried(tmp_path / "carried")))
    assert code == 0, log
    assert [r["step"] for r in rows] == STEPS and all(r["ok"] for r in rows), rows
    for r in rows[4:]:  # each prune: an exact 2:4 model and a 32-block estimate from its per-block seconds
        assert r["sparsity"] == 0.5 and r["estimate_32_blocks_s"] >= r["blocks_s"]
    assert "collected" in rows[1]["detail"]
    table = (tmp_path / "out" / "gpu-check.md").read_text()
    assert all(f"| {s} | True |" in table for s in STEPS)


@pytest.mark.slow  # the failure paths: in the slower tier, the rehearsal itself in the fast one
def test_a_failed_preflight_stops_the_check_with_its_reason(tmp_path):
    code, rows, log = check(tmp_path, ROOT / ".venv" / "bin" / "python", "--carried", str(tmp_path / "nothing"))
    assert code == 1 and [r["step"] for r in rows] == ["preflight"] and not rows[0]["ok"]
    assert "calib.txt is missing" in rows[0]["error"] and "tokenizer.json is missing" in rows[0]["error"]


@pytest.mark.slow
def test_steps_past_the_deadline_are_cut_off_and_fail_the_check(tmp_path):
    """The whole rehearsal takes tens of seconds; under a 12-second deadline later steps cannot finish, each row
    says so, every step still has its row, and the exit status is non-zero."""
    code, rows, log = check(tmp_path, ROOT / ".venv" / "bin" / "python", "--carried",
                            str(carried(tmp_path / "carried")), "--deadline", "12")
    assert code == 1, log
    assert [r["step"] for r in rows] == STEPS and rows[0]["ok"]
    assert any("cut off" in r["error"] or "no calibrated model" in r["error"] for r in rows if not r["ok"])
    assert not all(r["ok"] for r in rows)
