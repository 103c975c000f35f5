"""What a release engineer meets in a CI job: progress in a log, defaults that fit the model, global options
anywhere, a JSON document for errors, a branch to compare alternatives, speed figures with their spread."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout

from conftest import cli, run

from llmprune import evaluate, report

LINE = re.compile(r"^(.+): (\d+)/(\d+)(?: \(\d+%\))? · (\S+) elapsed")


def _steps(wd):
    return json.loads((wd / "manifest.json").read_text())["steps"]


def test_progress_reaches_a_log_as_lines(calibrated, capsys):
    """stderr captured by pytest is not a terminal, as in CI: a long loop prints lines with counts and times, and
    the last reaches its total."""
    wd = calibrated()
    capsys.readouterr()
    assert run(["prune", str(wd), "--method", "wanda", "--sparsity", "0.5"]) == 0
    lines = [m for m in map(LINE.match, capsys.readouterr().err.splitlines()) if m]
    assert lines, "no progress line in a non-terminal stderr"
    tasks: dict[str, list[tuple[int, int]]] = {}
    for m in lines:
        tasks.setdefault(m.group(1), []).append((int(m.group(2)), int(m.group(3))))
    for name, seen in tasks.items():
        assert seen[0][0] == 0, f"{name}: no line where it starts"
        assert seen[-1][0] == seen[-1][1], f"{name}: no line where it ends ({seen})"
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_progress_lines_are_rare_on_a_long_loop(monkeypatch, capsys):
    """At most one line per tenth of the loop (and the start), whatever the loop's length."""
    with report.progress("blocks", 1000) as advance:
        for _ in range(1000):
            advance()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("blocks:")]
    assert 10 <= len(lines) <= 12 and lines[-1].startswith("blocks: 1000/1000 (100%)")


def test_json_progress_is_json_lines_anywhere_on_the_line(calibrated, capsys):
    """--json-progress after the subcommand, as a CI job's wrapper would append it: every stderr line is a JSON
    event, progress events count up to their total."""
    wd = calibrated()
    capsys.readouterr()
    assert run(["prune", str(wd), "--method", "magnitude", "--sparsity", "0.5", "--json-progress"]) == 0
    events = [json.loads(ln) for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and all({"task", "done", "total", "elapsed_s", "eta_s"} <= e.keys() for e in progress)
    assert progress[-1]["done"] == progress[-1]["total"]
    report.set_json_progress(False)


def test_global_options_after_the_subcommand(calibrated):
    wd = calibrated()
    assert cli("prune", wd, "--method", "magnitude", "--sparsity", "0.3", "--no-verify")[0] == 0
    assert _steps(wd)[-1]["inputs_verified"] is False


def test_device_auto_is_the_default_and_recorded_resolved(calibrated):
    wd = calibrated()
    assert cli("prune", wd, "--method", "magnitude", "--sparsity", "0.3")[0] == 0
    assert cli("prune", wd, "--method", "magnitude", "--sparsity", "0.5", "--device", "auto")[0] == 0
    assert [s["params"]["device"] for s in _steps(wd)[1:]] == ["cpu", "cpu"]  # this machine has no CUDA device


def test_window_length_defaults_to_the_models_context(tiny_root, tmp_path):
    """A 256-token model (the tiny ones) calibrates with 256-token windows when --seqlen is not given, and eval
    measures with the calibration's windows."""
    wd = tmp_path / "wd"
    code, res = cli("calibrate", wd, "--model", tiny_root / "llama", "--dataset", tiny_root / "corpus.txt",
                    "--samples", 8)
    assert code == 0 and res["windows"] == [8, 256]
    steps = _steps(wd)
    assert steps[0]["params"]["seqlen"] == 256
    code, res = cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--max-windows", 2)
    assert code == 0 and res["seqlen"] == 256 and _steps(wd)[-1]["params"]["seqlen"] == 256
    # the same calibrate again says it already ran with these options (the default resolved the same way)
    code, _ = cli("calibrate", wd, "--model", tiny_root / "llama", "--dataset", tiny_root / "corpus.txt",
                  "--samples", 8)
    assert code == 1


def test_an_error_is_a_json_document_with_json(tmp_path, capsys):
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = run(["prune", str(tmp_path / "missing"), "--json"])
    doc = json.loads(buf.getvalue())
    assert code == 1 and doc["exit_code"] == 1 and "missing" in doc["error"] and doc["llmprune_version"]
    assert capsys.readouterr().err.startswith("error:")  # the one line on stderr as always


def test_every_json_document_carries_the_version(calibrated):
    code, res = cli("status", calibrated())
    assert code == 0 and res["llmprune_version"]


def test_a_second_prune_says_it_stacks_and_a_branch_keeps_the_original(calibrated, tmp_path, capsys):
    wd = calibrated()
    assert cli("prune", wd, "--method", "magnitude", "--sparsity", "0.3")[0] == 0
    before = (wd / "manifest.json").read_text()
    code, res = cli("branch", wd, tmp_path / "alt")
    assert code == 0 and res["steps"] == 2
    capsys.readouterr()
    assert cli("prune", tmp_path / "alt", "--method", "wanda", "--pattern", "3:4")[0] == 0
    assert "pruned before (step 2: magnitude" in capsys.readouterr().err
    assert (wd / "manifest.json").read_text() == before  # the branch's prune left the original alone
    assert len(_steps(tmp_path / "alt")) == 3
    assert cli("branch", wd, tmp_path / "alt")[0] == 1  # a branch is a new folder


def test_lora_options_have_distinct_names_and_keep_the_old_ones(calibrated):
    wd = calibrated()
    fast = ["--steps", 2, "--holdout", 4, "--batch-size", 4, "--eval-every", 2]
    assert cli("recover", wd, "--lora-alpha", 8, "--lora-rank", 4, "--no-merge", *fast)[0] == 0
    assert cli("recover", wd, "--alpha", 4, "--rank", 2, *fast)[0] == 0  # the earlier spelling
    params = [s["params"] for s in _steps(wd) if s["command"] == "recover"]
    assert [(p["rank"], p["alpha"]) for p in params] == [(4, 8.0), (2, 4.0)]


def test_speed_is_a_median_with_its_spread_and_a_verdict(calibrated):
    wd = calibrated()
    code, res = cli("eval", wd, "--max-windows", 1, "--speed", "--speed-baseline", wd, "--reps", 3,
                    "--prompt-len", 32, "--new-tokens", 4, "--dataset", wd.parent / ".." / "x")
    assert code != 0  # a dataset that is not there is refused before any timing
    code, res = cli("eval", wd, "--max-windows", 1, "--speed", "--speed-baseline", wd, "--reps", 3,
                    "--prompt-len", 32, "--new-tokens", 4, "--dataset", _corpus(wd))
    sp = res["speed"]
    assert code == 0 and sp["reps"] == 3
    for phase in ("prefill", "decode"):
        lo, hi = sp[f"{phase}_tokens_per_s_range"]
        assert lo <= sp[f"{phase}_tokens_per_s"] <= hi
        lo, hi = sp[f"{phase}_speedup_range"]
        assert lo <= sp[f"{phase}_speedup"] <= hi
        assert sp[f"{phase}_speedup_verdict"] in ("faster", "slower", "within noise")


def _corpus(wd):
    return json.loads((wd / "manifest.json").read_text())["calibration"]["source"]


def test_a_speed_up_is_within_noise_unless_the_middle_half_clears_one():
    assert evaluate.verdict([1.2, 1.3, 1.25, 1.22, 1.4]) == "faster"
    assert evaluate.verdict([0.7, 0.8, 0.75, 0.77, 0.9]) == "slower"
    assert evaluate.verdict([0.9, 1.1, 1.0, 0.95, 1.3]) == "within noise"
    assert evaluate.quartiles([4, 1, 3, 2, 5]) == (2, 3, 4)
