"""Training on a mixture of texts (``--dataset a.txt:0.7,b.jsonl:0.3``) and evaluating on several domains in one
call (``eval --dataset A --dataset B``)."""

from __future__ import annotations

import json

import pytest
import torch
import tiny
from conftest import cli, run

from llmprune import train
from llmprune.data import Part, parse_mixture
from llmprune.errors import UserError


def test_a_mixture_names_each_source_and_its_share(tmp_path):
    assert parse_mixture("a.txt:0.7,b.jsonl:0.3") == [Part("a.txt", 0.7), Part("b.jsonl", 0.3)]
    assert [p.weight for p in parse_mixture("a.txt:3,b.txt:1")] == [0.75, 0.25]  # shares are normalised
    assert parse_mixture("wikitext2") == [Part("wikitext2", 1.0)]
    assert parse_mixture("hf:org/set:config:train") == [Part("hf:org/set:config:train", 1.0)]  # its own colons
    assert parse_mixture("hf:org/set:config:train:0.5,c.txt:0.5")[0] == Part("hf:org/set:config:train", 0.5)
    odd = tmp_path / "notes:0.5"
    odd.write_text("x")
    assert parse_mixture(str(odd)) == [Part(str(odd), 1.0)]  # a file whose name ends in a number is that file
    for bad, why in (("a.txt:0.7,b.txt", "give every source"), ("a.txt:0,b.txt:1", "positive"),
                     ("a.txt:0.5,a.txt:0.5", "appears twice"), (",b.txt:1", "give every source")):
        with pytest.raises(UserError, match=why):
            parse_mixture(bad)


def test_mixture_windows_take_each_part_in_its_share(monkeypatch):
    """Each part gives windows in its share of the largest total that repeats none of its windows; the order is
    seeded and interleaved; a single part is its own windows, untouched."""
    sizes = {"a": 300, "b": 40}

    def fake(model, tok, text, seqlen):  # window i of part P: [code of P, i]
        n = sizes[text]
        return torch.stack([torch.full((n,), ord(text)), torch.arange(n)], dim=1)

    monkeypatch.setattr(train, "text_windows", fake)
    parts = [Part("A", 0.7, "a"), Part("B", 0.3, "b")]
    w = train.mixture_windows(None, None, parts, 2, seed=0)
    counts = {chr(int(c)): int((w[:, 0] == c).sum()) for c in w[:, 0].unique()}
    # B (40 windows, 30%) bounds the total at 133: 93 of A, 40 of B
    assert counts == {"a": 93, "b": 40}
    assert len({tuple(r.tolist()) for r in w}) == w.shape[0]  # no window twice
    assert torch.equal(w, train.mixture_windows(None, None, parts, 2, seed=0))  # reproducible
    assert not torch.equal(w, train.mixture_windows(None, None, parts, 2, seed=1))
    assert set(w[-8:, 0].tolist()) == {ord("a"), ord("b")}  # the held-out tail is a sample of the mixture
    one = train.mixture_windows(None, None, [Part("A", 1.0, "a")], 2, seed=0)
    assert torch.equal(one, fake(None, None, "a", 2))


def _corpora(tiny_root, tmp_path):
    other = tmp_path / "other.jsonl"  # another text than both the calibration's and heldout.txt
    words = tiny.corpus(4000, seed=11).split()
    other.write_text("\n".join(json.dumps({"text": " ".join(words[i:i + 200])}) for i in range(0, len(words), 200)))
    return tiny_root / "corpus.txt", other


@pytest.mark.parametrize("command", ["recover", "regularize"])
def test_training_on_a_mixture_records_it(calibrated, tiny_root, tmp_path, command):
    wd = calibrated()
    a, b = _corpora(tiny_root, tmp_path)
    spec = f"{a}:0.6,{b}:0.4"
    extra = ["--structure", "mlp", "--ratio", 0.25] if command == "regularize" else []
    code, res = cli(command, wd, "--dataset", spec, "--steps", 2, "--batch-size", 4, "--holdout", 4,
                    "--eval-every", 2, "--seqlen", 32, *extra)
    assert code == 0
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["command"] == command and step["params"]["dataset"] == spec
    assert cli(command, wd, "--dataset", f"{a}:0.6,{b}", "--steps", 2, *extra)[0] == 1  # a share is missing


def test_eval_measures_several_domains_one_step_each(calibrated, tiny_root, tmp_path):
    wd = calibrated()
    a, b = _corpora(tiny_root, tmp_path)
    code, res = cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--dataset", b, "--max-windows", 2,
                    "--speed", "--reps", 1, "--prompt-len", 16, "--new-tokens", 2)
    assert code == 0 and [e["dataset"] for e in res["evaluations"]] == [str(tiny_root / "heldout.txt"), str(b)]
    evals = [s for s in json.loads((wd / "manifest.json").read_text())["steps"] if s["command"] == "eval"]
    assert [s["params"]["dataset"] for s in evals] == [str(tiny_root / "heldout.txt"), str(b)]
    assert "speed" in evals[0]["metrics"] and "speed" not in evals[1]["metrics"]  # timed once: it is the model's
    assert evals[0]["metrics"]["perplexity"] != evals[1]["metrics"]["perplexity"]
    out = tmp_path / "out"
    assert cli("export", wd, "--out", out, "--base-model", "org/base")[0] == 0
    from huggingface_hub import ModelCard

    card = ModelCard((out / "README.md").read_text())
    assert sorted(r.dataset_name.split(" ")[0] for r in card.data.eval_results if r.metric_type == "perplexity") == [
        "heldout.txt", "other.jsonl"]
    code, st = cli("status", wd)
    assert code == 0 and sum(1 for s in st["steps"] if s["command"] == "eval") == 2
    assert run(["eval", str(wd), "--dataset", str(b), "--dataset", str(b)]) == 1  # the same domain twice


def test_a_recipe_evaluates_a_list_of_datasets(calibrated, tiny_root, tmp_path):
    a, b = _corpora(tiny_root, tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[step]]\ncommand = "calibrate"\nmodel = "{tiny_root / "llama"}"\ndataset = "{a}"\n'
                      'samples = 4\nseqlen = 32\n'
                      f'[[step]]\ncommand = "eval"\ndataset = ["{tiny_root / "heldout.txt"}", "{b}"]\n'
                      'max_windows = 1\n')
    wd = tmp_path / "wd"
    code, res = cli("run", wd, "--recipe", recipe)
    assert code == 0
    steps = json.loads((wd / "manifest.json").read_text())["steps"]
    assert [s["command"] for s in steps] == ["calibrate", "eval", "eval"]
    code, res = cli("run", wd, "--recipe", recipe, "--dry-run")
    assert code == 0 and res["plan"][1]["argv"].count("--dataset") == 2
    # the entry's two eval steps count as one done entry: a re-run skips it, nothing goes back to a snapshot
    code, res = cli("run", wd, "--recipe", recipe)
    assert code == 0 and res["ran"] == [] and res["skipped"] == [1, 2]
    assert len(json.loads((wd / "manifest.json").read_text())["steps"]) == 3
