"""Streaming: a model read block by block from its shards and written shard by shard gives, bit for bit, what the
same step gives on the model held in memory; what it writes loads anywhere; damaged shards are refused."""

import json
import math
import os

import pytest
import tiny
import torch
from conftest import cli
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from llmprune import arch as _arch
from llmprune import units
from llmprune import engine, evaluate, shards
from llmprune.errors import IntegrityError, UserError
from llmprune.head import Head
from llmprune.lazy import Lazy, Rewrite
from llmprune.masks import parse_pattern
from llmprune.precision import STORED_NAMES
from llmprune.methods import METHODS
from llmprune.methods.base import PruneSpec
from llmprune.pruning import prune_model

METHOD_NAMES = ("magnitude", "wanda", "sparsegpt", "wandapp", "ria")
PATTERNS = ("unstructured", "2:4", "4:8")
CASES = [(m, p, False) for m in METHOD_NAMES for p in PATTERNS] + \
        [(m, "2:4", True) for m in ("wanda", "sparsegpt", "ria", "wandapp")]


def _grid() -> list[tuple[str, str, str, bool]]:
    """(arch, method, pattern, true_sequential): the whole grid on Llama; on every other family each method once,
    in a pattern that rotates with the family's place and the method's, so every (family, method) and every
    (method, pattern) pair is run, and true-sequential pruning for every method. What streaming could get wrong
    differs by family (its tensors, its arguments), not by the mask's pattern, which is the same code either way --
    and the whole grid on 20 families would be 400 tests, a fifth of the fast tier."""
    grid = [("llama", *case) for case in CASES]
    for i, arch in enumerate(a for a in tiny.ARCH_TYPES if a != "llama"):
        grid += [(arch, m, PATTERNS[(i + j) % 3], False) for j, m in enumerate(METHOD_NAMES)]
        grid += [(arch, m, "2:4", True) for m in ("wanda", "sparsegpt", "ria", "wandapp")]
    return grid


def _state(folder):
    s = shards.ShardSet(folder)
    return {n: s.get(n) for n in s.names()}


def _prune_both(src, out, method, pattern, true_sequential=False, windows=None):
    """The in-memory result (state dict) and the streamed one (the folder ``out``)."""
    m = METHODS[method]
    pat, s = parse_pattern(pattern, None)
    spec = PruneSpec(pat, s, m.options(tiny.fast_options(method)), true_sequential)
    if windows is None:
        torch.manual_seed(0)
        windows = torch.randint(0, tiny.VOCAB, (8, 32))
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    prune_model(model, m, spec, windows if m.needs_data else None, batch_size=4)
    lazy = Lazy(src)
    rewrite = Rewrite(lazy, out, lazy.stored(units.linear_weight_names(lazy.model)))
    res = prune_model(lazy.model, m, spec, windows if m.needs_data else None, batch_size=4, weights=lazy,
                      sink=rewrite.block)
    rewrite.close()
    assert {p.device.type for p in lazy.model.parameters()} == {"meta"}  # nothing was left loaded
    return model, res


@pytest.mark.parametrize("arch,method,pattern,true_sequential", _grid())
def test_streamed_prune_equals_in_memory_bit_for_bit(tiny_root, tmp_path, arch, method, pattern, true_sequential):
    model, res = _prune_both(tiny_root / arch, tmp_path / "out", method, pattern, true_sequential)
    ref = model.state_dict()
    got = _state(tmp_path / "out")
    src = _state(tiny_root / arch)
    # the source's layout, tensor for tensor (MoE experts stay one 2-D tensor per expert, as releases keep them)
    assert set(got) == set(src) and all(got[n].dtype == src[n].dtype for n in got)
    if arch not in tiny.MOE_TYPES:  # there the disk names are the model's
        for name, t in got.items():
            assert torch.equal(t, ref[name]), name
    assert evaluate.sparsity_by_type(res["after"]) == evaluate.sparsity_by_type(model)
    # and it is a standard checkpoint, bit for bit the in-memory result
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, t in again.state_dict().items():
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), name


@pytest.mark.parametrize("arch", tiny.ARCH_TYPES)
def test_streamed_perplexity_equals_in_memory(tiny_root, arch):
    torch.manual_seed(1)
    windows = torch.randint(0, tiny.VOCAB, (5, 32))
    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch).eval()
    lazy = Lazy(tiny_root / arch)
    got = evaluate.perplexity(lazy.model, windows, batch_size=2, weights=lazy)
    ref = evaluate.perplexity(model, windows, batch_size=2)
    # The lazy head is read in slices with a running log-sum-exp: the same sum, in another order.
    assert got["tokens"] == ref["tokens"] and math.isclose(got["nll"], ref["nll"], rel_tol=1e-6)
    # in slices of 50 vocabulary rows (8 slices), against plain cross-entropy on the whole model's logits
    hidden = torch.randn(31, model.config.hidden_size)
    targets = torch.randint(0, tiny.VOCAB, (31,))
    with Head(lazy.model, "cpu", lazy, logits_bytes=31 * 4 * 50) as head:
        sliced = head.nll(hidden, targets)
    with Head(model, "cpu") as head:
        full = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum").item()
    assert math.isclose(sliced, full, rel_tol=1e-5)
    assert {p.device.type for p in lazy.model.parameters()} == {"meta"}
    assert sum(p.numel() for p in lazy.model.parameters()) == sum(p.numel() for p in model.parameters())


def test_capture_reads_only_the_embedding_rows_it_uses(tiny_root):
    lazy = Lazy(tiny_root / "llama")
    windows = torch.tensor([[5, 7, 7, 300], [8, 5, 9, 10]])
    acts = engine.capture(lazy.model, windows, 2, weights=lazy)
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "llama").eval()
    ref = engine.capture(model, windows, 2)
    assert torch.equal(acts.hidden[0], ref.hidden[0])
    assert lazy.model.get_input_embeddings().weight.shape == (tiny.VOCAB, 64)  # back to the full (meta) shape
    with pytest.raises(IndexError, match="outside the vocabulary"):
        engine.capture(lazy.model, torch.tensor([[1, tiny.VOCAB]]), 1, weights=lazy)


def _bf16(tiny_root, tmp_path, arch="llama"):
    out = tmp_path / f"{arch}-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_root / arch, dtype=torch.bfloat16).save_pretrained(out)
    tiny.tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "unstructured"), ("wandapp", "2:4")])
def test_bf16_stays_bf16_and_streams_exactly(tiny_root, tmp_path, method, pattern):
    src = _bf16(tiny_root, tmp_path)
    model, _ = _prune_both(src, tmp_path / "out", method, pattern)
    assert model.dtype == torch.bfloat16
    got = _state(tmp_path / "out")
    names = units.linear_weight_names(model)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    ref = model.state_dict()
    for name, t in got.items():
        assert torch.equal(t, ref[name]), name
        if name in names:
            assert (t == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), name


def test_shard_writer_round_trip_and_layout(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int64),
               "d": torch.zeros(2, 2, dtype=torch.float16)}
    save_file(tensors, tmp_path / "ref.safetensors")
    entries, _ = shards.read_header(tmp_path / "ref.safetensors")  # our reader on safetensors' own writer
    assert {k: e.shape for k, e in entries.items()} == {k: tuple(v.shape) for k, v in tensors.items()}
    planned = [shards.Planned(k, STORED_NAMES[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    plan = shards.plan_shards(planned, max_bytes=64)
    assert len(plan) > 1 and [t.name for s in plan for t in s] == list(tensors)
    names = shards.shard_names(len(plan))
    w = shards.ShardWriter(tmp_path / "out", dict(zip(names, plan)))
    for k in reversed(list(tensors)):  # any order
        w.put(k, tensors[k])
    w.close()
    index = json.loads((tmp_path / "out" / shards.INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors)
    for name in names:  # safetensors' own reader on our writer
        for k, v in load_file(tmp_path / "out" / name).items():
            assert torch.equal(v, tensors[k])
    got = shards.ShardSet(tmp_path / "out")
    assert all(torch.equal(got.get(k), v) for k, v in tensors.items())


def test_an_unwritten_tensor_is_never_a_hole(tmp_path):
    w = shards.ShardWriter(tmp_path / "out", {shards.SINGLE: [shards.Planned("a", "F32", (4,))]})
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_unchanged_shards_are_hard_linked_and_not_rehashed(calibrated, tiny_root, tmp_path):
    wd = tmp_path / "wd"
    code, _ = cli("calibrate", wd, "--model", tiny_root / "llama", "--dataset", tiny_root / "corpus.txt",
                  "--samples", "8", "--seqlen", "32", "--max-shard-size", "90KB")
    assert code == 0
    src = shards.ShardSet(wd / "model")
    embed = src.entries["model.embed_tokens.weight"].file
    assert len(src.files) > 2 and src.tensors_of(embed) == ["model.embed_tokens.weight"]
    inode = os.stat(wd / "model" / embed).st_ino
    digest = json.loads((wd / "manifest.json").read_text())["files"][f"model/{embed}"]
    assert cli("prune", wd, "--method", "wanda", "--pattern", "2:4")[0] == 0
    assert os.stat(wd / "model" / embed).st_ino == inode  # the same file, not a copy
    after = shards.ShardSet(wd / "model")
    assert after.files == src.files and json.loads((wd / "manifest.json").read_text())["files"][f"model/{embed}"] \
        == digest
    assert cli("eval", wd, "--dataset", tiny_root / "corpus.txt", "--seqlen", "32", "--max-windows", "2")[0] == 0


def test_missing_or_damaged_shards_are_one_line_exit_4(calibrated, tiny_root, tmp_path, capsys):
    from llmprune.cli import run

    wd = tmp_path / "wd"
    assert cli("calibrate", wd, "--model", tiny_root / "llama", "--dataset", tiny_root / "corpus.txt",
               "--samples", "8", "--seqlen", "32", "--max-shard-size", "90KB")[0] == 0
    files = shards.ShardSet(wd / "model").files
    index = wd / "model" / shards.INDEX
    original = index.read_text()
    cases = {
        "a shard removed": lambda: (wd / "model" / files[-1]).rename(tmp_path / "away"),
        "an index naming a file that is not there": lambda: index.write_text(
            original.replace(files[-1], "model-00099-of-00099.safetensors")),
        "a truncated shard": lambda: os.truncate(wd / "model" / files[-1], 100),
    }
    for what, damage in cases.items():
        keep = {p.name: p.read_bytes() for p in (wd / "model").iterdir()}
        damage()
        capsys.readouterr()
        assert run(["--no-verify", "prune", str(wd), "--method", "magnitude"]) == 4, what
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (what, err)
        for p in (wd / "model").iterdir():
            p.unlink()
        for name, data in keep.items():
            (wd / "model" / name).write_bytes(data)
    assert cli("prune", wd, "--method", "magnitude")[0] == 0  # restored: it works


def test_lazy_refuses_shards_that_do_not_cover_the_config(tiny_root, tmp_path):
    src = tiny_root / "llama"
    state = load_file(src / "model.safetensors")
    for what, edit in {"missing": lambda s: s.pop("model.norm.weight"),
                       "of the wrong shape": lambda s: s.update({"model.norm.weight": torch.ones(3)}),
                       "not in the model": lambda s: s.update({"extra.weight": torch.ones(3)})}.items():
        d = tmp_path / what.replace(" ", "-")
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        s = dict(state)
        edit(s)
        save_file(s, d / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(IntegrityError, match=what):
            Lazy(d)


@pytest.mark.parametrize("arch", tiny.ARCH_TYPES)
@pytest.mark.parametrize("structure", ["hidden", "heads", "mlp", "layers", "experts"])
def test_streamed_structured_removal_equals_in_memory(tiny_root, tmp_path, arch, structure):
    from llmprune.selection import select
    from llmprune.surgery import remove, remove_streamed

    src = tiny_root / arch
    reason = dict(_arch.arch_for(arch).parts.cannot).get(structure) or (
        structure == "experts" and arch not in tiny.EXPERT_REMOVAL_TYPES)
    if reason:  # the architecture cannot express the smaller model: both paths refuse it
        lazy = Lazy(src)
        with pytest.raises(UserError, match="not possible"):
            remove_streamed(lazy, select(lazy.model, structure, 0.25, "random", None, seed=3), tmp_path / "o", "2GB")
        return
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    plan = select(model, structure, 0.5 if structure == "layers" else 0.25, "random", None, seed=3)
    ref = remove(model, plan).state_dict()
    small, counts = remove_streamed(Lazy(src), plan, tmp_path / "out", "40KB")
    assert len(shards.ShardSet(tmp_path / "out").files) > 1  # --max-shard-size applies
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a standard, smaller config
    # MoE checkpoints keep one tensor per expert on disk: compare what transformers loads from them.
    got = loaded.state_dict() if arch in tiny.MOE_TYPES else _state(tmp_path / "out")
    assert set(got) <= set(ref) and len(got) >= len(ref) - 1
    for name, t in got.items():
        assert torch.equal(t, ref[name]), name
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in small.parameters())
    assert set(counts) == set(evaluate.model_zeros(loaded))


def test_calibrate_copies_a_folder_tensor_by_tensor(tiny_root, tmp_path):
    src = tiny_root / "qwen2"
    ref = load_file(src / "model.safetensors")
    for dtype, expect in (("auto", torch.float32), ("bfloat16", torch.bfloat16)):
        wd = tmp_path / dtype
        assert cli("calibrate", wd, "--model", src, "--dataset", tiny_root / "corpus.txt", "--samples", "4",
                   "--seqlen", "32", "--dtype", dtype, "--max-shard-size", "60KB")[0] == 0
        got = _state(wd / "model")
        assert set(got) == set(ref) and len(shards.ShardSet(wd / "model").files) > 1
        for name, t in got.items():
            assert t.dtype == expect and torch.equal(t, ref[name].to(expect)), name
        model = AutoModelForCausalLM.from_pretrained(wd / "model")
        assert model.dtype == expect
    bad = tmp_path / "nan"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    ref["model.norm.weight"][3] = float("nan")
    save_file(ref, bad / "model.safetensors", metadata={"format": "pt"})
    code, _ = cli("calibrate", tmp_path / "w-nan", "--model", bad, "--dataset", tiny_root / "corpus.txt",
                  "--samples", "4", "--seqlen", "32")
    assert code == 1 and not (tmp_path / "w-nan").exists()


@pytest.mark.slow
def test_kill_while_shards_are_written_loses_nothing(calibrated, tmp_path):
    """kill -9 a prune at the moment its new shards are on disk in the staging area: the workdir is as before, and
    the next prune gives the uninterrupted result."""
    import signal
    import subprocess
    import sys
    import time

    wd = calibrated("llama")
    ref = tmp_path / "ref"
    import shutil

    shutil.copytree(wd, ref)
    argv = [sys.executable, "-m", "llmprune", "prune", "--method", "wandapp", "--pattern", "2:4"]
    assert subprocess.run([*argv[:4], str(ref), *argv[4:]], capture_output=True).returncode == 0
    before = {p.relative_to(wd).as_posix(): p.read_bytes() for p in wd.rglob("*") if p.is_file()}
    proc = subprocess.Popen([*argv[:4], str(wd), *argv[4:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, killed = time.perf_counter(), False
    while proc.poll() is None and time.perf_counter() - t0 < 120:
        if any((wd / ".staging" / "model").glob("*.safetensors")):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    assert killed, "the prune ended before its shards were seen being written"
    left = {p.relative_to(wd).as_posix(): p.read_bytes() for p in wd.rglob("*") if p.is_file()
            if not p.relative_to(wd).as_posix().startswith((".staging/", ".lock"))}
    assert left == {k: v for k, v in before.items() if not k.startswith(".lock")}
    assert subprocess.run([*argv[:4], str(wd), *argv[4:]], capture_output=True).returncode == 0
    assert not (wd / ".staging").exists()
    assert _state(wd / "model").keys() == _state(ref / "model").keys()
    for name, t in _state(wd / "model").items():
        assert torch.equal(t, _state(ref / "model")[name]), name
