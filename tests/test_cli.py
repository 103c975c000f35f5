"""The CLI end to end on tiny models, and bad input: one line and a non-zero exit, never a traceback."""

import json

import pytest
from transformers import AutoModelForCausalLM

import tiny
from conftest import cli
from llmprune.cli import run
from llmprune.fsio import hash_tree


def test_calibrate_prune_eval_status(calibrated, tiny_root, capsys):
    wd = calibrated("qwen2")
    code, dense = cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 64)
    assert code == 0 and dense["sparsity"]["all"] == 0 and dense["windows"] > 0
    assert cli("prune", wd, "--method", "sparsegpt", "--pattern", "2:4")[0] == 0
    code, pruned = cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 64, "--max-windows", 3)
    assert code == 0 and pruned["windows"] == 3 and pruned["sparsity"]["all"] == pytest.approx(0.5)
    code, st = cli("status", wd)
    assert code == 0 and [s["command"] for s in st["steps"]] == ["calibrate", "eval", "prune", "eval"]
    assert st["sparsity"]["all"] == pytest.approx(0.5) and st["parameters"] == dense["parameters"]
    # the table form prints too
    capsys.readouterr()
    assert run(["status", str(wd)]) == 0
    assert "prune" in capsys.readouterr().out


def test_calibration_is_reproducible_by_seed(tiny_root, tmp_path):
    from safetensors.torch import load_file

    def windows(name, seed):
        wd = tmp_path / name
        assert cli("calibrate", wd, "--model", tiny_root / "llama", "--dataset", tiny_root / "corpus.txt",
                   "--samples", 8, "--seqlen", 32, "--seed", seed)[0] == 0
        return load_file(wd / "calib" / "windows.safetensors")["input_ids"]

    a, b, c = windows("a", 0), windows("b", 0), windows("c", 1)
    assert a.shape == (8, 32) and (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", pytest.param(".parquet", marks=pytest.mark.needs("pyarrow"))])
def test_structured_local_sources(tiny_root, tmp_path, suffix):
    import tiny

    rows = [{"text": tiny.corpus(300, seed=i), "id": i} for i in range(10)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    code, res = cli("calibrate", tmp_path / "wd", "--model", tiny_root / "llama", "--dataset", path,
                    "--samples", 4, "--seqlen", 32)
    assert code == 0 and res["windows"] == [4, 32]


def _bad_inputs(tiny_root, tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "short.txt").write_text("the model " * 10)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x").write_text("x")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text("{}")
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    m, d = tiny_root / "llama", tiny_root / "corpus.txt"
    cal = ["calibrate", tmp_path / "new", "--model", m, "--dataset", d, "--samples", 4, "--seqlen", 32]
    text = tiny.corpus(300)
    (tmp_path / "nulls.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": None}) + "\n")
    (tmp_path / "numbers.json").write_text(json.dumps([{"text": text}, {"text": 12}]))
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    (tmp_path / "fake.parquet").write_text(text)
    (tmp_path / "a-file").write_text("x")
    with_data = [*cal[:-6], "--samples", 4, "--seqlen", 32, "--dataset"]
    _gguf(tmp_path / "rwkv.gguf", "rwkv7")
    _gguf(tmp_path / "gpt2.gguf", "gpt2")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "gpt2.gguf").read_bytes()[:30])
    (tmp_path / "text.gguf").write_text(text)
    gguf_cal = lambda f: [cal[0], cal[1], "--model", tmp_path / f, *cal[4:]]  # noqa: E731
    return {
        "GGUF architecture transformers cannot read": (gguf_cal("rwkv.gguf"),
                                                       "GGUF architecture 'rwkv7' of"),
        "GGUF of an undescribed model type": (gguf_cal("gpt2.gguf"), "model type 'gpt2' is not supported"),
        "truncated GGUF": (gguf_cal("cut.gguf"), "is not a readable GGUF file (truncated header)"),
        "text named .gguf": (gguf_cal("text.gguf"), "is not a readable GGUF file (no GGUF magic)"),
        "null text rows": ([*with_data, tmp_path / "nulls.jsonl"], "1 of 2 rows have no text in 'text' (row 1: null)"),
        "number text rows": ([*with_data, tmp_path / "numbers.json"], "(row 1: int)"),
        "binary text file": ([*with_data, tmp_path / "binary.txt"], "is not UTF-8 text"),
        "not a parquet file": ([*with_data, tmp_path / "fake.parquet"], "is not a readable parquet file"),
        "folder as dataset": ([*with_data, tmp_path / "foreign"], "is a folder"),
        "file as workdir": (["status", tmp_path / "a-file"], "is a file, not a workdir"),
        "calibrate into a file": (["calibrate", tmp_path / "a-file", *cal[2:]], "is a file"),
        "bad shard size": ([*cal, "--max-shard-size", "2gigs"], "is not a size"),
        "prompt beyond context": (["eval", "{wd}", "--dataset", d, "--speed", "--prompt-len", 100000],
                                  "longer than the model's context"),
        "missing workdir": (["status", tmp_path / "nope"], "does not exist"),
        "foreign workdir": (["status", tmp_path / "foreign"], "not an llmprune workdir"),
        "prune before calibrate": (["prune", tmp_path / "foreign"], "not an llmprune workdir"),
        "unknown method": (["prune", "{wd}", "--method", "obs"], "unknown --method 'obs'"),
        "true sequential magnitude": (["prune", "{wd}", "--method", "magnitude", "--true-sequential"],
                                      "--true-sequential applies to wanda"),
        "unknown structure": (["prune", "{wd}", "--method", "dress", "--structure", "rows"], "unknown structure"),
        "ratio leaves nothing": (["regularize", "{wd}", "--structure", "heads", "--ratio", "0.9"],
                                 "would leave no KV groups"),
        "ratio removes nothing": (["regularize", "{wd}", "--structure", "layers", "--ratio", "0.01"],
                                  "removes none of the"),
        "ratio out of range": (["prune", "{wd}", "--method", "dress", "--ratio", "1.5"], "(0, 1)"),
        "unknown selection": (["regularize", "{wd}", "--select", "best"], "unknown --select 'best'"),
        "unknown norm": (["regularize", "{wd}", "--norm", "l3"], "unknown --norm"),
        "sparsity with dress": (["prune", "{wd}", "--method", "dress", "--sparsity", "0.5"], "whole units"),
        "structure without dress": (["prune", "{wd}", "--method", "wanda", "--ratio", "0.5"], "to --method dress"),
        "holdout eats the data": (["regularize", "{wd}", "--holdout", "16", "--calibration-windows"], "leaves no training windows"),
        "OPT hidden channels": (["prune", "{opt}", "--method", "dress", "--structure", "hidden"],
                                "ties the attention width to hidden_size"),
        "unknown pattern": (["prune", "{wd}", "--pattern", "blocky"], "unknown pattern"),
        "sparsity out of range": (["prune", "{wd}", "--sparsity", "1.0"], "(0, 1)"),
        "N >= M": (["prune", "{wd}", "--pattern", "4:4"], "0 < N < M"),
        "M does not divide width": (["prune", "{wd}", "--pattern", "3:5"], "not a multiple of 5"),
        "conflicting sparsity": (["prune", "{wd}", "--pattern", "2:4", "--sparsity", "0.6"], "implies sparsity"),
        "unknown device": (["prune", "{wd}", "--device", "tpu"], "unknown --device"),
        "zero samples": ([*cal[:-4], "--samples", 0, "--seqlen", 32], "--samples must be positive"),
        "seqlen beyond context": ([*cal[:-2], "--seqlen", 4096], "longer than the model's context"),
        "seqlen beyond data": ([*cal[:-6], "--dataset", tmp_path / "short.txt", "--samples", 4, "--seqlen", 32],
                               "not enough for windows of 32"),
        "empty text file": ([*cal[:-6], "--dataset", tmp_path / "empty.txt", "--samples", 4, "--seqlen", 32],
                            "contains no text"),
        "missing data file": ([*cal[:-6], "--dataset", tmp_path / "none.txt", "--samples", 4, "--seqlen", 32],
                              "does not exist"),
        "unknown dataset": ([*cal[:-6], "--dataset", "imagenet", "--samples", 4, "--seqlen", 32], "unknown dataset"),
        "pickle weights": ([cal[0], cal[1], "--model", tmp_path / "pickle", *cal[4:]], "never loads pickle"),
        "unsupported arch": ([cal[0], cal[1], "--model", "{gpt2}", *cal[4:]], "not supported; supported:"),
        "unknown option": (["prune", "{wd}", "--sparsty", "0.5"], "No such option"),
        "export to non-empty dir": (["export", "{wd}", "--out", tmp_path / "foreign"], "not empty"),
        "push without token": (["export", "{wd}", "--out", tmp_path / "o", "--push-to-hub", "me/x"], "no Hugging Face token"),
        "recover without targets": (["recover", "{wd}", "--targets", "wq,wk"], "no Linear named wq, wk"),
        "recover steps and epochs": (["recover", "{wd}", "--steps", "3", "--epochs", "1"], "not both"),
        "recover seqlen without text": (["recover", "{wd}", "--seqlen", "32"], "--seqlen sets the windows of --dataset"),
        "recover field without text": (["recover", "{wd}", "--text-field", "body"], "give --dataset"),
        "speed baseline without speed": (["eval", "{wd}", "--dataset", d, "--speed-baseline", m], "needs --speed"),
        "bad speed batches": (["eval", "{wd}", "--dataset", d, "--speed", "--speed-batches", "1,0"],
                              "--speed-batches takes positive batch sizes"),
        "unknown export format": (["export", "{wd}", "--out", tmp_path / "o", "--format", "onnx"], "unknown --format"),
        "adapter export without adapter": (["export", "{wd}", "--out", tmp_path / "o", "--format", "peft"],
                                           "has no adapter"),
        # NaN compares false to everything and inf passes `> 0`: every numeric check must refuse both.
        "infinite RO step": (["prune", "{wd}", "--method", "wandapp", "--ro-lr", "inf"], "--ro-lr must be positive"),
        "NaN alpha": (["prune", "{wd}", "--method", "wandapp", "--alpha", "nan"], "--alpha must be >= 0"),
        "NaN damping": (["prune", "{wd}", "--method", "sparsegpt", "--damp", "nan"], "--damp must be positive"),
        "NaN sparsity": (["prune", "{wd}", "--sparsity", "nan"], "(0, 1)"),
        "NaN recover lr": (["recover", "{wd}", "--lr", "nan"], "--lr must be positive"),
        "infinite lambda": (["regularize", "{wd}", "--lambda", "inf"], "--lambda must be positive"),
        "NaN ratio": (["prune", "{wd}", "--method", "dress", "--ratio", "nan"], "(0, 1)"),
        # A step that would change nothing is not recorded as if it had pruned.
        "zero sparsity": (["prune", "{wd}", "--sparsity", "0"], "(0, 1)"),
        "zero ratio": (["prune", "{wd}", "--method", "dress", "--ratio", "0"], "(0, 1)"),
        "zero ratio to regularize": (["regularize", "{wd}", "--ratio", "0"], "(0, 1)"),
        "root as a sweep's dataset": (["sweep", "{wd}", "--methods", "magnitude", "--sparsities", "0.5", "--dataset",
                                       "/"], "is a folder"),
    }




def _gguf(path, arch: str, before: dict | None = None) -> None:
    """A GGUF holding one tensor and the metadata a config needs; ``before``: key-values written ahead of
    ``general.architecture`` (the writer puts the architecture first; a file may not)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    if before:
        arch_kv = w.kv_data[0].pop("general.architecture")
        for k, v in before.items():
            w.add_key_value(k, *v)
        w.kv_data[0]["general.architecture"] = arch_kv
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.needs("gguf")
def test_gguf_architecture_is_read_from_the_header(tmp_path):
    """The header reader skips every value type on its way to general.architecture, and agrees with the gguf
    package's full parse."""
    import gguf

    from llmprune.provenance import gguf_architecture, gguf_metadata

    T = gguf.GGUFValueType
    before = {"x.u8": (7, T.UINT8), "x.i16": (-3, T.INT16), "x.f32": (0.5, T.FLOAT32), "x.bool": (True, T.BOOL),
              "x.u64": (2**40, T.UINT64), "x.f64": (1.25, T.FLOAT64), "x.str": ("héllo", T.STRING),
              "x.ints": ([1, 2, 3], T.ARRAY, T.INT32), "x.strs": (["a", "bb", ""], T.ARRAY, T.STRING)}
    _gguf(tmp_path / "m.gguf", "qwen3", before)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert list(reader.fields).index("general.architecture") > list(reader.fields).index("x.strs")
    assert gguf_architecture(tmp_path / "m.gguf") == reader.fields["general.architecture"].contents() == "qwen3"
    meta = gguf_metadata(tmp_path / "m.gguf", prefix="x.")
    assert meta == {k: v[0] for k, v in before.items()}


@pytest.mark.needs("gguf")  # one of the bad inputs is a damaged GGUF file
def test_bad_input_is_one_line(calibrated, tiny_root, tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    import tiny

    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    wd = calibrated("llama")
    opt = calibrated("opt", samples=4, seqlen=32)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=tiny.VOCAB)).save_pretrained(gpt2)
    tiny.tokenizer().save_pretrained(gpt2)
    cases = _bad_inputs(tiny_root, tmp_path)
    sibling = tmp_path / "sibling"  # the user's files next to the workdir: never touched
    sibling.mkdir()
    (sibling / "keep.txt").write_text("mine")
    for name, (args, expected) in cases.items():
        args = [str(a).format(wd=wd, gpt2=gpt2, opt=opt) for a in args]
        before = hash_tree(tmp_path, tmp_path)
        capsys.readouterr()
        code = run(args)
        err = capsys.readouterr().err.strip()
        assert hash_tree(tmp_path, tmp_path) == before, f"{name}: files changed"
        assert code == 1, f"{name}: exit {code}: {err}"
        assert err.startswith("error:") and "Traceback" not in err, f"{name}: {err}"
        assert len(err.splitlines()) <= 2, f"{name}: {err}"  # one line, soft-wrapped at most once by rich
        if expected:
            assert expected in err.replace("\n", " "), f"{name}: {err}"
    assert all(expected for _, expected in cases.values())  # each case names the refusal it expects


def test_offline_hub_dataset_fails_with_advice(calibrated, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "dscache"))
    wd = calibrated("llama")
    for src in ("wikitext2", "hf:someone/corpus:default:train"):
        capsys.readouterr()
        assert run(["eval", str(wd), "--dataset", src]) == 1
        err = capsys.readouterr().err.replace("\n", " ")
        assert f"'{src}'" in err and "pass a local file" in err


def test_debug_shows_the_traceback(monkeypatch, tmp_path):
    from llmprune.errors import UserError

    monkeypatch.setenv("LLMPRUNE_DEBUG", "1")
    with pytest.raises(UserError):
        run(["status", str(tmp_path / "nope")])


def test_help_lists_every_subcommand(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("calibrate", "regularize", "prune", "recover", "eval", "export", "status", "run"):
        assert cmd in out
    assert run(["-h"]) == 0 and capsys.readouterr().out == out  # -h is --help, for the app and every command
    assert run(["prune", "-h"]) == 0 and "--method" in capsys.readouterr().out


def test_version_names_llmprune_torch_and_transformers(capsys):
    import torch

    import llmprune

    assert run(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"llmprune {llmprune.__version__}") and torch.__version__ in out


def test_python_dash_m_works(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "llmprune", "status", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


@pytest.mark.parametrize("error", ["cuda", "host"])
def test_out_of_memory_is_one_line_with_advice_and_loses_nothing(calibrated, tmp_path, capsys, monkeypatch, error):
    import torch

    wd = calibrated("llama")
    before = (wd / "manifest.json").read_bytes()

    def exhausted(*args, **kwargs):
        if error == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total)")
        raise MemoryError()

    monkeypatch.setattr("llmprune.pruning.prune_model", exhausted)
    capsys.readouterr()
    assert run(["prune", str(wd), "--method", "wanda"]) == 2  # a step that failed, not bad input
    err = capsys.readouterr().err.strip()
    err = err[err.index("error: "):]  # after the memory estimate's line
    assert err.startswith("error: out of") and "Traceback" not in err and len(err.splitlines()) <= 2
    assert "--batch-size" in err.replace("\n", " ") and "left as it was" in err.replace("\n", " ")
    assert (wd / "manifest.json").read_bytes() == before and not (wd / ".staging").exists()
    monkeypatch.undo()
    assert run(["prune", str(wd), "--method", "wanda"]) == 0  # and the step runs once memory allows


def test_prune_takes_exactly_the_registered_methods_options(capsys):
    """prune's options are its own plus every registered method's, read from the declarations: adding a method
    adds its options, with their help, and nothing else has to change."""
    import typer.main

    from llmprune.cli.app import app
    from llmprune.methods import METHODS
    from llmprune.options import specs as option_specs

    declared = {o.name for m in METHODS.values() for o in option_specs(m.Options)}
    general = {"method", "sparsity", "pattern", "true_sequential", "device", "act_dtype", "batch_size", "memory_check",
               "owl_lambda", "owl_m"}
    opts = {p.name for p in typer.main.get_command(app).commands["prune"].params} - {"workdir", "as_json"}
    assert opts == declared | general
    assert run(["prune", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for m in METHODS.values():
        assert m.name in out
        for o in option_specs(m.Options):
            assert o.flag in out


def test_a_recipe_refuses_another_methods_option_before_running(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[step]]\ncommand = "calibrate"\nmodel = "x"\ndataset = "y"\n\n'
                      '[[step]]\ncommand = "prune"\nmethod = "wanda"\nblocksize = 64\n')
    capsys.readouterr()
    assert run(["run", str(tmp_path / "wd"), "--recipe", str(recipe)]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    assert "recipe step 2 (prune)" in err and "it belongs to --method sparsegpt" in err
    assert not (tmp_path / "wd").exists()


def test_markup_in_user_text_prints_as_typed(tiny_root, tmp_path, capsys):
    """Paths and values with rich markup in them are the user's text: printed verbatim, never a crash."""
    wd = tmp_path / "[bold]w[/x]d"
    capsys.readouterr()
    assert run(["calibrate", str(wd), "--model", str(tiny_root / "llama"), "--dataset", str(tiny_root / "corpus.txt"),
                "--samples", "4", "--seqlen", "32"]) == 0
    out = capsys.readouterr().out
    assert str(wd) in " ".join(out.split()) or "[bold]w[/x]d" in out
    assert run(["status", str(wd)]) == 0
    assert "[bold]w[/x]d" in capsys.readouterr().out
    missing = tmp_path / "[red]nope[/]"
    assert run(["status", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "[red]nope[/]" in err and "Traceback" not in err
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[step]]\ncommand = "calibrate"\nmodel = "{tiny_root / "llama"}"\n'
                      f'dataset = "{tiny_root / "corpus.txt"}"\nsamples = 4\nseqlen = 32\n'
                      '[[step]]\ncommand = "eval"\ndataset = "[/bold]' + str(tiny_root / "heldout.txt") + '"\n')
    assert run(["run", str(tmp_path / "[i]r"), "--recipe", str(recipe)]) == 1  # no such file: one line, as typed
    err = capsys.readouterr().err
    assert "step 2/2" in err and "[/bold]" in err and "Traceback" not in err


def test_non_finite_weights_are_never_committed(calibrated, tiny_root, tmp_path, capsys, monkeypatch):
    """A step that produces NaN/inf weights fails before its commit (exit 2, the workdir as it was); a source model
    that holds them is refused (exit 1); and JSON output has no bare NaN."""
    import torch

    from llmprune.methods.magnitude import Magnitude

    wd = calibrated("llama")
    before = (wd / "manifest.json").read_bytes()
    real = Magnitude.prune_block

    def poisoned(self, ctx):
        real(self, ctx)
        next(iter(ctx.linears.values())).weight.data[0, 0] = float("inf")

    monkeypatch.setattr(Magnitude, "prune_block", poisoned)
    capsys.readouterr()
    assert run(["prune", str(wd), "--method", "magnitude"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "NaN or infinite weights" in err and "nothing was committed" in err and "Traceback" not in err
    assert (wd / "manifest.json").read_bytes() == before
    monkeypatch.undo()

    src = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[1, 2] = float("nan")
    model.save_pretrained(src)
    tiny.tokenizer().save_pretrained(src)
    capsys.readouterr()
    assert run(["calibrate", str(tmp_path / "w2"), "--model", str(src), "--dataset", str(tiny_root / "corpus.txt"),
                "--samples", "4", "--seqlen", "32"]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    assert "holds 1 NaN or infinite weights" in err and "model.layers.0.mlp.up_proj.weight" in err


def test_json_output_is_strict_json(capsys):
    from llmprune import __version__, report

    report.emit_json({"ppl": float("inf"), "gap": float("nan"), "ok": [1.5, float("-inf")]})
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON"))
    assert doc == {"llmprune_version": __version__, "ppl": None, "gap": None, "ok": [1.5, None]}


@pytest.mark.parametrize("damage", ["missing tensor", "more layers in the config", "unexpected tensor", "wrong shape"])
def test_weights_that_do_not_cover_the_config_are_refused(tiny_root, tmp_path, capsys, damage):
    """transformers fills what a checkpoint lacks with random values and only logs it: a source whose shards do not
    match its config.json is one error line naming the tensors (exit 1), and so is nothing calibrated from it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_root / "llama", src)
    shard = next(src.glob("*.safetensors"))
    sd = load_file(shard)
    name = "model.layers.1.mlp.up_proj.weight"
    if damage == "missing tensor":
        del sd[name]
    elif damage == "unexpected tensor":
        sd["model.layers.1.mlp.extra.weight"] = torch.zeros(2, 2)
    elif damage == "wrong shape":
        sd[name] = torch.zeros(sd[name].shape[0], sd[name].shape[1] + 1)
    save_file(sd, shard, metadata={"format": "pt"})
    if damage == "more layers in the config":
        cfg = json.loads((src / "config.json").read_text())
        cfg["num_hidden_layers"] += 1
        (src / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    wd = tmp_path / "wd"
    assert run(["calibrate", str(wd), "--model", str(src), "--dataset", str(tiny_root / "corpus.txt"),
                "--samples", "4", "--seqlen", "32"]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    assert "Traceback" not in err, err
    if damage == "more layers in the config":  # refused on the tensor names, before a skeleton is built
        assert "names 3 blocks but its weights hold blocks 0..1" in err, err
    else:
        assert "does not match its config.json" in err and "model.layers.1.mlp." in err, err
    assert not (wd / "manifest.json").exists()


def test_a_workdir_whose_config_no_longer_matches_is_an_integrity_error(calibrated, capsys):
    wd = calibrated("llama")
    cfg_path = wd / "model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] += 1
    cfg_path.write_text(json.dumps(cfg))
    before = (wd / "manifest.json").read_bytes()
    capsys.readouterr()
    assert run(["prune", str(wd)]) == 4  # the hash check sees the edit first
    assert run(["--no-verify", "prune", str(wd)]) == 4  # and without it, the loader does
    err = capsys.readouterr().err.replace("\n", " ")
    assert "does not describe these weights" in err and "Traceback" not in err
    assert (wd / "manifest.json").read_bytes() == before


def test_smaller_refusals(calibrated, tiny_root, tmp_path, capsys, monkeypatch):
    """Sparser than asked, a bad repo id, more windows than the text holds, a failed first calibrate's folder."""
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_x")
    wd = calibrated("llama")
    assert cli("prune", wd, "--sparsity", 0.5)[0] == 0
    cases = [
        (["prune", str(wd), "--sparsity", "0.3"], "already 50.0% sparse"),
        (["export", str(wd), "--out", str(tmp_path / "o"), "--push-to-hub", "not a repo"], "is not a Hub repo id"),
        (["calibrate", str(tmp_path / "new"), "--model", str(tiny_root / "llama"), "--dataset",
          str(tiny_root / "heldout.txt"), "--samples", "100000", "--seqlen", "32"], "distinct windows"),
        (["calibrate", str(tmp_path / "new"), "--model", str(tiny_root / "llama"), "--dataset",
          str(tiny_root / "heldout.txt"), "--samples", str(10**12), "--seqlen", "32"], "GiB for the token ids"),
    ]
    for args, expected in cases:
        capsys.readouterr()
        assert run(args) == 1, args
        err = capsys.readouterr().err.replace("\n", " ")
        assert expected in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "new").exists()  # nothing written, no empty folder


def test_sigterm_unwinds_like_ctrl_c(calibrated, monkeypatch, capsys):
    import os
    import signal

    from llmprune.methods.magnitude import Magnitude

    wd = calibrated("llama")
    before = (wd / "manifest.json").read_bytes()
    monkeypatch.setattr(Magnitude, "prune_block", lambda self, ctx: os.kill(os.getpid(), signal.SIGTERM))
    capsys.readouterr()
    assert run(["prune", str(wd), "--method", "magnitude"]) == 143
    assert "terminated" in capsys.readouterr().err
    assert (wd / "manifest.json").read_bytes() == before and not (wd / ".staging").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the caller's again


def test_dtype_names_take_their_aliases_and_are_recorded_canonically(calibrated, tiny_root, tmp_path, capsys):
    """``bf16``/``fp32``/``half`` are the names people type: accepted wherever a dtype is, recorded as ``bfloat16``
    etc. (a recipe's fingerprint does not depend on the spelling); anything else is one line, exit 1."""
    from llmprune import precision

    assert precision.canonical("BF16") == "bfloat16" and precision.canonical("half") == "float16"
    assert precision.canonical("auto", auto=True) == "auto"
    code, res = cli("calibrate", tmp_path / "wd", "--model", tiny_root / "llama", "--dataset",
                    tiny_root / "corpus.txt", "--samples", 4, "--seqlen", 32, "--dtype", "bf16")
    assert code == 0
    m = json.loads((tmp_path / "wd" / "manifest.json").read_text())
    assert m["steps"][0]["params"]["dtype"] == "bfloat16"
    wd = calibrated("llama")
    assert cli("prune", wd, "--method", "wanda", "--act-dtype", "fp32")[0] == 0
    assert json.loads((wd / "manifest.json").read_text())["steps"][-1]["params"]["act_dtype"] == "float32"
    capsys.readouterr()
    assert run(["prune", str(wd), "--act-dtype", "bf17"]) == 1
    assert "unknown --act-dtype 'bf17'" in capsys.readouterr().err


def test_the_step_table_is_what_every_reader_uses():
    """One list of the workdir's steps (``llmprune.steps``): the CLI has a command for each, the recipe loader takes
    exactly them in their order, and a manifest may record exactly those that record."""
    import typer.main

    from llmprune import manifest
    from llmprune.cli.app import app
    from llmprune.steps import KINDS, RECORDED, recipe
    from llmprune.steps.registry import STEPS

    assert list(STEPS) == list(KINDS) and all(s.kind is KINDS[n] for n, s in STEPS.items())
    assert set(STEPS) <= set(typer.main.get_command(app).commands)
    assert recipe.STEP_COMMANDS == tuple(STEPS) and set(recipe.NOT_RECORDED) == set(STEPS) - RECORDED
    assert [n for n, _ in sorted(recipe.RANK.items(), key=lambda kv: kv[1])] == [
        n for n in STEPS if KINDS[n].order is not None]
    assert manifest.RECORDED == RECORDED == {"calibrate", "regularize", "prune", "recover", "eval"}
