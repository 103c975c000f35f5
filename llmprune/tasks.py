"""Zero-shot tasks for ``eval --tasks``: the built-in last-word task, and lm-eval's tasks through its Python API.

Last-word prediction (``lastword:SRC``) is LAMBADA's protocol (Paperno et al. 2016, arXiv 1606.06031) built from any
local or Hub text: the final word of a paragraph is predicted from the text before it, and an example counts as
right only when greedy decoding yields every token of that word (as lm-eval scores ``lambada_openai``). It needs
no Hub, so it runs offline and in the tests; it runs through the block-by-block engine like perplexity, so a model
larger than memory is evaluated one block at a time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune import engine
from llmprune.head import Head
from llmprune.errors import UserError

LASTWORD = "lastword:"
# Tokens of context before the target word: LAMBADA's passages average about 80 words (4.6 sentences).
LASTWORD_CONTEXT = 128
MAX_WORD_TOKENS = 16
LASTWORD_LIMIT = 500  # examples when --limit is not given: stderr of an accuracy near 0.3 is then about 0.02
# A paragraph's final word: letters (inner apostrophes and hyphens allowed), then only punctuation and spaces.
_FINAL_WORD = re.compile(r"(?<![\w@'-])([A-Za-z][A-Za-z'-]*[A-Za-z])[^\w]*$")
SUITES = {
    # Wanda (Sun et al. 2023, ICLR 2024) and SparseGPT report these seven; LLM-Pruner and FLAP add piqa.
    "wanda-suite": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"],
    "llm-pruner-suite": ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"],
}


@dataclass(frozen=True)
class Examples:
    """Equal-length token sequences, each ending with its target word's ``target_len[i]`` tokens."""

    ids: torch.Tensor  # [N, length]: context, then the target word
    target_len: list[int]
    candidates: int  # paragraphs with a final word, before the evenly spaced choice


def split_tasks(spec: str | None) -> list[str]:
    """``--tasks`` as a list: comma-separated, suites expanded, order kept, duplicates dropped."""
    out: list[str] = []
    for name in (t.strip() for t in (spec or "").split(",")):
        for task in SUITES.get(name, [name] if name else []):
            if task not in out:
                out.append(task)
    return out


def final_words(text: str) -> list[tuple[int, str]]:
    """``(offset of the word in text, word)`` for every paragraph (line) that ends in a word."""
    out, offset = [], 0
    for line in text.split("\n"):
        m = _FINAL_WORD.search(line)
        if m:
            out.append((offset + m.start(1), m.group(1)))
        offset += len(line) + 1
    return out


def evenly(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return [round(i * (n - 1) / (k - 1)) for i in range(k)] if k > 1 else [n // 2]


def lastword_examples(tokenizer, text: str, limit: int, length: int = LASTWORD_CONTEXT) -> Examples:
    """The task's examples from ``text``: ``limit`` paragraphs spread over it, each as ``length`` tokens that end
    with its final word (the context is what precedes the word, cut to fit). The word's tokens are what the
    tokenizer makes of context + " " + word past the context's own tokens, so a tokenizer that merges across the
    boundary cannot score a different string; a paragraph where it does, whose word is longer than
    ``MAX_WORD_TOKENS`` or that has too little text before it, is skipped. One length for all lets the engine batch
    them with no padding."""
    words = final_words(text)
    seqs, lens = [], []
    # Try more candidates than asked, spread the same way, so a skipped one is replaced near its place.
    for idx in evenly(len(words), min(len(words), 2 * limit)):
        if len(seqs) == limit:
            break
        at, word = words[idx]
        before = text[max(0, at - 16 * length):at].rstrip()  # 16 characters a token is ample
        ctx = tokenizer(before, add_special_tokens=False).input_ids
        whole = tokenizer(before + " " + word, add_special_tokens=False).input_ids
        k = len(whole) - len(ctx)
        if whole[:len(ctx)] != ctx or not 0 < k <= MAX_WORD_TOKENS or len(ctx) < length - k:
            continue
        seqs.append(ctx[len(ctx) - (length - k):] + whole[len(ctx):])
        lens.append(k)
    if not seqs:
        raise UserError(f"the last-word task found no paragraph ending in a word after {length} tokens of text")
    return Examples(torch.tensor(seqs, dtype=torch.long), lens, len(words))


@torch.no_grad()
def lastword_accuracy(model: nn.Module, ex: Examples, device: str = "cpu", batch_size: int = 4,
                      weights=None) -> dict[str, Any]:
    """Accuracy (every target token the greedy choice) and the target words' mean NLL per token."""
    ids = ex.ids
    acts = engine.capture(model, ids, batch_size, device, weights=weights)
    outs = engine.stream(model, acts, device, "last word", weights=weights)
    width = ids.shape[1]
    # The positions that predict each example's target tokens, gathered over all examples: the head (a 262k-row
    # matrix read in slices for a lazy model) then runs once, not once per example.
    at, start = [], 0
    for h in outs.hidden:
        for j in range(h.shape[0]):
            k = ex.target_len[start + j]
            at.append(h[j, width - k - 1:width - 1])
        start += h.shape[0]
    targets = torch.cat([ids[i, width - k:] for i, k in enumerate(ex.target_len)])
    with Head(model, device, weights) as head:
        hidden = torch.cat(at)
        pred = head.argmax(hidden).cpu()
        nll = head.nll(hidden, targets)
    tokens = targets.numel()
    right, pos = 0, 0
    for k in ex.target_len:
        right += int(torch.equal(pred[pos:pos + k], targets[pos:pos + k]))
        pos += k
    n = ids.shape[0]
    acc = right / n
    return {"acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan"),
            "word_nll": nll / tokens, "examples": n, "candidates": ex.candidates}


# What an unreachable Hub looks like from inside datasets / huggingface_hub / requests, by exception class name
# (the classes live in packages that may not all be importable) and by message.
_OFFLINE_TYPES = {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
                  "ConnectTimeout", "ReadTimeout", "MaxRetryError", "NameResolutionError", "HfHubHTTPError"}
_OFFLINE_TEXT = re.compile(r"offline|couldn't reach|could not reach|connection|resolve|network|timed out", re.I)


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval tasks need lm-eval: pip install 'llmprune[eval]' (or pass only lastword:SRC "
                        "tasks, which are built in)") from None
    return lm_eval, TaskManager


def lm_eval_plan(tasks: list[str]) -> tuple[Any, list[tuple[str, str]]]:
    """Check lm-eval tasks before anything runs: a task YAML file given by path is included (its ``task`` name is
    used), every name must be one lm-eval knows. Returns the task manager and ``(as given, lm-eval name)`` pairs."""
    import yaml

    _, TaskManager = _lm_eval()
    include, pairs = [], []
    for t in tasks:
        path = Path(t)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise UserError(f"task file {t} does not exist")
            try:
                cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise UserError(f"task file {t} is not YAML: {str(e).splitlines()[0][:200]}") from None
            name = cfg.get("task") if isinstance(cfg, dict) else None
            if not isinstance(name, str):
                raise UserError(f"task file {t} has no `task:` name")
            include.append(str(path.parent.resolve()))
            pairs.append((t, name))
        else:
            pairs.append((t, t))
    manager = TaskManager(include_path=sorted(set(include)) or None)
    unknown = [given for given, name in pairs if name not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}: use lm-eval's task names (`lm-eval ls "
                        "tasks`), a task YAML file, lastword:SRC, or a suite (" + ", ".join(SUITES) + ")")
    return manager, pairs


def _offline(e: BaseException) -> bool:
    seen = e
    while seen is not None:
        if type(seen).__name__ in _OFFLINE_TYPES or _OFFLINE_TEXT.search(str(seen) or ""):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_lm_eval(model: nn.Module, tokenizer, manager, pairs: list[tuple[str, str]], limit: int | None,
                num_fewshot: int | None, batch_size: int) -> dict[str, dict[str, float]]:
    """Each task through ``lm_eval.simple_evaluate`` with an ``HFLM`` around the model in memory; per task its
    metrics (``acc``, ``acc_stderr``, ``acc_norm``, ...). One task at a time, so a failure names its task."""
    import logging

    lm_eval, _ = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out: dict[str, dict[str, float]] = {}
    for given, name in pairs:
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                          verbosity="ERROR")
        except UserError:
            raise
        except Exception as e:  # lm-eval and datasets raise many types; the two we can explain are named
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if _offline(e):
                raise UserError(f"lm-eval task '{given}' reads its data from the Hub, which cannot be reached "
                                f"({first}); point lm-eval at local data: a task YAML with `dataset_path: json` and "
                                "`dataset_kwargs: {data_files: ...}`, passed to --tasks by its path") from None
            raise UserError(f"lm-eval task '{given}' failed: {first}") from None
        metrics = {}
        for key, value in (res or {}).get("results", {}).get(name, {}).items():
            metric, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and metric != "alias":
                metrics[metric] = float(value)
        metrics["examples"] = float((res or {}).get("n-samples", {}).get(name, {}).get("effective", 0))
        out[given] = metrics
    return out


def primary(metrics: dict[str, float]) -> float | None:
    """The number a table shows for a task: accuracy when the task has one."""
    for key in ("acc", "acc_norm", "exact_match"):
        if key in metrics:
            return metrics[key]
    return next((v for k, v in metrics.items() if not k.endswith("_stderr") and k != "examples"), None)
