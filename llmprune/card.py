"""The model card of an export, written from the manifest: YAML front matter through ``huggingface_hub``'s
``ModelCardData`` (with the final model's evaluation results as ``model-index``), how to load the folder, the
lineage of steps, the evaluation tables. Local paths appear by file name (and SHA-256), never as this machine's."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData

from llmprune.data import parse_mixture
from llmprune.errors import UserError
from llmprune.fsio import sha256_file
from llmprune.provenance import local_paths, public_name
from llmprune.report import number as num
from llmprune.steps import KINDS
from llmprune.tasks import primary

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)
_SKIP_PARAMS = {"json"}
# {command: {recorded parameter: the option as typed}}: the lineage names a parameter as its command line does
# (``lambda``, not the field ``lam``). Read from the recorded steps' declarations (export itself records nothing).
_TYPED = {name: {o.name: o.flag[2:] for o in importlib.import_module(f"llmprune.steps.{name}").STEP.specs()}
          for name, kind in KINDS.items() if kind.records}
# The steps that change the model: an eval after the last of them measured the model the card describes.
_CHANGES_MODEL = ("calibrate", "regularize", "prune", "recover")


_HOW = {"merged": "It loads with plain transformers:",
        "peft": "This folder holds the pruned model and, in `adapter/`, its LoRA recovery adapter (peft):",
        "adapter": "This folder holds its LoRA recovery adapter (peft); the base is the pruned model it was trained on:",
        "gguf": "This folder holds it as one GGUF file, which llama.cpp and Ollama run:"}


_INEXACT = ("**Note:** this adapter was trained through the zero pattern of a sparse model (`llmprune recover "
            "--masked`). Plain peft applies it densely, which computes another model than the one evaluated here; "
            "use the merged export of the same workdir (`llmprune export --format merged`) to run that model.")


def _loading(fmt: str, base_id: str | None, repo: str | None = None, gguf_file: str | None = None) -> list[str]:
    """The card's loading snippet for each export format (``repo``: the Hub repo it is pushed to, when known)."""
    at = repo or "PATH_OR_REPO"
    if fmt == "gguf":
        return [f"llama-cli -m {gguf_file} -p \"The capital of France is\" -n 32" if not repo else
                f"llama-cli -hf {repo} -p \"The capital of France is\" -n 32",
                f"ollama create {(repo or 'my-model').split('/')[-1].lower()} -f Modelfile  # Modelfile: FROM ./{gguf_file}"]
    if fmt == "merged":
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{at}")']
    if fmt == "peft":
        return ["from peft import PeftModel",
                "from transformers import AutoModelForCausalLM",
                f'base = AutoModelForCausalLM.from_pretrained("{at}")  # the pruned model',
                f'model = PeftModel.from_pretrained(base, "{at}", subfolder="adapter")  # + the LoRA adapter']
    return ["from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'base = AutoModelForCausalLM.from_pretrained("{base_id or "BASE_MODEL"}")  # the pruned model it was trained on',
            f'model = PeftModel.from_pretrained(base, "{at}")']


def _is_hub_id(source: str) -> bool:
    return bool(HUB_ID.fullmatch(source)) and not Path(source).exists() and not source.endswith(".gguf")


DATASETS_HUB = {"wikitext2": "Salesforce/wikitext", "c4": "allenai/c4", "ptb": "ptb-text-only/ptb_text_only"}


def _hub_dataset(source: Any) -> str | None:
    """The Hub id of a dataset source (a named one, or ``hf:NAME[:CONFIG[:SPLIT]]``); None for local files."""
    if not isinstance(source, str):
        return None
    if source.startswith("hf:"):
        return source[3:].split(":")[0] or None
    return DATASETS_HUB.get(source)


def _sources(value: Any) -> list[str]:
    """The sources a recorded ``dataset`` names: one, or each part of a training mixture (``a:0.7,b:0.3``)."""
    if not isinstance(value, str):
        return []
    try:
        return [p.source for p in parse_mixture(value)]
    except UserError:  # a name that only looks like a mixture (a file with a comma): the name itself
        return [value]


def _local_digests(manifest: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of the local files the steps name, so the card can name each by file name and digest: the GGUF's
    from the manifest, the others hashed now while they still exist (a file gone is named alone)."""
    base = manifest.get("base_model", {})
    out = {base["source"]: base["sha256"]} if base.get("sha256") and base.get("source") else {}
    for s in manifest.get("steps", []):
        for v in s.get("params", {}).values():
            if not isinstance(v, str) or _hub_dataset(v):
                continue
            for path in local_paths(v):
                if path not in out and Path(path).is_file():
                    out[path] = sha256_file(Path(path))
    return out


def final_evals(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The eval steps that measured the model the card describes: those after the last step that changed it."""
    last = max((i for i, s in enumerate(steps) if s["command"] in _CHANGES_MODEL), default=-1)
    return [s for s in steps[last + 1:] if s["command"] == "eval"]


def eval_results(steps: list[dict[str, Any]], digests: dict[str, str]) -> list[EvalResult]:
    """The final model's measurements as the Hub's ``model-index``: perplexity per dataset, the zero-shot accuracies,
    and each speed-up over the model it was timed against (median of the paired runs, their range in the name)."""
    out = []
    for s in final_evals(steps):
        m, p = s["metrics"], s["params"]
        data = public_name(_hub_dataset(p.get("dataset")) or p.get("dataset") or "calibration text", digests)
        engine = f"; llama.cpp, {m.get('gguf_type')} GGUF" if m.get("backend") == "llama.cpp" else ""
        if isinstance(m.get("perplexity"), (int, float)):
            out.append(EvalResult(task_type="text-generation", task_name="Language modelling", dataset_type=str(data),
                                  dataset_name=str(data), metric_type="perplexity", metric_value=m["perplexity"],
                                  metric_name=f"perplexity ({p.get('seqlen')}-token windows{engine})"))
        for name, t in (m.get("tasks") or {}).items():
            if (value := primary(t)) is not None:
                task = str(public_name(name, digests))
                out.append(EvalResult(task_type="text-generation", task_name=task, dataset_type=task,
                                      dataset_name=task, metric_type="accuracy", metric_value=value))
        sp = m.get("speed") or {}
        for phase in ("prefill", "decode"):
            if isinstance(sp.get(f"{phase}_speedup"), (int, float)):
                lo, hi = sp.get(f"{phase}_speedup_range") or (None, None)
                spread = f"; range {lo}-{hi} over {sp.get('reps')} paired runs" if lo is not None else ""
                out.append(EvalResult(
                    task_type="text-generation", task_name="Throughput", dataset_type="random prompts",
                    dataset_name=f"{sp.get('prompt_len')}-token prompts, {sp.get('new_tokens')} new tokens",
                    metric_type=f"{phase}_speedup", metric_value=sp[f"{phase}_speedup"],
                    metric_name=f"{phase} speed-up, batch 1 (median{spread}; "
                                f"{sp.get(f'{phase}_speedup_verdict', 'no verdict')}{engine})"))
    return out


def card_front_matter(manifest: dict[str, Any], fmt: str, base_model: str | None, license_: str | None = None,
                      digests: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """The card's YAML front matter (through huggingface_hub's ``ModelCardData``, so the Hub reads it as written)
    and the warnings for what a public card should carry but the workdir does not know. ``license_`` overrides the
    source's (``export --license``)."""
    base = manifest.get("base_model", {})
    steps = manifest.get("steps", [])
    methods = sorted({s["params"].get("method") for s in steps if s["command"] == "prune" and s["params"].get("method")})
    datasets = sorted({d for s in steps for part in _sources(s["params"].get("dataset")) if (d := _hub_dataset(part))})
    base_model = base_model or base.get("hub_id") or (base.get("source") if _is_hub_id(base.get("source", "")) else None)
    warnings = []
    if not base_model:
        warnings.append("the model card has no base_model: the source names no Hub id (a local file or folder); "
                        "pass export --base-model ORG/NAME")
    license_ = license_ or base.get("license")
    if not license_:
        warnings.append("the model card has no license: the source carries none that llmprune can read; pass "
                        "export --license (the source's terms)")
    results = eval_results(steps, digests or {})
    title, _ = source_line(base)
    data = ModelCardData(
        base_model=base_model, base_model_relation="adapter" if fmt == "adapter" and base_model else None,
        license=license_, language=base.get("language"), library_name={"adapter": "peft", "gguf": "gguf"}.get(fmt, "transformers"),
        pipeline_tag="text-generation",
        tags=[*(["pruned"] if pruned(steps) else []), "llmprune", *methods, *(["gguf"] if fmt == "gguf" else [])],
        datasets=datasets or None, model_name=heading(title, steps) if results else None,
        eval_results=results or None)
    return "---\n" + data.to_yaml() + "\n---", warnings


def pruned(steps: list[dict[str, Any]]) -> bool:
    return any(s["command"] == "prune" for s in steps)


def heading(title: str, steps: list[dict[str, Any]]) -> str:
    """"Pruned X" only for a model that was pruned; an export of a workdir never pruned says what it is."""
    return f"Pruned {title}" if pruned(steps) else f"{title}, exported by llmprune"


def source_line(base: dict[str, Any]) -> tuple[str, str]:
    """(title, sentence fragment) naming the source in public: a Hub id with its commit, a local file by name and
    SHA-256, a local folder by name."""
    src = base.get("source", "unknown")
    if _is_hub_id(src) or base.get("kind") == "hub":
        ident = base.get("commit") or base.get("revision")
        return src, f"`{src}`" + (f" (revision {ident})" if ident else "")
    name = Path(src).name or src
    if base.get("sha256"):
        return name, f"`{name}` (sha256 {base['sha256']})"
    return name, f"a local folder `{name}`" + (f" (Hub id {base['hub_id']})" if base.get("hub_id") else "")


def model_card(manifest: dict[str, Any], fmt: str = "merged", adapter_base: str | None = None,
               base_model: str | None = None, repo: str | None = None,
               sweep: tuple[list[dict[str, Any]], list[str]] | None = None, license_: str | None = None,
               exact_adapter: bool = True, gguf_file: str | None = None) -> tuple[str, list[str]]:
    """README.md for the exported folder -- YAML front matter, how to load it, the lineage of steps, the evaluation
    table -- and the warnings about it. Local paths appear by file name (and SHA-256), never as this machine's
    paths."""
    base = manifest.get("base_model", {})
    steps = manifest.get("steps", [])
    digests = _local_digests(manifest)
    front, warnings = card_front_matter(manifest, fmt, base_model, license_, digests)
    title, origin = source_line(base)
    lines = [
        front,
        "",
        f"# {heading(title, steps)}",
        "",
        f"This model was produced by llmprune from {origin}"
        + f", a `{manifest.get('model_type', '?')}` model. " + _HOW[fmt],
        "",
        "```sh" if fmt == "gguf" else "```python",
        *_loading(fmt, adapter_base, repo, gguf_file),
        "```",
        *([] if exact_adapter or fmt == "merged" else ["", _INEXACT]),
        "",
        "## Lineage",
        "",
        "| # | step | parameters | duration |",
        "|---|---|---|---|",
    ]
    for i, s in enumerate(steps, 1):
        params = ", ".join(
            f"{_TYPED.get(s['command'], {}).get(k, k)}={public_name(v, digests)}" for k, v in s["params"].items()
            if v is not None and k not in _SKIP_PARAMS
        )
        lines.append(f"| {i} | `{s['command']}` | {params} | {s['duration_s']:.1f} s |")
    evals = [s for s in steps if s["command"] == "eval"]
    if evals:
        lines += [
            "",
            "## Evaluation",
            "",
            "Perplexity over non-overlapping windows (mean next-token NLL), measured by `llmprune eval` after the "
            "step it follows.",
            "",
            "| after step | dataset | seqlen | windows | perplexity | parameters | sparsity (block Linears) |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in evals:
            idx = steps.index(s)
            prev = _after(steps, idx)
            m = s["metrics"]
            lines.append(
                f"| {prev} | {public_name(s['params'].get('dataset'), digests)} | {s['params'].get('seqlen')} | "
                f"{m.get('windows')} | {num(m.get('perplexity'))} | {num(m.get('parameters'), ',')} | "
                f"{num((m.get('sparsity') or {}).get('all'), '.2%')} |"
            )
    lines += _task_table(steps, digests)
    lines += _speed_table(steps)
    if sweep:
        lines += _sweep_section(*sweep)
    v = steps[-1]["versions"] if steps else {}
    lines += ["", f"Made with llmprune {v.get('llmprune', '?')}, torch {v.get('torch', '?')}, "
              f"transformers {v.get('transformers', '?')}.", ""]
    return "\n".join(lines), warnings


def _after(steps: list[dict[str, Any]], i: int) -> str:
    """The command an eval at index ``i`` measured the result of (the last step before it that is not an eval)."""
    return next((p["command"] for p in reversed(steps[:i]) if p["command"] != "eval"), "-")


def _task_table(steps: list[dict[str, Any]], digests: dict[str, str]) -> list[str]:
    """The zero-shot results of every eval step that ran tasks (``eval --tasks``)."""
    rows = []
    for i, s in enumerate(steps):
        prev = _after(steps, i)
        for name, m in (s["metrics"].get("tasks") or {}).items():
            value, err = primary(m), m.get("acc_stderr")
            rows.append(f"| {prev} | {public_name(name, digests)} | {int(m.get('examples', 0))} | "
                        + ("–" if value is None else f"{value:.4f}") + " | "
                        + ("–" if err is None else f"{err:.4f}") + " |")
        if s["metrics"].get("tasks_mean") is not None and len(s["metrics"].get("tasks") or {}) > 1:
            rows.append(f"| {prev} | mean | | {num(s['metrics']['tasks_mean'], '.4f')} | |")
    if not rows:
        return []
    return ["", "## Zero-shot tasks", "",
            "Accuracy measured by `llmprune eval --tasks` after the step it follows (lastword: the final word of "
            "each paragraph of the source, greedy; other tasks through lm-eval).", "",
            "| after step | task | examples | accuracy | stderr |", "|---|---|---|---|---|", *rows]


def _speed_table(steps: list[dict[str, Any]]) -> list[str]:
    """Every speed measurement against a baseline (``eval --speed --speed-baseline``): the median speed-up of the
    paired runs with their range and the verdict, so a reader sees noise as noise."""
    rows = []
    for i, s in enumerate(steps):
        sp = (s["metrics"].get("speed") or {}) if s["command"] == "eval" else {}
        for phase in ("prefill", "decode"):
            if isinstance(sp.get(f"{phase}_speedup"), (int, float)):
                lo, hi = sp.get(f"{phase}_speedup_range") or ("–", "–")
                rows.append(f"| {_after(steps, i)} | {phase} | {sp[f'{phase}_speedup']} | {lo} – {hi} | "
                            f"{sp.get('reps', '–')} | {sp.get(f'{phase}_speedup_verdict', '–')} |")
    if not rows:
        return []
    return ["", "## Speed", "", "Throughput against the model it was timed with (`llmprune eval --speed "
            "--speed-baseline`), batch 1 on the machine that ran the step: the median ratio of runs timed in turn, "
            "their range, and whether the middle half of them clears 1.", "",
            "| after step | phase | speed-up (median) | range | paired runs | verdict |", "|---|---|---|---|---|---|",
            *rows]


def _sweep_section(rows: list[dict[str, Any]], plots: list[str]) -> list[str]:
    """The sweep this workdir ran (``llmprune sweep``): its table and its plots (copied into ``plots/``)."""
    out = ["", "## Sweep", "", "Points pruned from the same calibrated model by `llmprune sweep` (each evaluated "
           "as above).", "", "| point | perplexity | parameters | sparsity | tasks mean | prefill × |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "done":
            continue
        sp, tm = num(r.get("achieved_sparsity"), ".2%"), num(r.get("tasks_mean"), ".4f")
        out.append(f"| {r.get('name')} | {num(r.get('perplexity'))} | {num(r.get('parameters'), ',')} | {sp} | {tm} | "
                   f"{r.get('prefill_speedup') or '–'} |")
    out += [""] + [f"![{Path(p).stem.replace('_', ' ')}](plots/{Path(p).name})" for p in plots]
    return out


