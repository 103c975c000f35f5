"""Nothing outside the workdir, ever: names built from user input, links inside a workdir, --force and --overwrite
over folders llmprune did not make, the lock held by export and across a recipe, records read back as written,
exit codes. Every case hashes a sibling "user" folder before and after: none of its files may change."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import random
import shutil
import string

import pytest

from llmprune.cli import run
from llmprune.fsio import hash_tree


@pytest.fixture
def user(tmp_path):
    """The user's own files beside the workdir, and a check that none of them changed."""
    home = tmp_path / "user"
    (home / "project" / "src").mkdir(parents=True)
    (home / "victim").write_text("keep me")
    (home / "project" / "manifest.json").write_text('{"name": "web app", "icons": []}')
    (home / "project" / "src" / "app.js").write_text("console.log(1)")
    (home / "private.txt").write_text("secret")
    before = hash_tree(home, home)
    listing = sorted(p.relative_to(home).as_posix() for p in home.rglob("*"))
    yield home
    assert hash_tree(home, home) == before, "a file of the user's changed"
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == listing, "the user's folder changed"


def _run(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = run([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    if code:  # warnings may come first; the error is one line (soft-wrapped at most once), never a traceback
        assert "error:" in err and "Traceback" not in err, err
        assert len(err[err.index("error:"):].splitlines()) <= 2, err
    return code, err.replace("\n", " ")


# --- class 1: names built from user input ----------------------------------------------------------------------
@pytest.mark.parametrize("flags", [
    ["--methods", "magnitude", "--patterns", "x/../../../../victim"],
    ["--methods", "/tmp/abs", "--sparsities", "0.5"],
    ["--structures", "../x:0.5"],
    ["--methods", "magnitude", "--patterns", "2:4\x1b[2J"],
    ["--methods", "m" * 300, "--sparsities", "0.5"],
])
def test_sweep_point_names_are_one_plain_folder_name(calibrated, user, capsys, flags):
    wd = calibrated()
    code, err = _run(capsys, "sweep", wd, *flags, "--max-windows", 1, "--seqlen", 32)
    assert code == 1 and "sweep point" in err, err
    assert not (wd / "sweep" / "runs").exists() or not any((wd / "sweep" / "runs").iterdir())
    assert "\x1b" not in err


def test_a_linked_sweep_folder_is_refused(calibrated, user, capsys):
    wd = calibrated()
    (wd / "sweep").symlink_to(user)
    code, err = _run(capsys, "sweep", wd, "--methods", "magnitude", "--sparsities", "0.5", "--max-windows", 1,
                     "--seqlen", 32)
    assert code == 4 and "symbolic link" in err
    code, err = _run(capsys, "export", wd, "--out", wd.parent / "out")  # its PNGs are never picked up either
    assert code == 4 and not (wd.parent / "out").exists()


# --- class 2: --force and --overwrite over folders llmprune did not make --------------------------------------
def test_calibrate_force_never_replaces_a_foreign_folder(tiny_root, user, capsys, tmp_path):
    args = ["--model", tiny_root / "llama", "--dataset", tiny_root / "corpus.txt", "--samples", 4, "--seqlen", 32,
            "--force"]
    code, err = _run(capsys, "calibrate", user / "project", *args)  # a web project with a manifest.json
    assert code == 1 and "not an llmprune workdir" in err
    thesis = user.parent / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("chapter 1")
    (thesis / ".commit").mkdir()
    code, err = _run(capsys, "calibrate", thesis, *args)  # an empty .commit/ is not a workdir
    assert code == 1 and (thesis / "thesis.tex").read_text() == "chapter 1"


def test_calibrate_force_keeps_the_users_files_in_a_workdir(calibrated, tiny_root, capsys):
    wd = calibrated()
    (wd / "notes.txt").write_text("my notes")
    args = ["--model", tiny_root / "llama", "--dataset", tiny_root / "corpus.txt", "--samples", 4, "--seqlen", 32]
    code, err = _run(capsys, "calibrate", wd, *args, "--force")
    assert code == 1 and "notes.txt" in err and (wd / "notes.txt").read_text() == "my notes"
    (wd / "notes.txt").unlink()
    (wd / "model" / "extra.bin").write_bytes(b"mine")
    code, err = _run(capsys, "calibrate", wd, *args, "--force")
    assert code == 1 and "extra.bin" in err and (wd / "model" / "extra.bin").exists()
    (wd / "model" / "extra.bin").unlink()
    assert _run(capsys, "calibrate", wd, *args, "--force")[0] == 0  # a workdir of its own files: replaced


def test_status_never_applies_a_foreign_commit(user, capsys):
    folder = user.parent / "foreign"
    (folder / ".commit").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / ".commit" / "notes.txt").write_text("replaced")
    (folder / ".commit" / "manifest.json").write_text('{"name": "web app", "start_url": "/"}')
    code, err = _run(capsys, "status", folder)
    assert code == 1 and "not an llmprune workdir" in err
    assert (folder / "notes.txt").read_text() == "mine" and not (folder / ".lock").exists()


def test_export_overwrite_replaces_only_an_export(calibrated, capsys, tmp_path):
    wd = calibrated()
    out = tmp_path / "out"
    assert _run(capsys, "export", wd, "--out", out)[0] == 0
    assert _run(capsys, "export", wd, "--out", out, "--overwrite")[0] == 0  # an export of its own files
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (out / "notes.txt").write_text("release notes")
    code, err = _run(capsys, "export", wd, "--out", out, "--overwrite")
    assert code == 1 and "which no export wrote" in err
    assert (out / "notes.txt").read_text() == "release notes" and (out / ".git" / "HEAD").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README.md").write_text("---\ntags:\n- llmprune\n---\n# mine")  # a card alone does not make it ours
    code, err = _run(capsys, "export", wd, "--out", foreign, "--overwrite")
    assert code == 1 and (foreign / "README.md").exists()


def test_a_killed_exports_leftovers_are_cleared(calibrated, capsys, tmp_path):
    wd = calibrated()
    dead = 2**22 + 12345  # above the default pid_max: no such process
    for kind in ("tmp", "old"):
        (tmp_path / f".out.{kind}-{dead}").mkdir()
        (tmp_path / f".out.{kind}-{dead}" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".other.tmp-{dead}").mkdir()  # not this export's: left alone
    assert _run(capsys, "export", wd, "--out", tmp_path / "out")[0] == 0
    assert not (tmp_path / f".out.tmp-{dead}").exists() and not (tmp_path / f".out.old-{dead}").exists()
    assert (tmp_path / f".other.tmp-{dead}").exists()


# --- class 3: links inside a workdir --------------------------------------------------------------------------
def test_a_linked_lock_is_refused_not_truncated(calibrated, user, capsys):
    wd = calibrated()
    (wd / ".lock").unlink(missing_ok=True)
    (wd / ".lock").symlink_to(user / "private.txt")
    code, err = _run(capsys, "prune", wd, "--method", "magnitude")
    assert code == 4 and "symbolic link" in err


@pytest.mark.parametrize("command", ["prune", "export", "eval"])
def test_unrecorded_files_in_model_are_never_adopted_or_shipped(calibrated, tiny_root, user, capsys, tmp_path,
                                                               command):
    wd = calibrated()
    args = {"prune": ["--method", "magnitude"], "export": ["--out", tmp_path / "out"],
            "eval": ["--dataset", tiny_root / "heldout.txt", "--seqlen", 32]}[command]
    for make in (lambda p: p.symlink_to(user / "private.txt"), lambda p: p.write_text("notes")):
        target = wd / "model" / "notes.txt"
        target.unlink(missing_ok=True)
        make(target)
        code, err = _run(capsys, command, wd, *args)
        assert code == 4 and "notes.txt" in err, err
        assert not (tmp_path / "out").exists()


# --- class 5: the lock ----------------------------------------------------------------------------------------
def _hold(path):
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_export_waits_for_no_one_it_takes_the_lock(calibrated, capsys, tmp_path):
    wd = calibrated()
    fd = _hold(wd)
    try:
        os.write(fd, b"pid 1 \x1b[31mred\x1b[0m on host")
        code, err = _run(capsys, "export", wd, "--out", tmp_path / "out")
    finally:
        os.close(fd)
    assert code == 3 and "\x1b" not in err and "\\x1b" in err  # the holder's text shown escaped
    assert not (tmp_path / "out").exists()


def test_run_holds_the_lock_across_its_steps(calibrated, tiny_root, capsys, monkeypatch, tmp_path):
    from llmprune.steps import recipe

    wd = tmp_path / "wd"
    (tmp_path / "r.toml").write_text(
        f'[[step]]\ncommand = "calibrate"\nmodel = "{tiny_root / "llama"}"\ndataset = "{tiny_root / "corpus.txt"}"\n'
        'samples = 4\nseqlen = 32\n[[step]]\ncommand = "prune"\nmethod = "magnitude"\n'
        '[[step]]\ncommand = "prune"\nmethod = "magnitude"\nsparsity = 0.6\n')
    free: list[bool] = []
    info = recipe.report.info

    def probe(msg, **kw):  # before each step: may another process take the lock?
        if (wd / ".lock").exists():
            fd = os.open(wd / ".lock", os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free.append(True)
            except OSError as e:
                assert e.errno in (errno.EAGAIN, errno.EACCES)
                free.append(False)
            finally:
                os.close(fd)
        info(msg, **kw)

    monkeypatch.setattr(recipe.report, "info", probe)
    code, err = _run(capsys, "run", wd, "--recipe", tmp_path / "r.toml")
    assert code == 0, err
    assert free and not any(free)


# --- class 6: records read back as written --------------------------------------------------------------------
def test_a_null_perplexity_in_the_manifest_is_read(calibrated, tiny_root, capsys, tmp_path):
    wd = calibrated()
    assert _run(capsys, "eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 32, "--max-windows", 2)[0] == 0
    m = json.loads((wd / "manifest.json").read_text())
    m["steps"][-1]["metrics"]["perplexity"] = None  # what strict JSON writes for an infinite perplexity
    m["steps"][-1]["metrics"]["parameters"] = None
    (wd / "manifest.json").write_text(json.dumps(m))
    assert _run(capsys, "status", wd)[0] == 0
    assert _run(capsys, "export", wd, "--out", tmp_path / "out")[0] == 0
    assert "| – |" in (tmp_path / "out" / "README.md").read_text()


def test_perplexity_overflows_to_infinity():
    from llmprune.stats import exp_nll

    assert exp_nll(710.0) == math.inf and exp_nll(1e308) == math.inf
    assert exp_nll(1.0) == pytest.approx(math.e) and math.isnan(exp_nll(float("nan")))


# --- classes 4 and 7: sources that lie about themselves, refused as bad input (exit 1) --------------------------
def _source(tiny_root, tmp_path, name):
    src = tmp_path / name
    shutil.copytree(tiny_root / "llama", src)
    return src


def _edit_header(path, edit):
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(raw[8:8 + n].decode())
    body = raw[8 + n:]
    pad = (8 - len(header) % 8) % 8
    header = header + " " * pad
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + body)


def _retype(tiny_root, tmp_path, name, dtype):
    """A source whose embedding is stored as ``dtype`` (same bytes)."""
    from safetensors.torch import load_file, save_file

    src = _source(tiny_root, tmp_path, name)
    tensors = load_file(src / "model.safetensors")
    key = next(k for k in tensors if "embed_tokens" in k)
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


def _config(tiny_root, tmp_path, name, **changes):
    src = _source(tiny_root, tmp_path, name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def _lying_sources(tiny_root, tmp_path):
    import torch

    def twice(h):
        d = json.loads(h)
        first = next(k for k in d if k != "__metadata__")
        return h.rstrip()[:-1] + f', "{first}": ' + json.dumps(d[first]) + "}"

    def float_shape(h):
        d = json.loads(h)
        first = next(k for k in d if k != "__metadata__")
        d[first]["shape"] = [float(x) for x in d[first]["shape"]]
        return json.dumps(d)

    dup = _source(tiny_root, tmp_path, "dup")
    _edit_header(dup / "model.safetensors", twice)
    flt = _source(tiny_root, tmp_path, "floatshape")
    _edit_header(flt / "model.safetensors", float_shape)
    corrupt = _source(tiny_root, tmp_path, "corrupt")
    corrupt.joinpath("model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    big_vocab = _source(tiny_root, tmp_path, "bigvocab")
    tok = json.loads((big_vocab / "tokenizer.json").read_text())
    base = len(tok["model"]["vocab"])
    tok["added_tokens"] += [{"id": base + i, "content": f"<x{i}>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True} for i in range(600)]
    (big_vocab / "tokenizer.json").write_text(json.dumps(tok))
    return {
        "int32 weights": (_retype(tiny_root, tmp_path, "int32", torch.int32), "cannot prune"),
        "integer embedding": (_retype(tiny_root, tmp_path, "int64", torch.int64), "cannot prune"),
        "a tensor named twice": (dup, "twice"),
        "float shapes": (flt, "not whole numbers"),
        "corrupt header": (corrupt, "not a valid safetensors file"),
        "tokenizer beyond the embedding": (big_vocab, "the embedding has"),
        "junk rope_scaling": (_config(tiny_root, tmp_path, "rope", rope_scaling={"rope_type": "linear", "factor": "x"},
                                      rope_parameters=None), "RoPE"),
        "unknown rope type": (_config(tiny_root, tmp_path, "rope2", rope_scaling={"rope_type": "nonsense"},
                                      rope_parameters=None), "RoPE"),
        "20,000 layers": (_config(tiny_root, tmp_path, "deep", num_hidden_layers=20000), "num_hidden_layers"),
        "more layers than the weights": (_config(tiny_root, tmp_path, "deeper", num_hidden_layers=3), "names 3 blocks"),
        "negative width": (_config(tiny_root, tmp_path, "neg", hidden_size=-64), "hidden_size"),
        "string width": (_config(tiny_root, tmp_path, "str", intermediate_size="128"), "intermediate_size"),
    }


def test_sources_that_lie_are_refused_before_anything_is_written(tiny_root, tmp_path, capsys, user):
    for name, (src, expected) in _lying_sources(tiny_root, tmp_path).items():
        wd = tmp_path / f"wd-{name.replace(' ', '-')}"
        code, err = _run(capsys, "calibrate", wd, "--model", src, "--dataset", tiny_root / "corpus.txt",
                         "--samples", 4, "--seqlen", 32)
        assert code == 1 and expected in err, f"{name}: exit {code}: {err}"
        assert not wd.exists(), f"{name}: a half-made workdir was left"


def test_a_gguf_whose_counts_lie_is_bad_input(tmp_path, tiny_root, capsys):
    import struct

    path = tmp_path / "lies.gguf"
    # magic, version 3, 1 tensor, 1 key-value: a string key whose length says 2^60 bytes
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 2**60) + b"general.architecture")
    code, err = _run(capsys, "calibrate", tmp_path / "wd", "--model", path, "--dataset", tiny_root / "corpus.txt",
                     "--samples", 4, "--seqlen", 32)
    assert code == 1 and "not a readable GGUF file" in err


# --- class 4: recipes and resource bombs ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "folder", "huge", "nan", "bigint"])
def test_recipe_files_are_bounded_and_finite(tiny_root, tmp_path, capsys, kind):
    """Refused before any step runs: the recipe's first step is a valid calibrate."""
    path = tmp_path / "r.toml"
    calibrate = (f'[[step]]\ncommand = "calibrate"\nmodel = "{tiny_root / "llama"}"\n'
                 f'dataset = "{tiny_root / "corpus.txt"}"\nsamples = 4\nseqlen = 32\n')
    if kind == "/dev/zero":
        path = "/dev/zero"
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "huge":
        path.write_text(calibrate + "# " + "x" * (2 << 20) + "\n")
    else:
        option = "sparsity = nan" if kind == "nan" else "batch-size = 1" + "0" * 40
        path.write_text(calibrate + f'[[step]]\ncommand = "prune"\nmethod = "wanda"\n{option}\n')
    code, err = _run(capsys, "run", tmp_path / "wd", "--recipe", path)
    assert code == 1 and not (tmp_path / "wd").exists(), err


def test_speed_batches_are_bounded_by_memory(calibrated, tiny_root, capsys):
    wd = calibrated()
    code, err = _run(capsys, "eval", wd, "--dataset", tiny_root / "heldout.txt", "--speed", "--prompt-len", 64,
                     "--new-tokens", 8, "--speed-batches", "1,100000000")
    assert code == 1 and "GiB" in err


# --- class 8 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("repo", ["me/x\n", "me/..x", "me/ünï", "me/a--b", "../x", "me/x/y", "me"])
def test_push_repo_ids_are_checked_before_anything_is_written(calibrated, capsys, tmp_path, monkeypatch, repo):
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    wd = calibrated()
    code, err = _run(capsys, "export", wd, "--out", tmp_path / "out", "--push-to-hub", repo)
    assert code == 1 and "is not a Hub repo id" in err and not (tmp_path / "out").exists()


def test_an_adapter_that_is_a_pickle_is_never_loaded(tmp_path):
    from llmprune.errors import IntegrityError
    from llmprune.current import merge_pending

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(IntegrityError, match="never loads pickles"):
        merge_pending(None, tmp_path, {"metrics": {}})


# --- the fuzz: random names and link placements; nothing outside the workdir and target changes ---------------
_NAME_BITS = ["..", "/", "\\", "x", "2:4", "\x00", "\n", "\x1b[2J", "é", "-", ".", "~", "$HOME", "*", "a" * 120]


def _fuzz_name(rng: random.Random) -> str:
    return "".join(rng.choice(_NAME_BITS + list(string.ascii_letters)) for _ in range(rng.randint(1, 6)))


_LINK_PLACES = [".lock", ".staging", ".trash", ".commit", ".recipe", ".resume", "sweep", "sweep/runs",
                "sweep/structured.png", "model/notes.txt", "model/config.json", "calib", "teacher", "model"]


def test_fuzz_names_and_links_never_reach_outside(calibrated, tiny_root, user, capsys, tmp_path):
    base = calibrated()
    rng = random.Random(46)
    outcomes: dict[str, list[int]] = {}
    for case in range(60):
        wd = tmp_path / f"case{case}"
        shutil.copytree(base, wd, symlinks=True)
        out = tmp_path / f"out{case}"
        kind = rng.choice(["sweep", "push", "recipe", "link", "link"])
        if kind == "recipe":  # recipe values that a step may turn into names: methods, patterns, structures, data
            key, value = rng.choice([("method", None), ("pattern", None), ("structure", None), ("dataset", None)])
            value = _fuzz_name(rng).replace("\x00", "")
            step = {"method": f'command = "prune"\nmethod = {json.dumps(value)}',
                    "pattern": f'command = "prune"\nmethod = "magnitude"\npattern = {json.dumps(value)}',
                    "structure": f'command = "prune"\nmethod = "dress"\nstructure = {json.dumps(value)}',
                    "dataset": f'command = "eval"\ndataset = {json.dumps(value)}\nseqlen = 32'}[key]
            (tmp_path / f"r{case}.toml").write_text(f"[[step]]\n{step}\n")
            args = ["run", wd, "--recipe", tmp_path / f"r{case}.toml"]
        elif kind == "sweep":
            flag = rng.choice(["--methods", "--patterns", "--structures"])
            name = _fuzz_name(rng).replace("\x00", "")  # argv cannot carry NUL
            args = ["sweep", wd, "--max-windows", 1, "--seqlen", 32, "--no-speed", "--dataset", tiny_root / "heldout.txt",
                    *({"--methods": ["--methods", name, "--sparsities", "0.5"],
                       "--patterns": ["--methods", "magnitude", "--patterns", name],
                       "--structures": ["--structures", f"{name}:0.5"]}[flag])]
        elif kind == "push":
            args = ["export", wd, "--out", out, "--dry-run", "--push-to-hub", f"{_fuzz_name(rng)}/{_fuzz_name(rng)}"]
            args = [a.replace("\x00", "") if isinstance(a, str) else a for a in args]
        else:
            place = rng.choice(_LINK_PLACES)
            target = wd / place
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(rng.choice([user, user / "victim", user / "project"]))
            command = rng.choice(["status", "prune", "export", "calibrate", "eval", "sweep"])
            args = {"status": ["status", wd], "prune": ["prune", wd, "--method", "magnitude"],
                    "export": ["export", wd, "--out", out],
                    "calibrate": ["calibrate", wd, "--model", tiny_root / "llama", "--dataset",
                                  tiny_root / "corpus.txt", "--samples", 4, "--seqlen", 32, "--force"],
                    "eval": ["eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 32, "--max-windows", 1],
                    "sweep": ["sweep", wd, "--methods", "magnitude", "--sparsities", "0.5", "--max-windows", 1,
                              "--seqlen", 32, "--no-speed", "--dataset", tiny_root / "heldout.txt"]}[command]
            kind = f"link {place} ({command})"
        code, err = _run(capsys, *args)
        outcomes.setdefault(kind.split(" (")[0], []).append(code)
        assert code in (0, 1, 4), f"case {case} {kind}: exit {code}: {err}"
        if kind.startswith("link"):
            assert code == 4, f"case {case} {kind}: a link inside the workdir was not refused: exit {code} {err}"
        if kind == "push":
            assert code == 1 or not out.exists()
        ours = {f"{prefix}{i}{suffix}" for i in range(case + 1) for prefix, suffix in
                (("case", ""), ("out", ""), ("r", ".toml"))}
        made = {p.name for p in tmp_path.iterdir()} - {"user", base.name} - ours
        assert not made, f"case {case} {kind}: made {made} beside the workdir"
    for kind, codes in sorted(outcomes.items()):  # shown with -s: the cases tried and their exit codes
        print(f"fuzz {kind}: {len(codes)} cases, exit codes {dict(sorted((c, codes.count(c)) for c in set(codes)))}")
    assert any(c == 4 for codes in outcomes.values() for c in codes) and any(
        c == 1 for codes in outcomes.values() for c in codes)
