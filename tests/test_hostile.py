"""Fuzzed metadata: random valid-JSON edits of manifest.json and of a pending commit (types swapped, keys removed,
path-like names). Every command either works or refuses in one line with exit 4 -- never a traceback, never a change
outside the workdir."""

import copy
import json
import random
import shutil

import pytest

from llmprune.cli import run
from llmprune.fsio import hash_tree

PATHS = ["../outside/secret.txt", "/etc/hostname", "model/../../outside/secret.txt", "", ".", "a//b", "..\\x"]
SWAPS = [None, 0, 1.5, "x", [], {}, True, ["../outside"], {"../outside/secret.txt": "0" * 64}]


def _mutate(m: dict, rng: random.Random) -> str:
    kind = rng.choice(["drop top", "swap top", "drop step field", "swap step field", "path", "digest", "swap file list"])
    files = m.get("files") if isinstance(m.get("files"), dict) and m.get("files") else None
    if kind in ("path", "digest") and files is None or not m:
        kind = "swap file list"
    if kind == "drop top":
        key = rng.choice(sorted(m))
        del m[key]
    elif kind == "swap top":
        key = rng.choice(sorted(m))
        m[key] = copy.deepcopy(rng.choice(SWAPS))
    elif kind in ("drop step field", "swap step field") and isinstance(m.get("steps"), list) and m["steps"] \
            and isinstance(m["steps"][0], dict):
        step = m["steps"][0]
        key = rng.choice(sorted(step))
        if kind == "drop step field":
            del step[key]
        else:
            step[key] = copy.deepcopy(rng.choice(SWAPS))
    elif kind == "path":
        rel = rng.choice(sorted(m["files"]))
        m["files"][rng.choice(PATHS)] = m["files"].pop(rel)
    elif kind == "digest":
        rel = rng.choice(sorted(m["files"]))
        m["files"][rel] = copy.deepcopy(rng.choice(SWAPS))
    else:
        m["files"] = copy.deepcopy(rng.choice(SWAPS))
    return kind




@pytest.mark.parametrize("where", ["manifest", "pending commit"])
def test_fuzzed_metadata_is_refused_in_one_line(calibrated, tmp_path, capsys, where):
    base = calibrated("llama", samples=8, seqlen=32)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("keep me")
    pristine = json.loads((base / "manifest.json").read_text())
    rng = random.Random(0 if where == "manifest" else 1)
    outcomes: dict[int, int] = {}
    for case in range(25):
        wd = tmp_path / f"case{case}"
        shutil.copytree(base, wd)
        m = copy.deepcopy(pristine)
        kinds = [_mutate(m, rng) for _ in range(rng.randint(1, 2))] if isinstance(m, dict) else []
        if where == "manifest":
            (wd / "manifest.json").write_text(json.dumps(m))
        else:  # killed after the commit point: the next command must finish it -- or refuse it
            commit = wd / ".commit"
            commit.mkdir()
            (commit / "manifest.json").write_text(json.dumps(m))
            (commit / ".remove").write_text(rng.choice(["", "../outside\n", "calib\n", "/tmp\n"]))
            (wd / "manifest.json").unlink()
        before = hash_tree(outside, outside)
        for args in (["status", wd], ["prune", wd, "--method", "magnitude"],
                     ["export", wd, "--out", tmp_path / f"export{case}", "--dry-run"]):
            capsys.readouterr()
            code = run([str(a) for a in args])
            err = capsys.readouterr().err.strip()
            outcomes[code] = outcomes.get(code, 0) + 1
            assert code in (0, 4), f"case {case} {kinds} {args[0]}: exit {code}: {err}"
            if code:
                assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) <= 2, err
        assert hash_tree(outside, outside) == before, f"case {case} {kinds}: a file outside the workdir changed"
        assert not (tmp_path / f"export{case}").exists()
    assert outcomes.get(4, 0) > 0  # the fuzz does reach the refusals
