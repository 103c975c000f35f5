"""FSDP for regularize and recover (llmprune/sharding.py): under `accelerate launch --config_file
llmprune/configs/fsdp.yaml`, two CPU processes over gloo each hold half the rows of every weight, gradient and AdamW
moment, and the step saves the whole model -- the same model the single-process run trains, within float rounding
of a different summation order. Launches are the slower tier (each starts two interpreters); the refusals are fast."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli
from llmprune import sharding

CONFIG = Path(sharding.__file__).parent / "configs" / "fsdp.yaml"


def _weights(wd: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((wd / "model").glob("*.safetensors")) for k, v in load_file(f).items()}


def _launch(command: str, wd: Path, *opts, wait: bool = True):
    """`accelerate launch --config_file fsdp.yaml -m llmprune COMMAND WD OPTS --json` on two CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
           "--main_process_port", "0", "-m", "llmprune", command, str(wd), *map(str, opts), "--json"]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [s for s in json.loads((wd / "manifest.json").read_text())["steps"] if s["command"] == command]
    assert len(steps) == 1  # only the main process committed
    held = steps[0]["metrics"]["sharding"]  # each process held about half of the model, not all of it
    assert held["processes"] == 2 and held["parameters_held"] <= held["parameters"] // 2 + 1024
    return steps[0]["metrics"]


def _kill_every_process_of(wd: Path) -> None:
    """SIGKILL every process whose command line names ``wd`` (the launcher and the workers it started)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(wd).encode() in cmdline.read_bytes().split(b"\0"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):  # gone already
            pass


def _close(one: dict, two: dict, atol: float) -> float:
    """The largest difference of two saved models (same names and shapes), asserted below ``atol``."""
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"largest weight difference {worst:.2e} (tolerance {atol:g})")
    assert worst < atol, worst
    return worst


@pytest.mark.slow
def test_fsdp_regularize_trains_the_single_process_model(calibrated, tmp_path):
    """DReSS under FSDP: the proximal shrink acts on each process's rows with the unit norms summed over both, so
    the units reach zero at the same step and the regularised model is the single-process one (batch 4 = 2 x 2)."""
    wd = calibrated("llama", samples=24, seqlen=64)
    two = tmp_path / "two"
    shutil.copytree(wd, two)
    opts = ["--structure", "mlp", "--ratio", 0.25, "--steps", 10, "--lr", 1e-3, "--lambda", 0.2, "--holdout", 4,
            "--eval-every", 5]
    code, one = cli("regularize", wd, *opts, "--batch-size", 4)
    assert code == 0
    fsdp = _launch("regularize", two, *opts, "--batch-size", 2)
    for a, b in zip(one["loss"], fsdp["loss"]):
        assert abs(a - b) < 1e-3 * a, (one["loss"], fsdp["loss"])
    # lambda 0.2: every unit at zero after 5 steps, in both runs; the model without them as good as with them
    assert [e["relative_norm"] for e in fsdp["evals"]] == [e["relative_norm"] for e in one["evals"]]
    assert fsdp["evals"][-1]["relative_norm"] == 0.0
    assert fsdp["ppl_zeroed"] == pytest.approx(one["ppl_zeroed"], rel=1e-3)
    _close(_weights(wd), _weights(two), atol=5e-5)
    # the plan prunes the same units away
    assert cli("prune", wd, "--method", "dress")[0] == 0 and cli("prune", two, "--method", "dress")[0] == 0
    _close(_weights(wd), _weights(two), atol=5e-5)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--full"], ["--dropout", 0.0]], ids=["full", "lora"])
def test_fsdp_recover_trains_the_single_process_model(calibrated, tmp_path, extra):
    """recover under FSDP, of a 50% sparse model: every weight (the zero pattern re-applied to each process's rows
    after each step) or LoRA adapters (peft inside the sharded blocks), merged and verified after the gather."""
    wd = calibrated("llama", samples=36, seqlen=64)
    assert cli("prune", wd, "--method", "wanda", "--sparsity", 0.5)[0] == 0
    two = tmp_path / "two"
    shutil.copytree(wd, two)
    opts = ["--steps", 8, "--eval-every", 8, "--lr", 1e-3, "--holdout", 4, *extra]
    code, one = cli("recover", wd, *opts, "--batch-size", 4)
    assert code == 0
    fsdp = _launch("recover", two, *opts, "--batch-size", 2)
    for a, b in zip(one["loss"], fsdp["loss"]):
        assert abs(a - b) < 1e-3 * a, (one["loss"], fsdp["loss"])
    assert fsdp["sparsity"] == pytest.approx(one["sparsity"], abs=1e-6)  # the pattern held
    assert fsdp["ppl_after"] == pytest.approx(one["ppl_after"], rel=1e-3)
    _close(_weights(wd), _weights(two), atol=5e-5)


@pytest.mark.slow
def test_an_fsdp_run_killed_after_a_checkpoint_resumes_to_the_same_model(calibrated, tmp_path):
    """The checkpoint of a sharded run holds whole tensors (gathered): killed once one is written, the relaunch
    continues from it to the model an uninterrupted FSDP run gives."""
    wd = calibrated("llama", samples=24, seqlen=64)
    ref = tmp_path / "ref"
    shutil.copytree(wd, ref)
    opts = ["--structure", "mlp", "--ratio", 0.25, "--steps", 120, "--lr", 1e-3, "--holdout", 4, "--eval-every", 120,
            "--save-every", 4, "--batch-size", 2]
    whole = _launch("regularize", ref, *opts)
    manifest = (wd / "manifest.json").read_text()
    proc = _launch("regularize", wd, *opts, wait=False)
    deadline = time.time() + 300
    while not list((wd / ".resume").glob("regularize-*/state.json")) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    _kill_every_process_of(wd)  # the launcher and its workers (torchrun starts them in sessions of their own)
    proc.wait()
    assert (wd / "manifest.json").read_text() == manifest  # killed before its commit
    (state,) = (wd / ".resume").glob("regularize-*/state.json")
    kept = json.loads(state.read_text())["step"]
    assert kept % 4 == 0 and kept < 120
    res = _launch("regularize", wd, *opts)
    assert res["resumed_from"] == kept and res["steps"] == 120
    _close(_weights(wd), _weights(ref), atol=1e-5)
    assert res["ppl_zeroed"] == pytest.approx(whole["ppl_zeroed"], rel=1e-4)


@pytest.mark.parametrize("command, env, args, says", [
    ("regularize", {"FSDP_VERSION": "1", "WORLD_SIZE": "2"}, [], "llmprune shards with FSDP2"),
    ("recover", {"FSDP_VERSION": "1", "WORLD_SIZE": "2"}, [], "llmprune shards with FSDP2"),
    ("recover", {"FSDP_VERSION": "2", "WORLD_SIZE": "1"}, [], "at least 2 processes"),
    ("regularize", {"FSDP_VERSION": "2", "WORLD_SIZE": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, [],
     "--grad-checkpointing"),
    ("regularize", {"FSDP_VERSION": "2", "WORLD_SIZE": "2"}, ["--shrink", "loss"], "--shrink prox"),
], ids=["fsdp1", "fsdp1-recover", "one-process", "activation-checkpointing", "shrink-loss"])
def test_an_fsdp_launch_it_cannot_honour_is_refused_before_any_work(calibrated, monkeypatch, capsys, command, env,
                                                                    args, says):
    """What the sharded steps do not implement is one line and exit 1, the workdir unchanged (refused before the
    process group would be needed)."""
    wd = calibrated("llama")
    before = (wd / "manifest.json").read_text()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    code, _ = cli(command, wd, "--steps", 1, *(["--ratio", 0.25] if command == "regularize" else []), *args)
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and says in err and "Traceback" not in err
    assert (wd / "manifest.json").read_text() == before
