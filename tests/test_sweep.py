"""sweep: every point equals its command lines run by hand; resumable (what is done is skipped, a missing row is
redone); results, CSV and plots written; a failing point is reported without stopping the others."""

import csv
import json
import shutil

import pytest
import tiny
from conftest import cli

from llmprune.cli import run
from llmprune.errors import UserError
from llmprune.steps.sweep import grid


def test_grid_names_and_bad_input():
    names = [c.name for c in grid("wanda,sparsegpt", "0.3,0.5", "2:4", "hidden:0.25")]
    assert names == ["dense", "wanda-0.3", "wanda-0.5", "wanda-2of4", "sparsegpt-0.3", "sparsegpt-0.5",
                     "sparsegpt-2of4", "hidden-0.25"]
    for args, expected in ((("wanda", None, None, None), "needs --sparsities"),
                           ((None, "0.5", None, None), "need --methods"),
                           (("wanda", "half", None, None), "is not a number"),
                           (("dress", "0.5", None, None), "--structures"),
                           ((None, None, None, "hidden"), "STRUCTURE:RATIO"),
                           ((None, None, None, "layers+mlp:0.2"), "splits a budget"),
                           ((None, None, None, "mlp@lots"), "neither a count"),
                           ((None, None, None, None), "nothing to sweep"),
                           (("wanda", "0.5,0.5", None, None), "appears twice")):
        with pytest.raises(UserError, match=expected):
            grid(*args)


def test_grid_takes_budgets_and_combinations():
    cfgs = {c.name: c for c in grid(None, None, None, "mlp:0.25,mlp@0.8,layers+mlp@90M")}
    assert list(cfgs) == ["dense", "mlp-0.25", "mlp@0.8", "layers+mlp@90M"]
    assert cfgs["layers+mlp@90M"].prune == ["--method", "dress", "--structure", "layers+mlp", "--target-params", "90M"]
    assert cfgs["mlp@0.8"].budget == "0.8" and cfgs["mlp@0.8"].ratio is None


def test_a_budget_point_equals_its_prune_by_hand(calibrated, tiny_root, tmp_path):
    """A STRUCTURE@BUDGET point is `prune --method dress --target-params` typed by hand: the same parameters and
    perplexity, the split a combination chose and the ratio a single structure resolved to in its row."""
    wd = calibrated("llama")
    ev = ["--dataset", tiny_root / "heldout.txt", "--seqlen", 32, "--max-windows", 3]
    code, res = cli("sweep", wd, "--structures", "mlp@0.85,heads+mlp@0.8", "--prompt-len", 64, "--new-tokens", 8, *ev)
    assert code == 0 and res["failed"] == []
    rows = {r["name"]: r for r in json.loads((wd / "sweep" / "results.json").read_text())}
    single, combo = rows["mlp@0.85"], rows["heads+mlp@0.8"]
    assert single["budget"] == "0.85" and 0 < single["ratio"] < 1 and single["split"] is None
    assert set(combo["split"]) == {"heads", "mlp"} and combo["ratio"] is None
    for row, frac in ((single, 0.85), (combo, 0.8)):
        assert row["parameters"] <= frac * rows["dense"]["parameters"]
    hand = tmp_path / "hand"
    shutil.copytree(wd, hand, ignore=shutil.ignore_patterns("sweep"))
    assert cli("prune", hand, "--method", "dress", "--structure", "heads+mlp", "--target-params", "0.8")[0] == 0
    code, m = cli("eval", hand, *ev)
    assert (m["parameters"], m["perplexity"]) == (combo["parameters"], combo["perplexity"])


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "paragraphs.txt"
    path.write_text("\n".join(tiny.corpus(60, seed=i) for i in range(12)) + "\n", encoding="utf-8")
    return path


def test_sweep_points_equal_hand_runs_and_resume(calibrated, tiny_root, text, tmp_path, capsys):
    wd = calibrated("llama")
    ev = ["--dataset", tiny_root / "heldout.txt", "--seqlen", 32, "--max-windows", 3,
          "--tasks", f"lastword:{text}", "--limit", 4]
    args = ["sweep", wd, "--methods", "magnitude,wanda", "--sparsities", "0.3,0.5", "--patterns", "2:4",
            "--structures", "mlp:0.25", "--prompt-len", 64, "--new-tokens", 8, *ev]
    code, res = cli(*args)
    assert code == 0 and len(res["ran"]) == 8 and res["skipped"] == [] and res["failed"] == []
    rows = {r["name"]: r for r in json.loads((wd / "sweep" / "results.json").read_text())}
    assert set(rows) == {"dense", "magnitude-0.3", "magnitude-0.5", "magnitude-2of4", "wanda-0.3", "wanda-0.5",
                         "wanda-2of4", "mlp-0.25"}
    assert rows["wanda-0.5"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert rows["mlp-0.25"]["parameters"] < rows["dense"]["parameters"] and rows["mlp-0.25"]["prefill_speedup"]
    assert rows["mlp-0.25"]["model_bytes"] < rows["dense"]["model_bytes"]  # smaller on disk, not only in count
    with open(wd / "sweep" / "results.csv", newline="") as f:
        assert {r["name"] for r in csv.DictReader(f)} == set(rows)
    for png in res["plots"]:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert {p.rsplit("/", 1)[1] for p in res["plots"]} == {"perplexity_vs_sparsity.png", "tasks_vs_sparsity.png",
                                                           "structured.png"}
    assert not (wd / "sweep" / "runs" / "wanda-0.5" / "model").exists()  # measured, then deleted
    assert json.loads((wd / "manifest.json").read_text())["steps"][-1]["command"] == "calibrate"  # untouched

    # the workdir's export shows the sweep: its table and its plots, copied beside the card
    assert cli("export", wd, "--out", tmp_path / "exp")[0] == 0
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "## Sweep" in card and "| wanda-0.5 |" in card and "](plots/perplexity_vs_sparsity.png)" in card
    assert (tmp_path / "exp" / "plots" / "structured.png").is_file()

    # a point is exactly its command lines typed by hand
    hand = tmp_path / "hand"
    shutil.copytree(wd, hand, ignore=shutil.ignore_patterns("sweep"))
    assert cli("prune", hand, "--method", "wanda", "--sparsity", 0.5)[0] == 0
    code, m = cli("eval", hand, *ev)
    assert m["perplexity"] == rows["wanda-0.5"]["perplexity"] and m["tasks_mean"] == rows["wanda-0.5"]["tasks_mean"]

    # a re-run skips everything; a row lost (a kill before it was written) is redone alone
    code, again = cli(*args)
    assert code == 0 and again["ran"] == [] and len(again["skipped"]) == 8
    kept = [r for r in json.loads((wd / "sweep" / "results.json").read_text()) if r["name"] != "wanda-2of4"]
    (wd / "sweep" / "results.json").write_text(json.dumps(kept))
    code, third = cli(*args)
    assert code == 0 and third["ran"] == ["wanda-2of4"]
    redone = {r["name"]: r for r in third["rows"]}["wanda-2of4"]
    assert redone["perplexity"] == rows["wanda-2of4"]["perplexity"]
    # other evaluation options are other points
    code, fourth = cli(*args[:-2], "--limit", 3)
    assert code == 0 and len(fourth["ran"]) == 8


def test_a_failing_point_is_reported_and_the_rest_run(calibrated, tiny_root, capsys):
    wd = calibrated("llama")
    capsys.readouterr()
    code = run(["sweep", str(wd), "--methods", "magnitude", "--patterns", "2:4,3:5", "--dataset",
                str(tiny_root / "heldout.txt"), "--seqlen", "32", "--max-windows", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "1 of 3 points failed (magnitude-3of5)" in err.replace("\n", " ")
    rows = {r["name"]: r for r in json.loads((wd / "sweep" / "results.json").read_text())}
    assert rows["magnitude-2of4"]["status"] == "done" and rows["magnitude-3of5"]["status"] == "failed"
    assert "not a multiple of 5" in rows["magnitude-3of5"]["error"]


def test_a_sweep_extended_by_a_point_plots_every_row(calibrated, tiny_root, monkeypatch):
    """A second sweep over another grid keeps the first one's rows in results.json, and its plots are drawn from all
    of them, not from the last command's points only."""
    from llmprune.steps import sweep

    wd = calibrated()
    drawn: list[list[str]] = []
    real = sweep.plot
    monkeypatch.setattr(sweep, "plot", lambda root, rows: drawn.append(sorted(r["name"] for r in rows)) or real(root, rows))
    ev = ["--dataset", tiny_root / "heldout.txt", "--max-windows", 1, "--no-speed"]
    assert cli("sweep", wd, "--methods", "magnitude", "--sparsities", "0.3", *ev)[0] == 0
    assert cli("sweep", wd, "--methods", "magnitude", "--sparsities", "0.5", *ev)[0] == 0
    rows = json.loads((wd / "sweep" / "results.json").read_text())
    assert sorted(r["name"] for r in rows) == drawn[-1] == ["dense", "magnitude-0.3", "magnitude-0.5"]
    assert (wd / "sweep" / "perplexity_vs_sparsity.png").is_file()
