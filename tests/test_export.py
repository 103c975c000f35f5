"""export: a clean folder that plain transformers loads, a model card from the manifest, and the Hub upload calls."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import cli
from llmprune.workdir import hash_tree


@pytest.fixture
def pruned(calibrated, tiny_root):
    wd = calibrated("llama")
    assert cli("prune", wd, "--method", "wanda", "--pattern", "2:4")[0] == 0
    assert cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 64, "--max-windows", 2)[0] == 0
    return wd


def test_export_loads_with_plain_transformers(pruned, tmp_path):
    out = tmp_path / "out"
    code, res = cli("export", pruned, "--out", out)
    assert code == 0 and "README.md" in res["files"]
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
    (out / "stale.txt").write_text("from an older export")
    assert cli("export", pruned, "--out", out, "--overwrite")[0] == 0
    assert not (out / "stale.txt").exists() and (out / "README.md").is_file()
