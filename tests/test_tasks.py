"""Zero-shot tasks: the built-in last-word task (its examples, its score against a plain transformers forward,
streamed equal to in memory) and lm-eval through a local task YAML, offline; bad task input as one line."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from conftest import cli
from llmprune.cli import run
from llmprune.tasks import evenly, final_words, lastword_accuracy, lastword_examples, split_tasks


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory):
    """Forty paragraphs of the tiny corpus's words, one per line, each ending in a word and a full stop."""
    path = tmp_path_factory.mktemp("lastword") / "paragraphs.txt"
    path.write_text("\n".join(tiny.corpus(60, seed=i) for i in range(40)) + "\n", encoding="utf-8")
    return path


def test_final_words_and_even_choice():
    text = "One two three.\n\nA 1999 -- 42\nends with don't!\" \nlast-word"
    assert [w for _, w in final_words(text)] == ["three", "don't", "last-word"]
    assert all(text[at:at + len(w)] == w for at, w in final_words(text))
    assert evenly(10, 3) == [0, 4, 9] and evenly(3, 5) == [0, 1, 2] and evenly(7, 1) == [3]
    assert split_tasks("lastword:a.txt, wanda-suite,boolq") == ["lastword:a.txt", "boolq", "rte", "hellaswag",
                                                               "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def test_examples_end_with_the_paragraphs_final_word(paragraphs):
    tok = tiny.tokenizer()
    text = paragraphs.read_text()
    ex = lastword_examples(tok, text, limit=12, length=48)
    assert ex.ids.shape == (12, 48) and ex.candidates == 40
    words = [w for _, w in final_words(text)]
    for row, k in zip(ex.ids, ex.target_len):
        word = tok.decode(row[-k:]).strip()
        assert word in words
        # the context is the text right before the word: decoding the whole row ends with "... word"
        assert tok.decode(row).endswith(" " + word)


def test_lastword_equals_a_plain_forward_and_streams_exactly(calibrated, paragraphs):
    """The score counts an example right exactly when the argmax of a plain transformers forward gives every
    target token; the streamed (lazy, block by block) model gives the same accuracy and NLL as in memory."""
    from llmprune.lazy import Lazy

    wd = calibrated("llama")
    tok = tiny.tokenizer()
    ex = lastword_examples(tok, paragraphs.read_text(), limit=16, length=40)
    model = AutoModelForCausalLM.from_pretrained(wd / "model").eval()
    with torch.no_grad():
        logits = model(input_ids=ex.ids).logits
    right, nll, tokens = 0, 0.0, 0
    for i, k in enumerate(ex.target_len):
        pred = logits[i, -k - 1:-1].argmax(-1)
        right += int(torch.equal(pred, ex.ids[i, -k:]))
        nll += torch.nn.functional.cross_entropy(logits[i, -k - 1:-1], ex.ids[i, -k:], reduction="sum").item()
        tokens += k
    mem = lastword_accuracy(model, ex, batch_size=3)
    assert mem["acc"] == right / 16 and mem["word_nll"] == pytest.approx(nll / tokens, rel=1e-5)
    lazy = Lazy(wd / "model")
    streamed = lastword_accuracy(lazy.model, ex, batch_size=5, weights=lazy)
    assert streamed["acc"] == mem["acc"] and streamed["word_nll"] == pytest.approx(mem["word_nll"], rel=1e-5)


def test_eval_tasks_are_recorded_shown_and_carded(calibrated, tiny_root, paragraphs, tmp_path, capsys):
    wd = calibrated("qwen3")
    code, res = cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 64, "--max-windows", 2,
                    "--tasks", f"lastword:{paragraphs}", "--limit", 10)
    assert code == 0
    task = res["tasks"][f"lastword:{paragraphs}"]
    assert task["examples"] == 10 and 0 <= task["acc"] <= 1 and res["tasks_mean"] == task["acc"]
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["params"]["tasks"] == f"lastword:{paragraphs}" and step["metrics"]["tasks"] == res["tasks"]
    capsys.readouterr()
    assert run(["status", str(wd)]) == 0
    assert "tasks mean" in capsys.readouterr().out
    assert cli("export", wd, "--out", tmp_path / "o")[0] == 0
    card = (tmp_path / "o" / "README.md").read_text()
    assert "## Zero-shot tasks" in card and "lastword:paragraphs.txt (sha256 " in card and str(paragraphs) not in card


TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow  # lm-eval itself: seconds to import and index its tasks
@pytest.mark.needs("lm_eval")
def test_lm_eval_runs_a_local_task_offline(calibrated, tiny_root, tmp_path, monkeypatch):
    """A task YAML on local data runs with the Hub unreachable; its accuracy is one of k/6 over the 6 examples."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "dscache"))
    data = tmp_path / "tiny.jsonl"
    words = tiny.WORDS
    data.write_text("".join(json.dumps({"question": f"{words[i]} {words[i + 1]}", "choices": [words[i + 2],
                                        words[i + 3]], "answer": i % 2}) + "\n" for i in range(6)))
    yaml_path = tmp_path / "tiny_choice.yaml"
    yaml_path.write_text(TASK_YAML.format(data=data))
    wd = calibrated("llama")
    code, res = cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 64, "--max-windows", 1,
                    "--tasks", yaml_path)
    assert code == 0, res
    task = res["tasks"][str(yaml_path)]
    assert task["examples"] == 6 and round(task["acc"] * 6, 6) == round(task["acc"] * 6) and 0 <= task["acc"] <= 1
    assert "acc_stderr" in task


@pytest.fixture
def offline_eval(calibrated, tiny_root, tmp_path, monkeypatch) -> list[str]:
    """An eval command on a tiny workdir, with the Hub and its datasets offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "dscache"))
    wd = calibrated("llama")
    return ["eval", str(wd), "--dataset", str(tiny_root / "heldout.txt"), "--seqlen", "64", "--max-windows", "1"]


@pytest.mark.needs("lm_eval")
def test_bad_tasks_are_one_line(offline_eval, tiny_root, tmp_path, capsys):
    base = offline_eval
    (tmp_path / "bad.yaml").write_text("just: [a list\n")
    cases = {
        "no source": (["--tasks", "lastword:"], "needs a text source"),
        "missing source": (["--tasks", f"lastword:{tmp_path / 'none.txt'}"], "does not exist"),
        "limit without tasks": (["--limit", "5"], "apply to --tasks"),
        "zero limit": (["--tasks", f"lastword:{tiny_root / 'heldout.txt'}", "--limit", "0"], "--limit must be"),
        "negative shots": (["--tasks", "boolq", "--num-fewshot", "-1"], "--num-fewshot must be"),
        "missing task file": (["--tasks", str(tmp_path / "none.yaml")], "does not exist"),
        "broken task file": (["--tasks", str(tmp_path / "bad.yaml")], "is not YAML"),
    }
    _all_one_line(cases, base, capsys)


@pytest.mark.slow  # lm-eval's task index takes seconds to build: in the slower tier
@pytest.mark.needs("lm_eval")
def test_bad_lm_eval_tasks_are_one_line(offline_eval, capsys):
    base = offline_eval
    # lm-eval is the `eval` extra, which the setup installs: these run, never skip
    _all_one_line({"unknown task": (["--tasks", "no_such_task_x"], "unknown lm-eval task(s) no_such_task_x"),
                   "Hub task offline": (["--tasks", "arc_easy", "--limit", "2"],
                                        "'arc_easy' reads its data from the Hub")}, base, capsys)


def _all_one_line(cases: dict, base: list[str], capsys) -> None:
    for name, (args, expected) in cases.items():
        capsys.readouterr()
        code = run([*base, *args])
        # a task found unreachable only after the perplexity pass follows that pass's progress lines (stderr is a log)
        err = "\n".join(ln for ln in capsys.readouterr().err.strip().splitlines() if " elapsed" not in ln)
        assert code == 1 and err.startswith("error:") and "Traceback" not in err, f"{name}: {err}"
        assert len(err.splitlines()) <= 3 and expected in err.replace("\n", " "), f"{name}: {err}"


def test_lm_eval_missing_is_one_line(calibrated, tiny_root, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    wd = calibrated("llama")
    code = run(["eval", str(wd), "--dataset", str(tiny_root / "heldout.txt"), "--seqlen", "64", "--tasks", "boolq"])
    err = capsys.readouterr().err
    assert code == 1 and "pip install 'llmprune[eval]'" in err
