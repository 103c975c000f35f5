"""The command line: thin typed commands over the library, and ``run``, the one place errors become messages."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmprune import report
from llmprune.errors import LlmpruneError, StepFailed, UserError
from llmprune.workdir import Workdir, check_fresh

app = typer.Typer(
    name="llmprune",
    help="Prune causal language models (magnitude, Wanda, SparseGPT, Wanda++, DReSS) through a working directory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

@app.callback()
def _options(
    no_verify: Annotated[bool, typer.Option("--no-verify", envvar="LLMPRUNE_NO_VERIFY", help="Skip the SHA-256 check of the workdir's files before a step reads them (huge models); every step run so records `inputs_verified: false` in the manifest.")] = False,
) -> None:
    """Prune causal language models (magnitude, Wanda, SparseGPT, Wanda++, DReSS) through a working directory."""
    from llmprune import workdir as _wd

    if no_verify:  # only ever switched off here: the steps of a recipe inherit it from `llmprune --no-verify run`
        _wd.VERIFY = False


WorkdirArg = Annotated[Path, typer.Argument(help="The working directory (safetensors shards + manifest.json).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout instead of tables.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N: where each block runs.")]
BatchOpt = Annotated[int, typer.Option(help="Windows per forward pass.")]
StructureOpt = Annotated[Optional[str], typer.Option(help="DReSS: hidden (the paper), heads (KV groups), mlp, layers.")]
RatioOpt = Annotated[Optional[float], typer.Option(help="DReSS: fraction of the structure's units to remove.")]
SelectOpt = Annotated[Optional[str], typer.Option(help="DReSS: activation (lowest on calibration data), tail, random.")]


def _finish(result: dict[str, Any], as_json: bool, render) -> None:
    if as_json:
        report.emit_json(result)
    else:
        render()


def _check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available")
        return device
    raise UserError(f"unknown --device '{device}'; use cpu, cuda or cuda:N")


def _act_dtype(name: str):
    from llmprune.modeling import DTYPES

    if name not in DTYPES:
        raise UserError(f"unknown --act-dtype '{name}'; use {', '.join(DTYPES)}")
    return DTYPES[name]


def _load_windows(ws: Workdir):
    from safetensors.torch import load_file

    ws.verify("calib")
    return load_file(ws.calib_dir / "windows.safetensors")["input_ids"]


def _load_current_model(ws: Workdir, dtype: str = "auto"):
    """The workdir's model as every step sees it: an adapter left unmerged by ``recover --no-merge`` is part of it."""
    from llmprune import recovery
    from llmprune.modeling import load_model

    ws.verify("model")
    model, tok = load_model(ws.model_dir, dtype)
    step = recovery.pending_adapter(ws.manifest())
    if step is not None:
        ws.verify("adapter")
        model = recovery.merge_pending(model, ws.path / "adapter", step)
    return model, tok


def _calibrated(workdir: Path) -> Workdir:
    """The workdir of a step that needs a model and calibration windows."""
    ws = Workdir(workdir)
    if not ws.steps("calibrate"):
        raise UserError(f"{workdir} has no calibration; run `llmprune calibrate` first")
    return ws


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")


def _check_context(lm, seqlen: int) -> None:
    ctx = getattr(lm.config, "max_position_embeddings", None)
    if ctx is not None and seqlen > ctx:
        raise UserError(f"--seqlen {seqlen} is longer than the model's context ({ctx} tokens)")


def _split_holdout(windows, holdout: int):
    """(training windows, held-out windows): the last ``holdout`` windows are never trained on."""
    if windows.shape[0] <= holdout:
        raise UserError(f"--holdout {holdout} leaves no training windows (there are {windows.shape[0]})")
    return windows[:-holdout], windows[-holdout:]


def _invoke(args: list[str]) -> int:
    """Run one command line through the app; its exit code. Typer turns Ctrl-C into Exit(130) and, outside
    standalone mode, *returns* that code instead of raising it."""
    rv = app(args=args, prog_name="llmprune", standalone_mode=False)
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


@app.command()
def calibrate(
    workdir: WorkdirArg,
    model: Annotated[str, typer.Option(help="Hub id, local HF folder, or .gguf file.")],
    dataset: Annotated[str, typer.Option(help="wikitext2, c4, ptb, hf:NAME[:CONFIG[:SPLIT]], or a .txt/.jsonl/.json/.parquet file.")],
    samples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed of the window positions.")] = 0,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl/.json/.parquet and hf: sources.")] = "text",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow code from the model repository to run.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard.")] = "2GB",
    force: Annotated[bool, typer.Option(help="Overwrite an existing workdir.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a workdir: bring in a model and calibration windows of a dataset."""
    from safetensors.torch import save_file

    from llmprune import data
    from llmprune.modeling import load_source, param_count, save_model

    if samples <= 0:
        raise UserError(f"--samples must be positive, got {samples}")
    if seqlen <= 1:
        raise UserError(f"--seqlen must be at least 2, got {seqlen}")
    check_fresh(workdir, force)
    text = data.load_text(dataset, "calibration", text_field)  # before the model: fail fast on bad data
    params = dict(model=model, dataset=dataset, samples=samples, seqlen=seqlen, seed=seed, revision=revision,
                  dtype=dtype, text_field=text_field, trust_remote_code=trust_remote_code,
                  max_shard_size=max_shard_size)
    ws = Workdir(workdir)
    with ws.step("calibrate", params, create={}) as tx:
        lm, tok, base = load_source(model, revision, dtype, trust_remote_code)
        _check_context(lm, seqlen)
        ids = data.tokenize(tok, text)
        windows = data.random_windows(ids, samples, seqlen, seed)
        tx.manifest.update({
            "base_model": base,
            "model_type": base["model_type"],
            "calibration": {"source": dataset, "seed": seed, "samples": samples, "seqlen": seqlen,
                            "source_tokens": ids.numel(), "file": "calib/windows.safetensors"},
        })
        save_model(lm, tok, tx.stage("model"), max_shard_size)
        calib = tx.stage("calib")
        calib.mkdir()
        # One metadata key: safetensors writes a metadata map in no fixed order, and the file's hash must be
        # reproducible (a re-run of a recipe compares hashes).
        save_file({"input_ids": windows.contiguous()}, calib / "windows.safetensors",
                  metadata={"llmprune": json.dumps({"source": dataset, "seed": seed, "seqlen": seqlen}, sort_keys=True)})
        tx.step.metrics = {"parameters": param_count(lm), "source_tokens": ids.numel(),
                           "windows": list(windows.shape)}
    result = {"workdir": str(workdir), "model_type": base["model_type"], **tx.step.metrics}
    _finish(result, as_json, lambda: report.table(
        f"calibrated {workdir}", ["what", "value"],
        [["model", model], ["model type", base["model_type"]], ["parameters", param_count(lm)],
         ["dataset tokens", ids.numel()], ["windows", f"{samples} × {seqlen}"]]))


@app.command()
def prune(
    workdir: WorkdirArg,
    method: Annotated[str, typer.Option(help="magnitude, wanda, sparsegpt, wandapp; dress (structured removal).")] = "wanda",
    sparsity: Annotated[Optional[float], typer.Option(help="Fraction of weights to remove (implied by N:M).")] = None,
    pattern: Annotated[str, typer.Option(help="unstructured, 2:4, 4:8 (any N:M: N kept of every M).")] = "unstructured",
    blocksize: Annotated[int, typer.Option(help="SparseGPT: columns per block.")] = 128,
    damp: Annotated[float, typer.Option(help="SparseGPT: damping, as a fraction of the mean Hessian diagonal.")] = 0.01,
    alpha: Annotated[float, typer.Option(help="Wanda++: weight of the regional gradient in the RGS score.")] = 100.0,
    act_norm: Annotated[str, typer.Option(help="Wanda++: ||X_j|| as 'sum' over all tokens (paper) or 'mean' (Wanda code).")] = "sum",
    ro_iters: Annotated[int, typer.Option(help="Wanda++: rounds of regional optimisation (0: RGS only).")] = 5,
    ro_samples: Annotated[int, typer.Option(help="Wanda++: samples drawn per RO round.")] = 32,
    ro_lr: Annotated[float, typer.Option(help="Wanda++: RMSprop learning rate of RO.")] = 3e-7,
    seed: Annotated[int, typer.Option(help="Wanda++: seed of the RO sample draws; DReSS: of --select random.")] = 0,
    true_sequential: Annotated[bool, typer.Option(
        "--true-sequential", help="Wanda, SparseGPT: prune each Linear as its inputs arrive, in one pass of each block "
        "over all calibration windows at once (later Linears see the pruned earlier ones; about half the block "
        "passes of the reference schedule, more activation memory).")] = False,
    structure: StructureOpt = None,
    ratio: RatioOpt = None,
    select: SelectOpt = None,
    device: DeviceOpt = "cpu",
    act_dtype: Annotated[str, typer.Option(help="Dtype of the stored activations: float32, bfloat16, float16.")] = "float32",
    batch_size: BatchOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Remove weights with a pruning method; the saved weights hold exact zeros."""
    from llmprune import evaluate
    from llmprune.masks import parse_pattern
    from llmprune.methods import METHODS
    from llmprune.methods.base import PruneSpec
    from llmprune.modeling import save_model
    from llmprune.pruning import prune_model

    if method == "dress":
        if sparsity is not None or pattern != "unstructured":
            raise UserError("--method dress removes whole units: use --structure and --ratio, not --sparsity/--pattern")
        return _prune_dress(workdir, structure, ratio, select, seed, device, batch_size, as_json)
    if structure is not None or ratio is not None or select is not None:
        raise UserError("--structure, --ratio and --select belong to --method dress")
    if method not in METHODS:
        raise UserError(f"unknown method '{method}'; use one of: {', '.join(METHODS)}")
    if true_sequential and method not in ("wanda", "sparsegpt"):
        raise UserError(f"--true-sequential applies to wanda and sparsegpt, not {method}")
    pat, s = parse_pattern(pattern, sparsity)
    if blocksize <= 0:
        raise UserError(f"--blocksize must be positive, got {blocksize}")
    if damp <= 0:
        raise UserError(f"--damp must be positive, got {damp}")
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if act_norm not in ("sum", "mean"):
        raise UserError(f"--act-norm must be sum or mean, got '{act_norm}'")
    if ro_iters < 0 or ro_samples <= 0 or ro_lr <= 0:
        raise UserError("--ro-iters must be >= 0, --ro-samples and --ro-lr positive")
    device = _check_device(device)
    adt = _act_dtype(act_dtype)
    ws = _calibrated(workdir)
    params = dict(method=method, sparsity=s, pattern=str(pat), device=device, act_dtype=act_dtype,
                  batch_size=batch_size)
    options: dict[str, Any] = {}
    if method == "sparsegpt":
        options = {"blocksize": blocksize, "damp": damp}
    elif method == "wandapp":
        options = {"alpha": alpha, "act_norm": act_norm, "ro_iters": ro_iters, "ro_samples": ro_samples,
                   "ro_lr": ro_lr, "seed": seed}
        n_calib = ws.manifest()["calibration"]["samples"]
        if ro_iters > 0 and n_calib < 64:
            report.warn(f"regional optimisation with {n_calib} calibration samples: the Wanda++ paper reports "
                        "instability below 64")
    if true_sequential:
        options["true_sequential"] = True
    params.update(options)
    spec = PruneSpec(pat, s, options)
    with ws.step("prune", params) as tx:
        ws.record_inputs(tx, "model")
        ws.record_inputs(tx, "calib")
        lm, tok = _load_current_model(ws)
        windows = _load_windows(ws) if METHODS[method].NEEDS_DATA else None
        times = prune_model(lm, method, spec, windows, device, batch_size, adt)
        summ = evaluate.summary(lm)
        tx.step.metrics = {**times, **summ, "layer_sparsity": evaluate.layer_sparsity(lm)}
        save_model(lm, tok, tx.stage("model"), _shard_size(ws))
    result = {"workdir": str(workdir), "method": method, "pattern": str(pat), "sparsity": s, **times, **summ}
    _finish(result, as_json, lambda: report.table(
        f"{method} {pat} {s:.0%}: achieved sparsity", ["layer type", "sparsity"],
        [[k, f"{v:.2%}"] for k, v in summ["sparsity"].items()]
        + [["prune time", f"{times['prune_s'] + times['propagate_s'] + times['capture_s']:.1f} s"]]))


def _prune_dress(workdir: Path, structure: str | None, ratio: float | None, select: str | None, seed: int,
                 device: str, batch_size: int, as_json: bool) -> None:
    """Structured removal. After ``regularize`` it removes the units that were regularised; on a workdir that was
    never regularised it selects the same way and removes directly (the key control of DReSS)."""
    import json as _json

    from llmprune import evaluate
    from llmprune.methods import dress
    from llmprune.modeling import param_count, save_model
    from llmprune.structured import Plan, check_supported, geometry, remove

    device = _check_device(device)
    ws = _calibrated(workdir)
    plan_path = ws.path / "dress" / "plan.json"
    pending = None
    if plan_path.is_file():
        ws.verify("dress")
        pending = _json.loads(plan_path.read_text(encoding="utf-8"))
        if pending.get("applied"):
            pending = None
    if pending is not None:
        for name, given, planned in (("structure", structure, pending["structure"]), ("ratio", ratio, pending["ratio"]),
                                     ("select", select, pending["select"])):
            if given is not None and given != planned:
                raise UserError(f"this workdir was regularised for --{name} {planned}; prune with that "
                                f"(or regularise again for {given})")
    structure = structure or (pending or {}).get("structure", "hidden")
    select = select or (pending or {}).get("select", "activation")
    ratio = ratio if ratio is not None else (pending or {}).get("ratio", 0.25)
    _check_dress_choice(structure, select)
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    params = dict(method="dress", structure=structure, ratio=ratio, select=select, seed=seed, device=device,
                  regularized=pending is not None)
    with ws.step("prune", params) as tx:
        ws.record_inputs(tx, "model")
        ws.record_inputs(tx, "calib")
        if pending is not None:
            ws.record_inputs(tx, "dress")
        lm, tok = _load_current_model(ws)
        check_supported(lm, structure)
        t0 = time.perf_counter()
        if pending is not None:
            plan = Plan.from_json({k: v for k, v in pending.items() if k not in ("regularized", "applied")})
        else:
            windows = _load_windows(ws) if select == "activation" else None
            plan = dress.select(lm, structure, ratio, select, windows, device, seed, batch_size)
        before_params, before_geom = param_count(lm), geometry(lm)
        small = remove(lm, plan)
        prune_s = time.perf_counter() - t0
        after = geometry(small)
        tx.step.metrics = {"prune_s": round(prune_s, 3), "plan": plan.to_json(), "units_removed": plan.n_units,
                           "parameters_before": before_params, **evaluate.summary(small),
                           "geometry_before": before_geom.__dict__, "geometry": after.__dict__}
        d = tx.stage("dress")
        d.mkdir()
        (d / "plan.json").write_text(_json.dumps({**plan.to_json(), "regularized": pending is not None,
                                                  "applied": True}, indent=1) + "\n", encoding="utf-8")
        save_model(small, tok, tx.stage("model"), _shard_size(ws))
    m = tx.step.metrics
    result = {"workdir": str(workdir), "method": "dress", "structure": structure, "ratio": ratio,
              "regularized": pending is not None, **m}
    _finish(result, as_json, lambda: report.table(
        f"dress {structure} {ratio:.0%} ({'regularised' if pending is not None else 'direct removal'}, {select})",
        ["what", "before", "after"],
        [["parameters", m["parameters_before"], m["parameters"]]]
        + [[k, v, after.__dict__[k]] for k, v in before_geom.__dict__.items() if v != after.__dict__[k]]
        + [["time", "", f"{prune_s:.1f} s"]]))


def _save_adapter(model, out: Path) -> None:
    """The adapter as safetensors + adapter_config.json. Its base is the workdir's model, whose path is no part of
    the result: leave it out (peft would record this machine's absolute path) and skip peft's generated card."""
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = None  # peft fills it in from the model at save time
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _shard_size(ws: Workdir) -> str:
    return ws.steps("calibrate")[0]["params"].get("max_shard_size", "2GB")


@app.command("eval")
def eval_(
    workdir: WorkdirArg,
    dataset: Annotated[Optional[str], typer.Option(help="Evaluation source (default: the test split of the calibration dataset).")] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl/.json/.parquet and hf: sources.")] = "text",
    speed: Annotated[bool, typer.Option(help="Also measure prefill and decode tokens/s (batch 1).")] = False,
    speed_baseline: Annotated[Optional[Path], typer.Option(help="With --speed: also time this workdir or HF folder in the same run, and report the ratios.")] = None,
    prompt_len: Annotated[int, typer.Option(help="With --speed: prompt tokens of the prefill.")] = 512,
    new_tokens: Annotated[int, typer.Option(help="With --speed: tokens decoded through the KV cache.")] = 64,
    device: DeviceOpt = "cpu",
    batch_size: BatchOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity, parameter count and sparsity per layer type (and, with --speed, throughput); recorded as a step."""
    from llmprune import data, evaluate

    ws = Workdir(workdir)
    manifest = ws.manifest()
    if dataset is None:
        src = manifest.get("calibration", {}).get("source", "")
        if src not in data.NAMED and not src.startswith("hf:"):
            raise UserError("pass --dataset: the calibration source is a local file, which has no test split")
        dataset = src
    device = _check_device(device)
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    text = data.load_text(dataset, "evaluation", text_field)
    if prompt_len <= 0 or new_tokens <= 0:
        raise UserError("--prompt-len and --new-tokens must be positive")
    base_dir = None
    if speed_baseline is not None:
        if not speed:
            raise UserError("--speed-baseline needs --speed")
        base_dir = speed_baseline / "model" if (speed_baseline / "manifest.json").is_file() else speed_baseline
        if not base_dir.is_dir() or not any(base_dir.glob("*.safetensors")):
            raise UserError(f"--speed-baseline {speed_baseline} is neither a workdir nor a safetensors model folder")
    params = dict(dataset=dataset, seqlen=seqlen, max_windows=max_windows, text_field=text_field, device=device,
                  batch_size=batch_size, speed=speed, speed_baseline=str(speed_baseline) if speed_baseline else None,
                  prompt_len=prompt_len, new_tokens=new_tokens)
    with ws.step("eval", params) as tx:
        ws.record_inputs(tx, "model")
        lm, tok = _load_current_model(ws)
        _check_context(lm, seqlen)
        windows = data.eval_windows(data.tokenize(tok, text), seqlen, max_windows)
        ppl = evaluate.perplexity(lm, windows, device, batch_size)
        tx.step.metrics = {**ppl, **evaluate.summary(lm)}
        if speed:
            tx.step.metrics["speed"] = _speed(lm, base_dir, prompt_len, new_tokens, device)
    m = tx.step.metrics
    result = {"workdir": str(workdir), "dataset": dataset, **m}
    sp = m.get("speed", {})
    _finish(result, as_json, lambda: report.table(
        f"eval {workdir} on {dataset}", ["metric", "value"],
        [["perplexity", m["perplexity"]], ["windows", f"{m['windows']} × {seqlen}"], ["parameters", m["parameters"]]]
        + [[f"sparsity {k}", f"{v:.2%}"] for k, v in m["sparsity"].items()]
        + [[k.replace("_", " "), v] for k, v in sp.items() if k not in ("prompt_len", "new_tokens")]))


def _speed(lm, base_dir: Path | None, prompt_len: int, new_tokens: int, device: str) -> dict[str, Any]:
    """Throughput of the workdir's model, and of a baseline timed alternately in the same run (ratios, not
    absolute timings, are what compares on a noisy machine)."""
    from llmprune import evaluate
    from llmprune.modeling import load_model

    if base_dir is None:
        return evaluate.speed(lm, prompt_len, new_tokens, device=device)
    base, _ = load_model(base_dir)
    runs = {"model": [], "baseline": []}
    for _ in range(2):  # alternate, so that a slow spell of the machine hits both
        runs["model"].append(evaluate.speed(lm, prompt_len, new_tokens, device=device))
        runs["baseline"].append(evaluate.speed(base, prompt_len, new_tokens, device=device))
    best = {k: {m: max(r[m] for r in v) for m in ("prefill_tokens_per_s", "decode_tokens_per_s")}
            for k, v in runs.items()}
    return {**best["model"], **{f"baseline_{m}": v for m, v in best["baseline"].items()},
            "prefill_speedup": round(best["model"]["prefill_tokens_per_s"] / best["baseline"]["prefill_tokens_per_s"], 3),
            "decode_speedup": round(best["model"]["decode_tokens_per_s"] / best["baseline"]["decode_tokens_per_s"], 3),
            "prompt_len": prompt_len, "new_tokens": new_tokens}


@app.command()
def export(
    workdir: WorkdirArg,
    out: Annotated[Path, typer.Option(help="Folder to write (must be new or empty).")],
    format: Annotated[str, typer.Option("--format", help="merged: the model (an unmerged adapter folded in); peft: the base model + adapter/ (after `recover --no-merge`); adapter: the LoRA adapter alone.")] = "merged",
    base_model: Annotated[Optional[str], typer.Option(help="Hub id written as the adapter's base_model_name_or_path (peft/adapter; default: --push-to-hub's repo for peft).")] = None,
    push_to_hub: Annotated[Optional[str], typer.Option(help="Also upload to this Hub repo id.")] = None,
    private: Annotated[bool, typer.Option(help="Create the Hub repo as private.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List what would be written and uploaded; change nothing.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it already holds files (a previous export).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a clean Hugging Face folder with a model card, and optionally push it to the Hub."""
    import shutil

    from llmprune import export as _export
    from llmprune import recovery
    from llmprune.modeling import save_model

    if format not in _export.FORMATS:
        raise UserError(f"unknown --format {format!r}; choose one of {', '.join(_export.FORMATS)}")
    ws = Workdir(workdir)
    manifest = ws.manifest()
    ws.verify("model")
    pending = recovery.pending_adapter(manifest)
    adapter = ws.path / "adapter"
    if format != "merged":
        if not recovery.has_adapter(manifest):
            raise UserError(f"{workdir} has no adapter; run `llmprune recover` first (or export --format merged)")
        ws.verify("adapter")
    if format == "peft":
        if pending is None:
            raise UserError("the adapter is already merged into the model (recover --merge); export --format merged, "
                            "or recover with --no-merge to ship the base model + adapter")
        if not recovery.peft_exact(pending):
            raise UserError("the adapter was trained through the zero pattern of a sparse model (recover --masked): "
                            "plain peft would apply it densely, another model; export --format merged, or recover "
                            "with --no-masked")
    base_id = base_model or (push_to_hub if format == "peft" else None)
    parts = {"merged": {".": ws.model_dir}, "peft": {".": ws.model_dir, "adapter": adapter},
             "adapter": {".": adapter}}[format]
    if dry_run:
        files = _export.planned_files(parts)
        result = {"dry_run": True, "out": str(out), "format": format, "push_to_hub": push_to_hub,
                  "files": [{"path": p, "bytes": b} for p, b in files]}
        _finish(result, as_json, lambda: report.table(
            f"would write {out}" + (f" and upload to {push_to_hub}" if push_to_hub else ""), ["file", "bytes"],
            [[p, b if p != "README.md" else "(model card)"] for p, b in files]))
        return
    if push_to_hub:
        from huggingface_hub import get_token

        if not get_token():  # check before writing anything
            raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN before --push-to-hub")

    def fill(tmp: Path) -> None:
        if format == "merged" and pending is not None:
            model, tok = _load_current_model(ws)  # model/ was hashed above: ws.verify does not hash it again
            save_model(model, tok, tmp, _shard_size(ws))
            return
        for dest, src in parts.items():
            shutil.copytree(src, tmp / dest, dirs_exist_ok=True)
        if format != "merged":
            _export.set_adapter_base(tmp / ("adapter" if format == "peft" else "."), base_id)

    card = _export.model_card(manifest, format, base_id)
    written = _export.build_folder(fill, card, out, overwrite)
    url = _export.push(out, push_to_hub, private) if push_to_hub else None
    result = {"out": str(out), "format": format, "files": [p.relative_to(out).as_posix() for p in written], "url": url}
    _finish(result, as_json, lambda: report.table(
        f"exported {out}" + (f" → {url}" if url else ""), ["file", "bytes"],
        [[p.relative_to(out).as_posix(), p.stat().st_size] for p in written]))


@app.command()
def status(workdir: WorkdirArg, as_json: JsonOpt = False) -> None:
    """The steps of a workdir, its size, parameter count and sparsity."""
    from llmprune import recovery

    ws = Workdir(workdir)
    manifest = ws.manifest()
    steps = manifest["steps"]
    adapter = None if not recovery.has_adapter(manifest) else (
        "unmerged" if recovery.pending_adapter(manifest) else "merged")
    size = sum((ws.path / rel).stat().st_size for rel in manifest["files"] if (ws.path / rel).is_file())
    last_metrics = next((s["metrics"] for s in reversed(steps) if "parameters" in s["metrics"]), {})
    result = {"workdir": str(workdir), "format_version": manifest["format_version"],
              "base_model": manifest.get("base_model"), "model_type": manifest.get("model_type"),
              "bytes": size, "parameters": last_metrics.get("parameters"),
              "sparsity": last_metrics.get("sparsity", {}), "adapter": adapter, "steps": steps}

    def render() -> None:
        rows = []
        for i, s in enumerate(steps, 1):
            p = {k: v for k, v in s["params"].items() if v is not None}
            brief = ", ".join(f"{k}={v}" for k, v in p.items() if k in (
                "model", "dataset", "samples", "seqlen", "method", "pattern", "sparsity", "max_windows", "structure", "ratio",
                "steps", "lam"))
            m = s["metrics"]
            if "perplexity" in m:
                key = f"ppl {m['perplexity']:.3f}"
            elif "units_removed" in m and "parameters" in m:
                key = f"{m['parameters']:,} parameters"
            elif "ppl_adapter" in m:
                key = f"held-out ppl {m['ppl_before']:.2f} → {m.get('ppl_remasked', m['ppl_adapter']):.2f}"
            elif "gap" in m:
                key = f"zeroing gap {m['gap']:.2%}"
            else:
                key = f"sparsity {m['sparsity']['all']:.2%}" if "sparsity" in m else ""
            rows.append([i, s["command"], brief, f"{s['duration_s']:.1f} s", key, s["started"]])
        report.table(f"{workdir} ({manifest.get('model_type')}, {size / 2**20:,.1f} MiB, "
                     f"{last_metrics.get('parameters', 0):,} parameters"
                     + (f", LoRA adapter {adapter}" if adapter else "") + ")",
                     ["#", "step", "parameters", "duration", "result", "started"], rows)

    _finish(result, as_json, render)


def _check_dress_choice(structure: str, select: str) -> None:
    from llmprune.methods.dress import SELECTS
    from llmprune.structured import STRUCTURES

    if structure not in STRUCTURES:
        raise UserError(f"unknown structure '{structure}'; use one of: {', '.join(STRUCTURES)}")
    if select not in SELECTS:
        raise UserError(f"unknown selection '{select}'; use one of: {', '.join(SELECTS)}")


@app.command()
def regularize(
    workdir: WorkdirArg,
    ratio: Annotated[float, typer.Option(help="Fraction of the structure's units to remove.")] = 0.25,
    structure: Annotated[str, typer.Option(help="hidden (the paper), heads (KV groups), mlp, layers.")] = "hidden",
    select: Annotated[str, typer.Option(help="activation (lowest on calibration data), tail, random.")] = "activation",
    norm: Annotated[str, typer.Option(help="group (one L2 norm per unit), l2 (per slice), l1 (element-wise).")] = "group",
    shrink: Annotated[str, typer.Option(help="prox: decoupled proximal shrink after each step; loss: penalty in the loss.")] = "prox",
    lam: Annotated[float, typer.Option("--lambda", help="Penalty strength, relative to each unit's initial norm (prox: shrink per step).")] = 0.02,
    steps: Annotated[int, typer.Option(help="Optimiser steps (the most, with --until-converged).")] = 100,
    until_converged: Annotated[bool, typer.Option(help="Stop once the selected slices are ~0 and zeroing them costs <= --gap-tol.")] = False,
    gap_tol: Annotated[float, typer.Option(help="Relative perplexity gap (zeroed vs not) that counts as converged.")] = 0.01,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (all parameters are trained).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Windows per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimiser step.")] = 1,
    holdout: Annotated[int, typer.Option(help="Calibration windows kept out of training to measure the gap.")] = 8,
    eval_every: Annotated[int, typer.Option(help="Measure the held-out gap every this many steps.")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of the data order (and of --select random).")] = 0,
    grad_checkpointing: Annotated[bool, typer.Option(help="Trade compute for activation memory.")] = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """DReSS: choose the units to remove, then train so that their information moves into the units that stay."""
    import json as _json
    import resource

    from llmprune.methods import dress
    from llmprune.modeling import save_model
    from llmprune.structured import check_supported
    from llmprune.train import TrainSpec

    _check_dress_choice(structure, select)
    if norm not in dress.NORMS:
        raise UserError(f"unknown --norm '{norm}'; use one of: {', '.join(dress.NORMS)}")
    if shrink not in dress.SHRINKS:
        raise UserError(f"unknown --shrink '{shrink}'; use one of: {', '.join(dress.SHRINKS)}")
    _positive(steps=steps, batch_size=batch_size, grad_accum=grad_accum, holdout=holdout, eval_every=eval_every)
    if lam <= 0 or lr <= 0:
        raise UserError("--lambda and --lr must be positive")
    device = _check_device(device)
    ws = _calibrated(workdir)
    params = dict(ratio=ratio, structure=structure, select=select, norm=norm, shrink=shrink, lam=lam, steps=steps,
                  until_converged=until_converged, gap_tol=gap_tol, lr=lr, batch_size=batch_size,
                  grad_accum=grad_accum, holdout=holdout, eval_every=eval_every, seed=seed,
                  grad_checkpointing=grad_checkpointing, device=device)
    with ws.step("regularize", params) as tx:
        ws.record_inputs(tx, "model")
        ws.record_inputs(tx, "calib")
        lm, tok = _load_current_model(ws, "float32")  # trained in fp32: AdamW on half-precision weights drifts
        check_supported(lm, structure)
        windows = _load_windows(ws)
        train_w, hold = _split_holdout(windows, holdout)
        plan = dress.select(lm, structure, ratio, select, windows, device, seed)
        spec = TrainSpec(steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                         grad_checkpointing=grad_checkpointing, eval_every=eval_every)
        hist = dress.regularize(lm, train_w, hold, plan, norm=norm, shrink=shrink, lam=lam,
                                spec=spec, device=device, until_converged=until_converged, gap_tol=gap_tol)
        last = hist["evals"][-1]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tx.step.metrics = {"plan": plan.to_json(), "units_removed": plan.n_units, **{k: last[k] for k in (
            "relative_norm", "ppl", "ppl_zeroed", "gap")}, "before": hist["evals"][0], "steps": hist["steps"],
            "stopped_early": hist["stopped_early"], "train_s": hist["seconds"], "peak_rss_mib": round(peak, 1),
            "loss": hist["loss"], "evals": hist["evals"]}
        d = tx.stage("dress")
        d.mkdir()
        (d / "plan.json").write_text(_json.dumps({**plan.to_json(), "regularized": True, "applied": False},
                                                 indent=1) + "\n", encoding="utf-8")
        save_model(lm, tok, tx.stage("model"), _shard_size(ws))
    m = tx.step.metrics
    result = {"workdir": str(workdir), **m}
    _finish(result, as_json, lambda: report.table(
        f"regularized {structure} {ratio:.0%} ({plan.n_units} units, {select})", ["held-out", "before", "after"],
        [["perplexity", m["before"]["ppl"], m["ppl"]], ["perplexity, units zeroed", m["before"]["ppl_zeroed"],
          m["ppl_zeroed"]], ["relative norm of the units", m["before"]["relative_norm"], m["relative_norm"]],
         ["steps", 0, m["steps"]], ["time", "", f"{m['train_s']:.1f} s"]]))


@app.command()
def recover(
    workdir: WorkdirArg,
    dataset: Annotated[Optional[str], typer.Option(help="Training text (default: the workdir's calibration windows).")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl/.json/.parquet and hf: sources.")] = "text",
    seqlen: Annotated[Optional[int], typer.Option(help="Tokens per window of --dataset (default: the calibration's).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimiser steps (default 100).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the training windows, instead of --steps.")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the adapter.")] = 2e-4,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (the update is scaled by alpha / rank).")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    targets: Annotated[str, typer.Option(help="auto (the architecture's table) or a comma list: q_proj,v_proj,...")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Windows per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimiser step.")] = 1,
    merge: Annotated[bool, typer.Option(help="Fold the adapter into the weights and re-apply the zero pattern.")] = True,
    masked: Annotated[bool, typer.Option(help="Sparse models: train the adapter through the zero pattern, so the merge loses nothing.")] = True,
    holdout: Annotated[int, typer.Option(help="Windows kept out of training for the held-out perplexity.")] = 8,
    eval_every: Annotated[int, typer.Option(help="Held-out perplexity every this many steps.")] = 25,
    save_every: Annotated[int, typer.Option(help="Checkpoint for resuming every this many steps (0: never).")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of the data order and the adapter's init.")] = 0,
    grad_checkpointing: Annotated[bool, typer.Option(help="Trade compute for activation memory.")] = False,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """LoRA recovery fine-tuning; with --merge the sparsity pattern is re-applied and verified after the merge."""
    import hashlib
    import json as _json
    import math
    import resource
    import shutil

    from llmprune import data, evaluate, recovery
    from llmprune.modeling import save_model
    from llmprune.train import TrainSpec, heldout_nll, train

    if steps is not None and epochs is not None:
        raise UserError("give --steps or --epochs, not both")
    _positive(steps=steps if steps is not None else 1, rank=rank, batch_size=batch_size, grad_accum=grad_accum,
              holdout=holdout, eval_every=eval_every)
    if epochs is not None and epochs <= 0 or lr <= 0 or alpha <= 0 or not 0 <= dropout < 1 or save_every < 0:
        raise UserError("--epochs, --lr and --alpha must be positive, --dropout in [0, 1), --save-every >= 0")
    device = _check_device(device)
    ws = _calibrated(workdir)
    manifest = ws.manifest()
    if dataset is None:
        windows = _load_windows(ws)
    else:
        seqlen = seqlen or manifest["calibration"]["seqlen"]
        text = data.load_text(dataset, "training", text_field)
    sparse = any(s["params"].get("method") not in (None, "dress") for s in ws.steps("prune"))
    params = dict(dataset=dataset, text_field=text_field, seqlen=seqlen, steps=steps, epochs=epochs, lr=lr,
                  rank=rank, alpha=alpha, dropout=dropout, targets=targets, batch_size=batch_size,
                  grad_accum=grad_accum, merge=merge, masked=masked, holdout=holdout, eval_every=eval_every, seed=seed,
                  grad_checkpointing=grad_checkpointing, device=device)
    # A checkpoint belongs to one set of parameters on one model: a changed recipe never resumes a stale run.
    key = hashlib.sha256(_json.dumps([params, {k: v for k, v in manifest["files"].items()
                                               if k.startswith("model/")}], sort_keys=True).encode()).hexdigest()
    resume_dir = ws.path / ".resume" / f"recover-{key[:16]}"
    with ws.step("recover", params) as tx:
        ws.record_inputs(tx, "model")
        lm, tok = _load_current_model(ws, "float32")
        if recovery.pending_adapter(manifest) is not None and not merge:
            # The new adapter's base is the model with the previous adapter folded in: that model becomes model/.
            save_model(lm, tok, tx.stage("model"), _shard_size(ws))
        if dataset is not None:
            _check_context(lm, seqlen)
            windows = data.eval_windows(data.tokenize(tok, text), seqlen, None)
        else:
            ws.record_inputs(tx, "calib")
        train_w, hold = _split_holdout(windows, holdout)
        n_steps = steps if steps is not None else (
            math.ceil(epochs * train_w.shape[0] / (batch_size * grad_accum)) if epochs is not None else 100)
        masks = recovery.zero_masks(lm) if sparse else {}
        sparsity_before = evaluate.summary(lm)["sparsity"]
        names = recovery.targets_for(lm, targets)
        passes = n_steps * batch_size * grad_accum / train_w.shape[0]
        if dataset is None and passes > 1 and epochs is None:
            # Measured: after DReSS (trained on these very windows) 150 steps over them raised the test perplexity
            # 45.75 -> 54.90, while fresh windows of the calibration text lowered it to 39.74.
            report.warn(f"{n_steps} steps are {passes:.1f} passes over the {train_w.shape[0]} calibration windows, "
                        "which can overfit; --dataset with the calibration text trains on fresh windows")
        model = recovery.add_lora(lm, names, rank, alpha, dropout, seed)
        masked_layers = recovery.mask_adapters(model, masks) if masked else 0
        ppl_before = math.exp(heldout_nll(model, hold))
        spec = TrainSpec(steps=n_steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                         grad_checkpointing=grad_checkpointing, eval_every=eval_every)
        hist = train(model, train_w, spec, device=device,
                     params=[p for p in model.parameters() if p.requires_grad],
                     evaluate=lambda m, step: {"ppl": round(math.exp(heldout_nll(m, hold)), 4)},
                     description="recovering", resume_dir=resume_dir, save_every=save_every)
        _save_adapter(model, tx.stage("adapter"))
        m = {"ppl_before": round(ppl_before, 4), "ppl_adapter": hist["evals"][-1]["ppl"], "steps": hist["steps"],
             "resumed_from": hist.get("resumed_from"), "train_s": hist["seconds"], "curve": hist["evals"],
             "loss": hist["loss"], "targets": names, "pruned_layers": len(masks),
             "masked_adapters": masked_layers,
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if merge:
            merged = model.merge_and_unload()
            m["ppl_merged"] = round(math.exp(heldout_nll(merged, hold)), 4)
            m["weights_remasked"] = recovery.reapply(merged, masks)
            recovery.verify(merged, masks)
            m["ppl_remasked"] = round(math.exp(heldout_nll(merged, hold)), 4)
            summ = evaluate.summary(merged)
            m.update(summ, sparsity_before=sparsity_before)
            save_model(merged, tok, tx.stage("model"), _shard_size(ws))
        m["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        tx.step.metrics = m
    shutil.rmtree(resume_dir, ignore_errors=True)  # the step committed: nothing left to resume
    result = {"workdir": str(workdir), **m}
    rows = [["held-out perplexity before", m["ppl_before"]], ["with the adapter", m["ppl_adapter"]]]
    if merge:
        rows += [["merged", m["ppl_merged"]], [f"merged, {m['weights_remasked']:,} weights re-zeroed", m["ppl_remasked"]],
                 ["sparsity", f"{m['sparsity']['all']:.2%} (before {sparsity_before['all']:.2%})"]]
    rows += [["steps", m["steps"]], ["time", f"{m['train_s']:.1f} s"]]
    _finish(result, as_json, lambda: report.table(f"recovered {workdir} (LoRA r={rank})", ["what", "value"], rows))


def _command_options() -> dict[str, dict[str, tuple[str, str]]]:
    """{command: {option key: (kind, option string)}} read from the CLI itself; keys are both the parameter name and
    the long option without dashes (``lam`` and ``lambda``)."""
    import typer.main

    group = typer.main.get_command(app)
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for name, cmd in group.commands.items():
        opts: dict[str, tuple[str, str]] = {}
        for prm in cmd.params:
            if prm.name in ("workdir", "as_json") or not getattr(prm, "opts", None) or not prm.opts[0].startswith("--"):
                continue
            entry = ("flag" if getattr(prm, "is_flag", False) else "value", prm.opts[0])
            opts[prm.name] = entry
            opts[prm.opts[0][2:].replace("-", "_")] = entry
        out[name] = opts
    return out


@app.command("run")
def run_recipe(
    workdir: WorkdirArg,
    recipe: Annotated[Path, typer.Option(help="TOML file: [[step]] tables, each a command and its options.")],
    from_step: Annotated[Optional[str], typer.Option("--from", help="Restart at this step: its number (1-based) or command name.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan (what runs, what is skipped and why); change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a whole pipeline from a recipe; a re-run skips the steps already done with the same options and inputs."""
    from llmprune import recipe as _recipe
    from llmprune import workdir as _wd

    options = _command_options()
    entries = _recipe.load(recipe, options)
    if entries[0].command != "calibrate":
        raise UserError("a recipe starts with a calibrate step, so that the whole pipeline is reproducible from it")
    _recipe.fingerprint(entries)
    ws = Workdir(workdir)
    history = ws.manifest()["steps"] if ws.exists() else []
    done = _recipe.done_prefix(entries, history)
    if from_step is not None:
        if from_step.isdigit() and 1 <= int(from_step) <= len(entries):
            start = int(from_step) - 1
        else:
            start = next((e.index for e in entries if e.command == from_step), -1)
            if start < 0:
                raise UserError(f"--from {from_step}: no such step (use 1..{len(entries)} or a command of the recipe)")
        done = min(done, start)
    recorded_done = [e for e in entries[:done] if e.command not in _recipe.NOT_RECORDED]
    restore = recorded_done[-1].fingerprint[:16] if recorded_done and len(history) != len(recorded_done) else None
    if restore and not (ws.path / _wd.SNAPSHOTS / restore).is_dir():
        done, recorded_done, restore = 0, [], None  # no state to go back to: start over
    plan = []
    for e in entries:
        if e.index < done:
            why = "skip: done with the same options and inputs"
        elif e.command in _recipe.NOT_RECORDED:
            why = "run: not recorded in the workdir, always runs"
        elif e.index < len(history) and history[e.index].get("recipe", {}).get("fingerprint") == e.fingerprint:
            why = "run: forced by --from" if from_step is not None and e.index >= done else "run"
        elif e.index < len(history):
            why = "run: its options or inputs changed" if e.index == done else "run: an earlier step changes"
        else:
            why = "run: not done yet"
        plan.append({"step": e.index + 1, "command": e.command, "action": why.split(":")[0], "why": why,
                     "argv": _recipe.argv(e, workdir, options)[2:]})
    if dry_run:
        result = {"workdir": str(workdir), "recipe": str(recipe), "dry_run": True, "restore_to_step": len(recorded_done)
                  if restore else None, "plan": plan}
        _finish(result, as_json, lambda: report.table(
            f"plan for {workdir} from {recipe}", ["#", "step", "action", "options"],
            [[p["step"], p["command"], p["why"], " ".join(p["argv"])] for p in plan]))
        return
    if restore:
        report.info(f"going back to the state after step {len(recorded_done)} (hard-linked snapshot)")
        ws.restore(restore)
    elif recorded_done:
        ws.snapshot(recorded_done[-1].fingerprint[:16])  # in case a kill came between a commit and its snapshot
    ran = []
    for e in entries[done:]:
        args = _recipe.argv(e, workdir, options)
        if e.command == "calibrate" and ws.path.exists():
            args.append("--force")  # a changed first step starts the workdir over
        report.info(f"[bold]step {e.index + 1}/{len(entries)}[/]: llmprune {' '.join(args)}")
        _wd.RECIPE_TAG = {"index": e.index, "fingerprint": e.fingerprint}
        t0 = time.perf_counter()
        try:
            rv = _invoke(args)
        finally:
            _wd.RECIPE_TAG = None
        if rv:
            if rv == 130:
                raise KeyboardInterrupt
            raise StepFailed(f"recipe step {e.index + 1} ({e.command}) exited with status {rv}")
        if e.command not in _recipe.NOT_RECORDED:
            ws.snapshot(e.fingerprint[:16])
        ran.append({"step": e.index + 1, "command": e.command, "seconds": round(time.perf_counter() - t0, 2)})
    ws.drop_snapshots({e.fingerprint[:16] for e in entries})
    steps = ws.manifest()["steps"]
    last_eval = next((s["metrics"] for s in reversed(steps) if s["command"] == "eval"), {})
    result = {"workdir": str(workdir), "recipe": str(recipe), "plan": plan, "ran": ran,
              "skipped": [p["step"] for p in plan if p["action"] == "skip"],
              "perplexity": last_eval.get("perplexity"), "parameters": last_eval.get("parameters")}
    _finish(result, as_json, lambda: report.table(
        f"{workdir}: recipe {recipe} done", ["#", "step", "result"],
        [[p["step"], p["command"], next((f"ran in {r['seconds']:.1f} s" for r in ran if r["step"] == p["step"]),
                                         "skipped (done)")] for p in plan]))


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every error into one line on stderr and an exit code (1 user error, 2 step failed,
    3 workdir busy, 4 integrity, 130 interrupted). ``LLMPRUNE_DEBUG=1`` shows tracebacks."""
    import warnings

    from llmprune import workdir as _wd

    args = sys.argv[1:] if argv is None else argv
    report.set_quiet("--json" in args)
    _wd.VERIFY = True  # each top-level command starts verifying; --no-verify turns it off for this one
    # Deprecation notices of the libraries underneath are for their developers, not for llmprune's users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    debug = os.environ.get("LLMPRUNE_DEBUG") == "1"
    try:
        rv = _invoke(args)
        if rv:
            if rv == 130:
                report.error("interrupted; the workdir is left as it was before this step")
            return rv
        return 0
    except LlmpruneError as e:
        if debug:
            raise
        report.error(str(e))
        return e.exit_code
    except (KeyboardInterrupt, EOFError):
        report.error("interrupted; the workdir is left as it was before this step")
        return 130
    except Exception as e:
        # Typer vendors its own copy of click in recent releases: recognise click's exceptions by class name.
        kinds = {c.__name__ for c in type(e).__mro__}
        if "NoArgsIsHelpError" in kinds:
            e.show()
            return 0
        if "Exit" in kinds:
            return e.exit_code
        if "Abort" in kinds:
            report.error("interrupted; the workdir is left as it was before this step")
            return 130
        if debug:
            raise
        if "UsageError" in kinds:
            ctx = getattr(e, "ctx", None)
            report.error(e.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx else ""))
            return 1
        import errno

        import torch

        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            report.error("no space left on device while writing; the workdir is left as it was before this step")
        elif isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            report.error("out of memory on the device; the workdir is left as it was before this step; try "
                         "--act-dtype bfloat16, a smaller --batch-size, or fewer calibration samples")
        elif isinstance(e, MemoryError):
            report.error("out of host memory; the workdir is left as it was before this step; try a smaller "
                         "--batch-size, --act-dtype bfloat16, or fewer calibration samples")
        else:
            report.error(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                         "(set LLMPRUNE_DEBUG=1 to see the traceback)")
        return StepFailed.exit_code


def main() -> None:
    sys.exit(run())
