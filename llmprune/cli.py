"""The command line: thin typed commands over the library, and ``run``, the one place errors become messages."""

from __future__ import annotations

import os
import sys
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

WorkdirArg = Annotated[Path, typer.Argument(help="The working directory (safetensors shards + manifest.json).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout instead of tables.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N: where each block runs.")]
BatchOpt = Annotated[int, typer.Option(help="Windows per forward pass.")]


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
    from llmprune.modeling import load_model

    ws.verify("model")
    return load_model(ws.model_dir, dtype)


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
        ctx = getattr(lm.config, "max_position_embeddings", None)
        if ctx is not None and seqlen > ctx:
            raise UserError(f"--seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
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
        save_file({"input_ids": windows.contiguous()}, calib / "windows.safetensors",
                  metadata={"source": dataset, "seed": str(seed), "seqlen": str(seqlen)})
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
    method: Annotated[str, typer.Option(help="magnitude, wanda, sparsegpt, wandapp (dress: coming).")] = "wanda",
    sparsity: Annotated[Optional[float], typer.Option(help="Fraction of weights to remove (implied by N:M).")] = None,
    pattern: Annotated[str, typer.Option(help="unstructured, 2:4, 4:8 (any N:M: N kept of every M).")] = "unstructured",
    blocksize: Annotated[int, typer.Option(help="SparseGPT: columns per block.")] = 128,
    damp: Annotated[float, typer.Option(help="SparseGPT: damping, as a fraction of the mean Hessian diagonal.")] = 0.01,
    alpha: Annotated[float, typer.Option(help="Wanda++: weight of the regional gradient in the RGS score.")] = 100.0,
    act_norm: Annotated[str, typer.Option(help="Wanda++: ||X_j|| as 'sum' over all tokens (paper) or 'mean' (Wanda code).")] = "sum",
    ro_iters: Annotated[int, typer.Option(help="Wanda++: rounds of regional optimisation (0: RGS only).")] = 5,
    ro_samples: Annotated[int, typer.Option(help="Wanda++: samples drawn per RO round.")] = 32,
    ro_lr: Annotated[float, typer.Option(help="Wanda++: RMSprop learning rate of RO.")] = 3e-7,
    seed: Annotated[int, typer.Option(help="Wanda++: seed of the RO sample draws.")] = 0,
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
        raise UserError(f"--method {method} is not yet implemented in this version of llmprune")
    if method not in METHODS:
        raise UserError(f"unknown method '{method}'; use one of: {', '.join(METHODS)}")
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
    ws = Workdir(workdir)
    if not ws.steps("calibrate"):
        raise UserError(f"{workdir} has no calibration; run `llmprune calibrate` first")
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


def _shard_size(ws: Workdir) -> str:
    return ws.steps("calibrate")[0]["params"].get("max_shard_size", "2GB")


@app.command("eval")
def eval_(
    workdir: WorkdirArg,
    dataset: Annotated[Optional[str], typer.Option(help="Evaluation source (default: the test split of the calibration dataset).")] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl/.json/.parquet and hf: sources.")] = "text",
    device: DeviceOpt = "cpu",
    batch_size: BatchOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity, parameter count and sparsity per layer type; recorded as a step."""
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
    params = dict(dataset=dataset, seqlen=seqlen, max_windows=max_windows, text_field=text_field, device=device,
                  batch_size=batch_size)
    with ws.step("eval", params) as tx:
        ws.record_inputs(tx, "model")
        lm, tok = _load_current_model(ws)
        ctx = getattr(lm.config, "max_position_embeddings", None)
        if ctx is not None and seqlen > ctx:
            raise UserError(f"--seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
        windows = data.eval_windows(data.tokenize(tok, text), seqlen, max_windows)
        ppl = evaluate.perplexity(lm, windows, device, batch_size)
        tx.step.metrics = {**ppl, **evaluate.summary(lm)}
    m = tx.step.metrics
    result = {"workdir": str(workdir), "dataset": dataset, **m}
    _finish(result, as_json, lambda: report.table(
        f"eval {workdir} on {dataset}", ["metric", "value"],
        [["perplexity", m["perplexity"]], ["windows", f"{m['windows']} × {seqlen}"], ["parameters", m["parameters"]]]
        + [[f"sparsity {k}", f"{v:.2%}"] for k, v in m["sparsity"].items()]))


@app.command()
def export(
    workdir: WorkdirArg,
    out: Annotated[Path, typer.Option(help="Folder to write (must be new or empty).")],
    push_to_hub: Annotated[Optional[str], typer.Option(help="Also upload to this Hub repo id.")] = None,
    private: Annotated[bool, typer.Option(help="Create the Hub repo as private.")] = False,
    dry_run: Annotated[bool, typer.Option(help="List what would be written and uploaded; change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a clean Hugging Face folder with a model card, and optionally push it to the Hub."""
    from llmprune import export as _export

    ws = Workdir(workdir)
    manifest = ws.manifest()
    ws.verify("model")
    if dry_run:
        files = _export.planned_files(ws.model_dir)
        result = {"dry_run": True, "out": str(out), "push_to_hub": push_to_hub,
                  "files": [{"path": p, "bytes": b} for p, b in files]}
        _finish(result, as_json, lambda: report.table(
            f"would write {out}" + (f" and upload to {push_to_hub}" if push_to_hub else ""), ["file", "bytes"],
            [[p, b if p != "README.md" else "(model card)"] for p, b in files]))
        return
    if push_to_hub:
        from huggingface_hub import get_token

        if not get_token():  # check before writing anything
            raise UserError("no Hugging Face token: run `hf auth login` or set HF_TOKEN before --push-to-hub")
    written = _export.build_folder(ws.model_dir, manifest, out)
    url = _export.push(out, push_to_hub, private) if push_to_hub else None
    result = {"out": str(out), "files": [p.relative_to(out).as_posix() for p in written], "url": url}
    _finish(result, as_json, lambda: report.table(
        f"exported {out}" + (f" → {url}" if url else ""), ["file", "bytes"],
        [[p.relative_to(out).as_posix(), p.stat().st_size] for p in written]))


@app.command()
def status(workdir: WorkdirArg, as_json: JsonOpt = False) -> None:
    """The steps of a workdir, its size, parameter count and sparsity."""
    ws = Workdir(workdir)
    manifest = ws.manifest()
    steps = manifest["steps"]
    size = sum((ws.path / rel).stat().st_size for rel in manifest["files"] if (ws.path / rel).is_file())
    last_metrics = next((s["metrics"] for s in reversed(steps) if "parameters" in s["metrics"]), {})
    result = {"workdir": str(workdir), "format_version": manifest["format_version"],
              "base_model": manifest.get("base_model"), "model_type": manifest.get("model_type"),
              "bytes": size, "parameters": last_metrics.get("parameters"),
              "sparsity": last_metrics.get("sparsity", {}), "steps": steps}

    def render() -> None:
        rows = []
        for i, s in enumerate(steps, 1):
            p = {k: v for k, v in s["params"].items() if v is not None}
            brief = ", ".join(f"{k}={v}" for k, v in p.items() if k in (
                "model", "dataset", "samples", "seqlen", "method", "pattern", "sparsity", "max_windows"))
            m = s["metrics"]
            key = f"ppl {m['perplexity']:.3f}" if "perplexity" in m else (
                f"sparsity {m['sparsity']['all']:.2%}" if "sparsity" in m else "")
            rows.append([i, s["command"], brief, f"{s['duration_s']:.1f} s", key, s["started"]])
        report.table(f"{workdir} ({manifest.get('model_type')}, {size / 2**20:,.1f} MiB, "
                     f"{last_metrics.get('parameters', 0):,} parameters)",
                     ["#", "step", "parameters", "duration", "result", "started"], rows)

    _finish(result, as_json, render)


@app.command()
def regularize(workdir: WorkdirArg) -> None:
    """DReSS: regularise the channels that will be removed (not yet implemented)."""
    raise UserError("`llmprune regularize` (DReSS) is not yet implemented in this version")


@app.command()
def recover(workdir: WorkdirArg) -> None:
    """LoRA recovery fine-tuning that keeps the sparsity exact (not yet implemented)."""
    raise UserError("`llmprune recover` (LoRA recovery) is not yet implemented in this version")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and turn every error into one line on stderr and an exit code (1 user error, 2 step failed,
    3 workdir busy, 4 integrity, 130 interrupted). ``LLMPRUNE_DEBUG=1`` shows tracebacks."""
    args = sys.argv[1:] if argv is None else argv
    report.set_quiet("--json" in args)
    debug = os.environ.get("LLMPRUNE_DEBUG") == "1"
    try:
        app(args=args, prog_name="llmprune", standalone_mode=False)
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
        import torch

        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            report.error("out of memory on the device; try --act-dtype bfloat16, a smaller --batch-size, "
                         "or fewer calibration samples")
        else:
            report.error(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                         "(set LLMPRUNE_DEBUG=1 to see the traceback)")
        return StepFailed.exit_code


def main() -> None:
    sys.exit(run())
