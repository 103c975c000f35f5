"""The workdir contract: atomic steps, recovery, lock, integrity, format version."""

import json
import os

import pytest

from conftest import cli
from llmprune.errors import IntegrityError, UserError, WorkdirBusy
from llmprune.fsio import hash_tree
from llmprune.workdir import COMMIT, STAGING, Workdir


def _snapshot(wd):
    return hash_tree(wd, wd) | {"manifest": (wd / "manifest.json").read_text()}


def test_manifest_records_the_step(calibrated):
    wd = calibrated("llama")
    m = json.loads((wd / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["model_type"] == "llama"
    (step,) = m["steps"]
    assert step["command"] == "calibrate" and step["params"]["samples"] == 16
    assert set(step["versions"]) >= {"llmprune", "torch", "transformers"}
    assert step["outputs"] == m["files"] and "calib/windows.safetensors" in m["files"]
    assert any(k.startswith("model/") and k.endswith(".safetensors") for k in m["files"])


def test_a_failing_step_leaves_the_previous_state(calibrated, monkeypatch):
    wd = calibrated("llama")
    before = _snapshot(wd)
    import llmprune.pruning as pruning

    def boom(*a, **k):
        raise RuntimeError("simulated failure half-way")

    monkeypatch.setattr(pruning, "verify_block", boom)
    code, _ = cli("prune", wd, "--method", "wanda")
    assert code == 2
    assert _snapshot(wd) == before
    assert not (wd / STAGING).exists() and not (wd / COMMIT).exists()


def test_disk_full_while_saving_leaves_the_previous_state(calibrated, monkeypatch):
    import llmprune.shards as shards

    wd = calibrated("llama")
    before = _snapshot(wd)
    real, calls = shards.os.pwrite, []

    def full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:  # a few tensors are on disk...
            raise OSError(28, "No space left on device")  # ...when the disk fills up
        return real(fd, data, offset)

    monkeypatch.setattr(shards.os, "pwrite", full)
    code, _ = cli("prune", wd, "--method", "magnitude")
    monkeypatch.undo()
    assert code == 2 and len(calls) > 3
    assert _snapshot(wd) == before


def test_a_committed_transaction_is_finished_on_next_open(calibrated):
    """A process killed after the commit rename but before moving the files leaves `.commit`: roll forward."""
    wd = calibrated("llama")
    ws = Workdir(wd)
    m = ws.manifest()
    commit = wd / COMMIT
    commit.mkdir()
    (commit / "extra.txt").write_text("new")
    m["steps"].append({**m["steps"][0], "command": "eval"})  # a step of a known command
    (commit / "manifest.json").write_text(json.dumps(m))
    with ws.locked():
        pass
    assert not commit.exists() and (wd / "extra.txt").read_text() == "new"
    assert [s["command"] for s in ws.steps()] == ["calibrate", "eval"]


def test_reading_a_workdir_finishes_a_pending_commit_first(calibrated):
    """The commit point passed but the move did not finish: a reader must see the committed state (the step and its
    files), never the manifest before it beside the step's files. While a writer holds the lock, reading neither
    blocks nor fails: that writer is the one finishing the move."""
    wd = calibrated("llama")
    m = Workdir(wd).manifest()
    m["steps"].append({**m["steps"][0], "command": "eval"})
    (wd / COMMIT).mkdir()
    (wd / COMMIT / "manifest.json").write_text(json.dumps(m))
    assert [s["command"] for s in Workdir(wd).steps()] == ["calibrate", "eval"]
    assert not (wd / COMMIT).exists()
    m["steps"].append({**m["steps"][0], "command": "eval"})
    with Workdir(wd).locked():  # a writer holds the lock while its commit is pending
        (wd / COMMIT).mkdir()
        (wd / COMMIT / "manifest.json").write_text(json.dumps(m))
        assert [s["command"] for s in Workdir(wd).steps()] == ["calibrate", "eval"]
        assert (wd / COMMIT).exists()
    assert [s["command"] for s in Workdir(wd).steps()] == ["calibrate", "eval", "eval"]


def test_uncommitted_staging_is_discarded(calibrated):
    wd = calibrated("llama")
    before = _snapshot(wd)
    (wd / STAGING / "model").mkdir(parents=True)
    (wd / STAGING / "model" / "junk").write_text("x")
    with Workdir(wd).locked():
        pass
    assert _snapshot(wd) == before and not (wd / STAGING).exists()


def test_second_writer_gets_a_clear_error(calibrated):
    wd = calibrated("llama")
    with Workdir(wd).locked():
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
            with Workdir(wd).locked():
                pass
        code, _ = cli("prune", wd, "--method", "magnitude")
        assert code == 3


def test_tampered_or_truncated_shard_is_refused(calibrated):
    wd = calibrated("llama")
    shard = next((wd / "model").glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="does not match"):
        Workdir(wd).verify("model")
    code, _ = cli("prune", wd, "--method", "magnitude")
    assert code == 4


def test_no_verify_skips_the_hashes_and_says_so(calibrated, monkeypatch):
    import llmprune.workdir as wdmod

    wd = calibrated("llama")
    calls = []
    real = wdmod.sha256_file
    monkeypatch.setattr(wdmod, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    assert cli("--no-verify", "prune", wd, "--method", "magnitude")[0] == 0
    reads = [p for p in calls if "staging" not in str(p) and ".commit" not in str(p)]
    assert reads == []  # nothing the step read was hashed (what it wrote still is, for the manifest)
    code, st = cli("status", wd)
    assert st["steps"][-1]["inputs_verified"] is False and "inputs_verified" not in st["steps"][0]
    # The next command verifies again, and a tampered shard (one weight's bytes changed) is caught ...
    shard = next((wd / "model").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli("prune", wd, "--method", "magnitude", "--sparsity", 0.6)[0] == 4
    # ... unless the user opts out, here through the environment (as a CI job or a recipe would).
    monkeypatch.setenv("LLMPRUNE_NO_VERIFY", "1")
    assert cli("prune", wd, "--method", "magnitude", "--sparsity", 0.6)[0] == 0


def test_unknown_format_version(calibrated):
    wd = calibrated("llama")
    m = json.loads((wd / "manifest.json").read_text())
    m["format_version"] = 99
    (wd / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="format version 99"):
        Workdir(wd).manifest()


def test_calibrate_refuses_to_overwrite_without_force(calibrated, tiny_root):
    wd = calibrated("llama")
    args = ("calibrate", wd, "--model", tiny_root / "qwen2", "--dataset", tiny_root / "corpus.txt",
            "--samples", 4, "--seqlen", 32)
    assert cli(*args)[0] == 1
    assert Workdir(wd).manifest()["model_type"] == "llama"
    (wd / "stale-dir").mkdir()  # not llmprune's: --force replaces a workdir's own files only
    assert cli(*args, "--force")[0] == 1 and (wd / "stale-dir").is_dir()
    (wd / "stale-dir").rmdir()
    (wd / ".recipe").mkdir()  # what llmprune keeps there goes with the old workdir
    assert cli(*args, "--force")[0] == 0
    assert Workdir(wd).manifest()["model_type"] == "qwen2" and not (wd / ".recipe").exists()




@pytest.mark.parametrize("where", ["manifest", "removal list", "snapshot", "symlink"])
def test_names_in_the_metadata_never_leave_the_workdir(calibrated, tiny_root, tmp_path, capsys, where):
    """A crafted name in the workdir's metadata is refused (exit 4) by every command that reads it, and nothing
    outside the workdir is renamed, linked or read."""
    from llmprune.cli import run

    wd = calibrated("llama")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("keep me")
    m = json.loads((wd / "manifest.json").read_text())
    commands = [["status", str(wd)], ["prune", str(wd)], ["eval", str(wd), "--dataset", str(tiny_root / "heldout.txt"), "--seqlen", "32"]]
    if where == "manifest":
        m["files"]["../outside/secret.txt"] = "0" * 64
        (wd / "manifest.json").write_text(json.dumps(m))
    elif where == "removal list":
        commit = wd / COMMIT
        commit.mkdir()
        (commit / ".remove").write_text("../outside\n")
        (commit / "manifest.json").write_text(json.dumps(m))
        (wd / "manifest.json").unlink()  # killed mid-move: every command, readers too, finishes the commit first
    elif where == "symlink":
        shard = next(k for k in m["files"] if k.startswith("model/") and k.endswith(".safetensors"))
        (wd / shard).unlink()
        (wd / shard).symlink_to(outside / "secret.txt")
    else:  # a recipe snapshot whose manifest names a file outside
        from llmprune.workdir import SNAPSHOTS

        snap = wd / SNAPSHOTS / "abcd"
        snap.mkdir(parents=True)
        m["files"] = {"../../outside/secret.txt": "0" * 64}
        (snap / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(IntegrityError, match="not a path inside the workdir"):
            Workdir(wd).restore("abcd")
        commands = []
    before = hash_tree(outside, outside)
    for args in commands:
        capsys.readouterr()
        code = run(args)
        err = capsys.readouterr().err
        assert code == 4, (args, err)  # status too: a link inside a workdir is refused by every command
        assert err.startswith("error:") and "Traceback" not in err and "workdir" in err, err
    assert hash_tree(outside, outside) == before and (outside / "secret.txt").read_text() == "keep me"
