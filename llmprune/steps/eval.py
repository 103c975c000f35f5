"""The ``eval`` step: measure the workdir's model (``llmprune.evaluate``, ``llmprune.tasks``) and record it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from llmprune import data, engine, gguf_eval
from llmprune import tasks as _tasks
from llmprune.current import load_current, open_current
from llmprune.errors import UserError
from llmprune.evaluate import (SPEED_REPS, available_memory, block_zeros, model_bytes, parse_batches, perplexity, speed_against,
                               speed_memory, summary)
from llmprune.gguf_write import gguf_type_option
from llmprune.modeling import check_context
from llmprune.options import (batch_option, check_all, check_device, device_option, option, positive,
                              text_field_option)
from llmprune.steps import KINDS
from llmprune.steps.base import Step
from llmprune.workdir import Workdir

SPEED, TASKS, BACKEND = "Speed", "Zero-shot tasks", "Backend"
BACKENDS = ("transformers", "llama.cpp")


@dataclass(frozen=True)
class EvalOptions:
    """What ``llmprune eval`` was asked for; recorded as the step's parameters, in this order."""

    dataset: Optional[list[str]] = option(None, "Evaluation source (default: the test split of the calibration "
                                          "dataset); repeat it for several domains, each recorded as an eval step of "
                                          "its own.")
    seqlen: Optional[int] = option(None, "Tokens per window (default: the calibration's).", check=positive,
                                   show_default=False)
    max_windows: Optional[int] = option(None, "Evaluate at most this many windows.")
    text_field: str = text_field_option()
    device: str = device_option()
    batch_size: int = batch_option()
    speed: bool = option(False, "Also measure prefill and decode tokens/s (batch 1).", panel=SPEED)
    speed_baseline: Optional[str] = option(None, "With --speed: also time this workdir or HF folder in the same run, "
                                           "and report the ratios.", panel=SPEED)
    prompt_len: int = option(512, "With --speed: prompt tokens of the prefill.", check=positive, panel=SPEED)
    new_tokens: int = option(64, "With --speed: tokens decoded through the KV cache.", check=positive, panel=SPEED)
    reps: int = option(SPEED_REPS, "With --speed: timed repetitions of each model after a warm-up (alternating with "
                       "--speed-baseline's); the median is reported with the range, and each speed-up with a verdict "
                       "(faster, slower, within noise).", check=positive, panel=SPEED)
    speed_batches: str = option("1", "With --speed: batch sizes to time, comma-separated (1,8); batch 1's figures "
                                "keep their plain names, batch b's end in _bB.", panel=SPEED)
    backend: str = option("transformers", "What runs the model: transformers (block by block, on --device), or "
                          "llama.cpp (a GGUF file of the model, on the CPU; needs llmprune\\[gguf]): its perplexity "
                          "on the same token windows, and with --speed its own prefill and decode rates.",
                          choices=BACKENDS, panel=BACKEND)
    gguf: Optional[str] = option(None, "--backend llama.cpp: the GGUF file to judge, written by `export --format gguf` "
                                 "from this workdir's current model (default: the model converted at --gguf-type "
                                 "into a temporary file).", panel=BACKEND)
    gguf_type: str = gguf_type_option("--backend llama.cpp without --gguf: the type the model is converted to",
                                      panel=BACKEND)
    tasks: Optional[str] = option(None, "Zero-shot tasks, comma-separated: lastword:SRC (built in: the final word of "
                                  "each paragraph of SRC), lm-eval task names or task YAML files (needs "
                                  "llmprune\\[eval]), or the suites wanda-suite, llm-pruner-suite.", panel=TASKS)
    limit: Optional[int] = option(None, "With --tasks: at most this many examples per task (lastword default: 500).",
                                  panel=TASKS)
    num_fewshot: Optional[int] = option(None, "With --tasks: few-shot examples for lm-eval tasks (default: each "
                                        "task's own).", panel=TASKS)


def _check_speed(ws: Workdir, o: EvalOptions, batches: tuple[int, ...]) -> Path | None:
    """``--speed``'s options checked before any pass: the prompt within the context, the batches within free memory,
    the baseline a model folder (returned: its ``model/`` for a workdir; None without one)."""
    if o.speed:
        config = json.loads((ws.model_dir / "config.json").read_text(encoding="utf-8"))
        ctx = config.get("max_position_embeddings")
        if ctx is not None and o.prompt_len + o.new_tokens > ctx:
            raise UserError(f"--prompt-len {o.prompt_len} + --new-tokens {o.new_tokens} is longer than the model's "
                            f"context ({ctx} tokens)")
        need = speed_memory(config, max(batches), o.prompt_len, o.new_tokens) + 2 * model_bytes(ws.model_dir)
        have = available_memory(o.device)
        if have is not None and need > have:
            raise UserError(f"--speed-batches {max(batches)} with --prompt-len {o.prompt_len}: the timing needs about "
                            f"{need / 2**30:,.1f} GiB (logits, KV cache, the model and its baseline) and {o.device} "
                            f"has {have / 2**30:,.1f} GiB free; time smaller batches")
    if o.speed_baseline is None:
        return None
    if not o.speed:
        raise UserError("--speed-baseline needs --speed")
    given = Path(o.speed_baseline)
    base_dir = given / "model" if (given / "manifest.json").is_file() else given
    if not base_dir.is_dir() or not any(base_dir.glob("*.safetensors")):
        raise UserError(f"--speed-baseline {given} is neither a workdir nor a safetensors model folder")
    return base_dir


def run(ws: Workdir, o: EvalOptions) -> dict[str, Any]:
    """The ``eval`` step: perplexity, parameters, sparsity (and throughput) of the workdir's model, recorded -- one
    step per ``--dataset`` (the timing and the tasks with the first: they do not depend on the text)."""
    ws.manifest()  # a missing or foreign workdir is the first thing to report
    check_all(o)
    o = replace(o, device=check_device(o.device), seqlen=o.seqlen or calibration_seqlen(ws))
    sources = [_source(ws, d) for d in (o.dataset or [None])]
    if len(set(sources)) < len(sources):
        raise UserError(f"--dataset names {', '.join(sorted(s for s in set(sources) if sources.count(s) > 1))} twice")
    texts = [data.load_text(d, "evaluation", o.text_field) for d in sources]  # every text read before any pass
    results = []
    for i, (dataset, text) in enumerate(zip(sources, texts)):
        one = o if i == 0 else replace(o, speed=False, speed_baseline=None, tasks=None, limit=None, num_fewshot=None)
        results.append(_measure(ws, one, dataset, text))
    return {**results[0], "evaluations": results}


def _source(ws: Workdir, dataset: str | None) -> str:
    """A ``--dataset``, or without one the calibration dataset (its test split: a named or Hub dataset only)."""
    if dataset is not None:
        return dataset
    src = ws.manifest().get("calibration", {}).get("source", "")
    if src not in data.NAMED and not src.startswith("hf:"):
        raise UserError("pass --dataset: the calibration source is a local file, which has no test split")
    return src


def _measure(ws: Workdir, o: EvalOptions, dataset: str, text: str) -> dict[str, Any]:
    """One eval step: ``text`` measured, with the timing and the tasks ``o`` asks for."""
    if o.backend == "llama.cpp":
        return gguf_eval.measure(ws, o, dataset, text)
    if o.gguf is not None or o.gguf_type != "f16":
        raise UserError("--gguf and --gguf-type choose the file llama.cpp runs: add --backend llama.cpp")
    batches = parse_batches(o.speed_batches)
    base_dir = _check_speed(ws, o, batches)
    wanted = _tasks.split_tasks(o.tasks)
    if o.limit is not None and o.limit <= 0:
        raise UserError(f"--limit must be positive, got {o.limit}")
    if o.num_fewshot is not None and o.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {o.num_fewshot}")
    if (o.limit is not None or o.num_fewshot is not None) and not wanted:
        raise UserError("--limit and --num-fewshot apply to --tasks; name the tasks")
    # Everything a task needs is checked before the perplexity pass, which may take a long time.
    if _tasks.LASTWORD in wanted:
        raise UserError("the last-word task needs a text source: --tasks lastword:SRC (a file, wikitext2, hf:NAME)")
    lastword = {t: data.load_text(t.removeprefix(_tasks.LASTWORD) or "", "evaluation", o.text_field)
                for t in wanted if t.startswith(_tasks.LASTWORD)}
    others = [t for t in wanted if not t.startswith(_tasks.LASTWORD)]
    plan = _tasks.lm_eval_plan(others) if others else None
    with ws.step("eval", {**asdict(o), "dataset": dataset}) as tx:
        ws.record_inputs(tx, "model")
        lm, tok, weights = open_current(ws)  # read block by block: the peak is one block, not the model
        check_context(lm, o.seqlen)
        windows = data.eval_windows(data.tokenize(tok, text), o.seqlen, o.max_windows)
        counts: dict[str, tuple[int, int]] = {}
        peak: dict[str, Any] = {}
        with engine.peak_device_memory(o.device, peak):
            ppl = perplexity(lm, windows, o.device, o.batch_size, weights=weights,
                             sink=lambda i, block: counts.update(block_zeros(i, block)))
        tx.step.metrics = {**ppl, **peak, **summary(lm, counts), "model_bytes": model_bytes(ws.model_dir)}
        results: dict[str, dict[str, float]] = {}
        for name, task_text in lastword.items():  # block by block, like perplexity
            ex = _tasks.lastword_examples(tok, task_text, o.limit or _tasks.LASTWORD_LIMIT)
            results[name] = _tasks.lastword_accuracy(lm, ex, o.device, o.batch_size, weights)
        whole = None
        if plan is not None or o.speed:  # lm-eval and generation run the whole model: loaded whole for them only
            whole = load_current(ws)[0] if weights.lazy else lm
        if plan is not None:
            whole.to(o.device)
            results.update(_tasks.run_lm_eval(whole, tok, *plan, o.limit, o.num_fewshot, o.batch_size))
            whole.to("cpu")
        if results:
            scores = [v for v in (_tasks.primary(m) for m in results.values()) if v is not None]
            tx.step.metrics["tasks"] = results
            tx.step.metrics["tasks_mean"] = sum(scores) / len(scores) if scores else None
        if o.speed:
            tx.step.metrics["speed"] = speed_against(whole, base_dir, o.prompt_len, o.new_tokens, o.device, batches,
                                                          o.reps)
    return {"dataset": dataset, "seqlen": o.seqlen, **tx.step.metrics}


def calibration_seqlen(ws: Workdir) -> int:
    """The window length of the workdir's calibration: what ``eval`` and ``sweep`` measure with by default, so that
    perplexity is taken over windows the model was pruned for (and within its context)."""
    return int(ws.manifest().get("calibration", {}).get("seqlen") or 2048)


STEP = Step("eval", EvalOptions, run, "Perplexity, parameter count and sparsity per layer type (and, with --speed, "
            "throughput); recorded as a step.", kind=KINDS["eval"])
