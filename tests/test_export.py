"""export: a clean folder that plain transformers loads, a model card from the manifest, and the Hub upload calls."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import cli
from llmprune.fsio import hash_tree


@pytest.fixture
def pruned(calibrated, tiny_root):
    wd = calibrated("llama")
    assert cli("prune", wd, "--method", "wanda", "--pattern", "2:4")[0] == 0
    assert cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 64, "--max-windows", 2)[0] == 0
    return wd


def test_export_loads_with_plain_transformers(pruned, tmp_path):
    out = tmp_path / "out"
    code, res = cli("export", pruned, "--out", out)
    assert code == 0 and "README.md" in {f["path"] for f in res["files"]}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())
    model = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
    ref = AutoModelForCausalLM.from_pretrained(pruned / "model")
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "- pruned" in front and "- llmprune" in front
    assert "- wanda" in front
    assert "| 2 | `prune` | method=wanda" in card and "## Evaluation" in card and "50.00%" in card


def test_dry_run_lists_and_writes_nothing(pruned, tmp_path):
    out = tmp_path / "out"
    code, res = cli("export", pruned, "--out", out, "--dry-run", "--push-to-hub", "me/model")
    assert code == 0 and res["dry_run"] and not out.exists()
    paths = {f["path"] for f in res["files"]}
    assert {"config.json", "README.md"} <= paths and any(p.endswith(".safetensors") for p in paths)


def test_push_creates_the_repo_and_uploads_the_folder(pruned, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    out = tmp_path / "out"
    code, res = cli("export", pruned, "--out", out, "--push-to-hub", "me/pruned", "--private")
    assert code == 0 and res["url"] == "https://huggingface.co/me/pruned"
    assert calls[0] == ("create_repo", "me/pruned", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][0] == "upload_folder" and calls[1][2]["folder_path"] == str(out)
    # the token is never written anywhere
    for p in [*out.rglob("*"), *pruned.rglob("*")]:
        if p.is_file():
            assert b"hf_test_token" not in p.read_bytes(), p




def test_overwrite_never_replaces_the_workdir_or_a_foreign_folder(pruned, tmp_path, capsys):
    """--overwrite replaces an earlier export only: never the workdir, a folder holding it, one inside it, or a folder
    of the user's; each refusal is one line, exit 1, and changes nothing anywhere."""
    from llmprune.cli import run

    home = pruned.parent  # holds the workdir and the user's other files
    (home / "notes.txt").write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2")
    (mine / "README.md").write_text("---\ntags:\n- llmprune\n---\n")  # looks like a card, but holds a workdir
    (mine / "inner").mkdir()
    (mine / "inner" / "manifest.json").write_text("{}")
    before = hash_tree(tmp_path, tmp_path)
    cases = {pruned: "is the workdir", home: "contains the workdir", pruned / "model": "inside the workdir",
             mine: "not one", pruned / "manifest.json": "inside the workdir"}
    for out, expected in cases.items():
        for extra in (["--overwrite"], ["--overwrite", "--dry-run"]):
            capsys.readouterr()
            assert run(["export", str(pruned), "--out", str(out), *extra]) == 1, out
            err = capsys.readouterr().err.replace("\n", " ")
            assert err.startswith("error:") and expected in err and "Traceback" not in err, err
            assert hash_tree(tmp_path, tmp_path) == before, out
    # what --overwrite is for: replacing an earlier export
    out = tmp_path / "export"
    assert cli("export", pruned, "--out", out)[0] == 0
    (out / "stale.txt").write_text("the user's, added since")  # not in the card's list: never deleted
    assert cli("export", pruned, "--out", out, "--overwrite")[0] == 1 and (out / "stale.txt").is_file()
    (out / "stale.txt").unlink()
    # a file an older export wrote (the card lists it) but this one does not: replaced with the rest
    card = (out / "README.md").read_text()
    (out / "model-00002-of-00002.safetensors").write_bytes(b"older shard")
    (out / "README.md").write_text(card.replace('"config.json"', '"config.json", "model-00002-of-00002.safetensors"'))
    assert cli("export", pruned, "--out", out, "--overwrite")[0] == 0
    assert not (out / "model-00002-of-00002.safetensors").exists() and (out / "README.md").is_file()


def _front(card: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(card).data.to_dict()


def test_card_front_matter_and_no_local_paths(calibrated, tiny_root, tmp_path, capsys):
    """A local source with a card: its license is carried, base_model comes from --base-model (a warning without
    it), and no path of this machine appears anywhere in the card -- the data file is named with its SHA-256."""
    import shutil

    from llmprune.fsio import sha256_file

    src = tmp_path / "my-model"
    shutil.copytree(tiny_root / "llama", src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someone/its-parent\n---\n# A model\n")
    wd = tmp_path / "wd"
    code, _ = cli("calibrate", wd, "--model", src, "--dataset", tiny_root / "corpus.txt", "--samples", 4,
                  "--seqlen", 32)
    assert code == 0
    assert cli("prune", wd, "--method", "magnitude", "--sparsity", 0.5)[0] == 0
    assert cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 32, "--max-windows", 2)[0] == 0
    capsys.readouterr()
    code, res = cli("export", wd, "--out", tmp_path / "o1")
    assert code == 0 and any("no base_model" in w for w in res["warnings"])
    assert "no base_model" in capsys.readouterr().err
    card = (tmp_path / "o1" / "README.md").read_text()
    front = _front(card)
    # the source card's base_model names that model's parent, never the source itself
    assert front["license"] == "apache-2.0" and "base_model" not in front
    assert front["pipeline_tag"] == "text-generation" and {"pruned", "llmprune", "magnitude"} <= set(front["tags"])
    assert str(tmp_path) not in card and str(tiny_root) not in card and str(Path.home()) + "/" not in card
    assert f"corpus.txt (sha256 {sha256_file(tiny_root / 'corpus.txt')[:12]})" in card
    assert "a local folder `my-model`" in card

    code, res = cli("export", wd, "--out", tmp_path / "o2", "--base-model", "someone/my-model")
    assert code == 0 and res["warnings"] == []
    front = _front((tmp_path / "o2" / "README.md").read_text())
    assert front["base_model"] == "someone/my-model" and front["license"] == "apache-2.0"


def test_card_names_hub_datasets_and_source(tmp_path):
    """From a manifest: a Hub source gives base_model and the revision; named and hf: datasets give the card's
    datasets; a local dataset file is not a Hub dataset."""
    from llmprune.card import model_card

    step = {"params": {}, "duration_s": 1.0, "versions": {}, "metrics": {}}
    manifest = {"base_model": {"source": "org/model", "revision": "main", "commit": "abc123", "license": "mit"},
                "model_type": "llama",
                "steps": [{**step, "command": "calibrate", "params": {"dataset": "wikitext2", "model": "org/model"}},
                          {**step, "command": "recover", "params": {"dataset": "hf:someone/corpus:default:train"}},
                          {**step, "command": "eval", "params": {"dataset": "/nowhere/local.txt", "seqlen": 8},
                           "metrics": {"perplexity": 3.0, "windows": 2}}]}
    card, warnings = model_card(manifest)
    front = _front(card)
    assert warnings == [] and front["base_model"] == "org/model" and front["license"] == "mit"
    assert front["datasets"] == ["Salesforce/wikitext", "someone/corpus"]
    assert "`org/model` (revision abc123)" in card and "/nowhere" not in card and "local.txt" in card


@pytest.mark.needs("gguf")
def test_provenance_of_gguf_and_cached_snapshot(tmp_path):
    """A GGUF's general.license and general.source.* give the license and Hub id (general.base_model.* names the
    model's parents, not the model); a folder in the Hugging Face cache layout gives its Hub id."""
    import gguf
    import numpy as np

    from llmprune.provenance import hub_id_from_cache_path, of_folder, of_gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_license("gemma")
    w.add_string("general.source.url", "https://huggingface.co/google/gemma-3-270m")
    w.add_string("general.base_model.0.repo_url", "https://huggingface.co/google/its-parent")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert of_gguf(tmp_path / "m.gguf") == {"license": "gemma", "hub_id": "google/gemma-3-270m"}
    snap = tmp_path / "hub" / "models--Qwen--Qwen3-0.6B" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\nlicense:\n- apache-2.0\n---\n")
    assert hub_id_from_cache_path(snap) == "Qwen/Qwen3-0.6B"
    assert of_folder(snap) == {"license": "apache-2.0", "hub_id": "Qwen/Qwen3-0.6B"}
    assert of_folder(tmp_path) == {}


def test_card_carries_the_final_models_results_as_model_index(pruned, tmp_path, tiny_root):
    """The Hub's model-index (``ModelCardData.eval_results``) holds what the final model measured -- perplexity, and
    the speed-up with its spread -- parsed back by huggingface_hub; the license can be set; the title says pruned."""
    from huggingface_hub import ModelCard

    assert cli("eval", pruned, "--dataset", tiny_root / "heldout.txt", "--max-windows", 1, "--speed",
               "--speed-baseline", pruned, "--reps", 3, "--prompt-len", 16, "--new-tokens", 2)[0] == 0
    out = tmp_path / "out"
    code, res = cli("export", pruned, "--out", out, "--license", "apache-2.0", "--base-model", "org/base")
    assert code == 0
    card = ModelCard((out / "README.md").read_text())
    results = {r.metric_type: r for r in card.data.eval_results}
    steps = json.loads((pruned / "manifest.json").read_text())["steps"]
    last = steps[-1]["metrics"]
    assert results["perplexity"].metric_value == last["perplexity"]  # the last eval: the model as exported
    assert results["perplexity"].dataset_name.startswith("heldout.txt (sha256 ")  # a local file: name and digest
    assert results["prefill_speedup"].metric_value == last["speed"]["prefill_speedup"]
    assert "range" in results["prefill_speedup"].metric_name and "paired runs" in results["prefill_speedup"].metric_name
    assert card.data.license == "apache-2.0" and "pruned" in card.data.tags and card.data.model_name
    text = (out / "README.md").read_text()
    assert "# Pruned " in text and "## Speed" in text and "pypi.org" not in text


def test_a_workdir_never_pruned_is_not_called_pruned(calibrated, tmp_path):
    wd = calibrated("llama")
    out = tmp_path / "out"
    assert cli("export", wd, "--out", out, "--base-model", "org/base")[0] == 0
    text = (out / "README.md").read_text()
    front = _front(text)
    assert "Pruned" not in text.split("---", 2)[2].splitlines()[1:3][-1] and "pruned" not in front["tags"]
    assert "eval_results" not in front and "model-index" not in text  # nothing measured: nothing claimed


def test_a_failed_push_is_retried_without_rebuilding(pruned, tmp_path, monkeypatch):
    """The upload fails after the folder is complete; the same command again uploads that folder as it is (its
    files untouched), to the branch and as the pull request asked for."""
    import huggingface_hub

    calls, fail = [], {"n": 1}

    class FlakyApi:
        def create_repo(self, repo_id, **kw):
            return f"https://huggingface.co/{repo_id}"

        def create_branch(self, repo_id, **kw):
            calls.append(("create_branch", kw["branch"]))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["revision"], kw["create_pr"], kw["commit_message"]))
            if fail["n"]:
                fail["n"] -= 1
                raise ConnectionError("connection reset by peer")
            return type("Info", (), {"pr_url": "https://huggingface.co/me/pruned/discussions/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FlakyApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    out = tmp_path / "out"
    args = ["export", pruned, "--out", out, "--push-to-hub", "me/pruned", "--revision", "v2", "--create-pr",
            "--commit-message", "pruned 2:4"]
    assert cli(*args)[0] == 1
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, res = cli(*args)
    assert code == 0 and res["url"].endswith("/discussions/1")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps  # not rebuilt
    assert calls.count(("upload_folder", "v2", True, "pruned 2:4")) == 2 and ("create_branch", "v2") in calls
    assert cli("export", pruned, "--out", tmp_path / "o3", "--revision", "v2")[0] == 1  # needs --push-to-hub


def test_the_lineage_names_parameters_as_the_command_line_does():
    """A recorded field whose option is spelled otherwise (``lam`` is ``--lambda``, ``rank`` is ``--lora-rank``)
    appears in the card as the user would type it."""
    from llmprune.card import model_card

    step = {"duration_s": 1.0, "versions": {}, "metrics": {}}
    manifest = {"base_model": {"source": "org/model", "license": "mit"}, "model_type": "llama",
                "steps": [{**step, "command": "calibrate", "params": {"dataset": "wikitext2", "samples": 8}},
                          {**step, "command": "regularize", "params": {"structure": "mlp", "lam": 0.02}},
                          {**step, "command": "recover", "params": {"rank": 8, "alpha": 16.0}}]}
    card, _ = model_card(manifest)
    assert "lambda=0.02" in card and "lora-rank=8" in card and "lora-alpha=16.0" in card and "lam=" not in card
    assert "samples=8" in card
