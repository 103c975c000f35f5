"""One training loop for every step that trains (DReSS ``regularize``, LoRA ``recover``), through ``accelerate``.

Going through ``accelerate`` means the same loop runs on one CPU, one GPU, or many processes under ``accelerate
launch`` (DDP on gloo or NCCL) without a code change: the data loader is sharded and gradients are averaged by the
wrapper. Under an FSDP launch the loop trains a sharded twin of the model (``sharding``) and gathers its weights
back at the end, so callers hold a plain module before and after either way. Hooks let each caller add to the loss
(a penalty), act after each optimiser step (a proximal shrink) and measure every few steps (a held-out perplexity, a
stopping test).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from llmprune import report, sharding
from llmprune.arch import arch_for, blocks
from llmprune.report import progress


@dataclass
class TrainSpec:
    steps: int  # optimiser steps (the upper bound when ``stop`` is given)
    lr: float
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    grad_checkpointing: bool = False
    eval_every: int = 0  # 0: only at the end
    precision: str = "fp32"  # or "bf16": autocast passes, fp32 weights and optimizer state (precision.py)
    schedule: str = "constant"  # or "cosine": a linear warmup, then a cosine decay to zero (``rate``)
    passed: int = 0  # windows of the seeded order a previous step trained on: training starts after them


WARMUP = 0.1  # of the steps, for the cosine schedule


def rate(step: int, steps: int, lr: float, schedule: str) -> float:
    """The learning rate of optimiser step ``step`` (1-based) of ``steps``. ``constant``: ``lr`` throughout (what
    DReSS's proximal step needs: every step shrinks alike). ``cosine``: a linear warmup over the first ``WARMUP`` of
    the steps -- a fresh AdamW moves every weight by about ``lr`` at its first steps, whatever the gradient -- then
    a half cosine to zero (Loshchilov & Hutter 2017, "SGDR", eq. 5 with one cycle), so the last steps average out
    the noise of single-window batches instead of ending on one."""
    if schedule == "constant":
        return lr
    warm = max(1, round(WARMUP * steps))
    if step <= warm:
        return lr * step / warm
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def check_launcher() -> None:
    """Refuse a launch the training steps cannot honour, before any work: an FSDP configuration other than the one
    ``sharding`` implements (FSDP2 over 2 or more processes)."""
    from llmprune.errors import UserError

    if sharding.requested() and (problem := sharding.config_problem()):
        raise UserError(f"FSDP: {problem}")


def load_libraries() -> None:
    """Import what training runs on (accelerate; peft for LoRA) now rather than at its first use: a memory check
    measures this process's size as the base the step stands on, and these libraries are part of it."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401


def accelerator(device: str, grad_accum: int = 1, precision: str = "fp32"):
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    check_launcher()
    if sharding.processes() == 1:
        # accelerate keeps one device setting per process (a shared state, set by the first Accelerator): without
        # this, a CPU run earlier in the process (a test session, a recipe) keeps a later --device cuda run on the
        # CPU. Under a launch the state holds the process group and is left alone.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    # Under FSDP accelerate runs as a plain multi-process launch (process group, data sharding, mixed precision) and
    # ``sharding`` shards the model: accelerate 1.15 would not shard on the CPU, and its own FSDP wrapping would hide
    # the parameters the penalty and the masks write.
    fsdp = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        return Accelerator(cpu=device == "cpu", gradient_accumulation_steps=grad_accum,
                           mixed_precision="bf16" if precision == "bf16" else "no")
    finally:
        if fsdp is not None:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp


def _cycle(loader: Iterable) -> Iterable:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def train(
    model: nn.Module,
    windows: torch.Tensor,
    spec: TrainSpec,
    *,
    device: str = "cpu",
    params: list[nn.Parameter] | None = None,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module, int, float], None] | None = None,
    evaluate: Callable[[nn.Module, int], dict[str, Any]] | None = None,
    stop: Callable[[dict[str, Any]], bool] | None = None,
    description: str = "training",
    resume_dir: Path | None = None,
    save_every: int = 0,
    distiller=None,
) -> dict[str, Any]:
    """Train ``model`` on the token ``windows`` with the language-modelling loss (plus ``extra_loss``), or with
    ``distiller`` (``distill.Distiller``) its mix of the teacher's KD loss and the LM loss.

    ``after_step(model, step, lr)`` runs after every optimiser step; ``evaluate(model, step)`` every
    ``spec.eval_every`` steps and at the end, and ``stop(metrics)`` may end training early. Returns the history:
    the mean LM loss of every step (and with a distiller the mean KD loss, ``kd``), the evaluations, the steps taken
    and the wall time.

    With ``resume_dir``, the trainable parameters, the optimiser state and the history are saved there every
    ``save_every`` steps (safetensors + JSON), and a run that finds a checkpoint there continues from it: same data
    order, same optimiser state, so an interrupted run and an uninterrupted one end in the same place.
    """
    acc, wrapped, opt, loader, trainable = _prepare(model, windows, spec, device, params)
    if distiller is not None:
        distiller.to(acc.device)  # each process holds its own frozen teacher; it is never wrapped or trained
    t0 = time.perf_counter()
    step, history, batches = _start(loader, spec, resume_dir, trainable, opt, distiller is not None)
    if wrapped is not model and sharding.requested():
        history["sharding"] = sharding.record(wrapped)
    acc_loss, acc_kd, micro = 0.0, 0.0, 0
    stopped = False
    with progress(description, total=spec.steps) as advance:
        advance(step)
        for (ids,) in batches:
            for group in opt.param_groups:  # the rate of the step this micro-batch belongs to (resumes exactly)
                group["lr"] = rate(step + 1, spec.steps, spec.lr, spec.schedule)
            loss, kd = _micro_step(acc, wrapped, opt, ids, distiller, extra_loss, step)
            acc_loss, acc_kd, micro = acc_loss + loss, acc_kd + kd, micro + 1
            if not acc.sync_gradients:
                continue
            step += 1
            lm = acc.gather(torch.tensor([acc_loss / micro], device=acc.device)).mean().item()
            history["loss"].append(round(lm, 5))
            if distiller is not None:
                history["kd"].append(round(acc.gather(torch.tensor([acc_kd / micro], device=acc.device)).mean().item(), 5))
            acc_loss, acc_kd, micro = 0.0, 0.0, 0
            if after_step:
                after_step(acc.unwrap_model(wrapped), step, spec.lr)
            last = step == spec.steps
            if evaluate and ((spec.eval_every and step % spec.eval_every == 0) or last):
                wrapped.eval()
                metrics = {"step": step, **evaluate(acc.unwrap_model(wrapped), step)}
                wrapped.train()
                history["evals"].append(metrics)
                if stop and stop(metrics):
                    stopped = True
            advance(note=f"loss {lm:.3f}" + (f", kd {history['kd'][-1]:.3f}" if distiller is not None else ""))
            if resume_dir is not None and save_every and step % save_every == 0 and not (last or stopped):
                _checkpoint(acc, resume_dir, step, history, trainable, opt)
            if last or stopped:
                break
    model = _finish(acc, wrapped, model, opt, spec)
    history.update(steps=step, stopped_early=stopped, seconds=round(time.perf_counter() - t0, 2),
                   final_loss=_mean_tail(history["loss"]))
    if distiller is not None:
        history["final_kd"] = _mean_tail(history["kd"])
    return history


def _finish(acc, wrapped, model: nn.Module, opt, spec: TrainSpec) -> nn.Module:
    """The trained model, plain, in eval mode: unwrapped from DDP, or its weights gathered back from the sharded
    twin (FSDP); accelerate's references released."""
    if wrapped is not model and sharding.requested():
        opt.state.clear()  # the moments' shards go before the whole weights come back (memory.estimate: gathered)
        sharding.gather(wrapped, model)  # the trained weights, whole, back in the model the caller holds
    else:
        model = acc.unwrap_model(wrapped)
    if spec.grad_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    acc.free_memory()
    return model


def _start(loader, spec: TrainSpec, resume_dir: Path | None, trainable, opt, kd: bool):
    """``(step, history, batches)``: from the checkpoint in ``resume_dir`` if there is one (its step, its history, the
    batches after those it consumed, in the same seeded order), else from the start."""
    history: dict[str, Any] = {"loss": [], "evals": [], **({"kd": []} if kd else {})}
    # ``passed`` windows in micro-batches of this run (each micro-batch takes batch_size windows on every process)
    step, skip = 0, spec.passed // windows_seen(1, spec.batch_size, 1)
    resumed = load_checkpoint(resume_dir, trainable, opt, spec.steps) if resume_dir is not None else None
    if resumed is not None:
        step, history = resumed
        skip += step * spec.grad_accum  # micro-batches already consumed, in the same seeded order
        history["resumed_from"] = step
    batches = _cycle(loader)
    for _ in range(skip):
        next(batches)
    return step, history, batches


def _prepare(model: nn.Module, windows: torch.Tensor, spec: TrainSpec, device: str,
             params: list[nn.Parameter] | None):
    """``(accelerator, wrapped model, optimiser, loader, trainable parameters)``, seeded: the data order is the same
    on every run (what a resumed run relies on)."""
    from torch.utils.data import DataLoader, TensorDataset

    acc = accelerator(device, spec.grad_accum, spec.precision)
    torch.manual_seed(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    loader = DataLoader(TensorDataset(windows), batch_size=spec.batch_size, shuffle=True, generator=gen,
                        drop_last=windows.shape[0] >= spec.batch_size)
    if spec.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    if sharding.requested():
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's blocks
        if arch_for(base.config.model_type).experts:
            from llmprune.errors import UserError

            raise UserError("FSDP: models with experts are not supported yet (their 3-D expert weights would be "
                            "sharded by expert); run this step with DDP (accelerate launch --num_processes N)")
        # The trainable parameters are the sharded twin's: every parameter of the model with requires_grad.
        wrapped = sharding.shard(model, blocks(base), acc.device)
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.0)
        opt, loader = acc.prepare(opt, loader)
        return acc, wrapped, opt, loader, trainable
    trainable = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.0)  # constant rate: every step shrinks alike
    wrapped, opt, loader = acc.prepare(model, opt, loader)
    return acc, wrapped, opt, loader, trainable


def _micro_step(acc, wrapped, opt, ids: torch.Tensor, distiller, extra_loss, step: int) -> tuple[float, float]:
    """One micro-batch: forward, the objective (LM loss, or the distiller's mix; plus ``extra_loss``), backward and
    the optimiser step accelerate applies once the accumulation is complete. Returns (LM loss, KD loss or 0)."""
    kd_value = 0.0
    with acc.accumulate(wrapped):
        with acc.autocast():  # bf16 training: the teacher's forward too (a no-op in fp32)
            if distiller is None:
                loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
                objective = loss
            else:
                objective, loss, kd = distiller.objective(ids, wrapped(input_ids=ids, use_cache=False).logits)
                kd_value = kd.item()
        extra = extra_loss(acc.unwrap_model(wrapped)) if extra_loss else None
        total = objective + extra if extra is not None else objective
        if not torch.isfinite(total):
            raise FloatingPointError(f"the training loss became {total.item()} at step {step + 1}; "
                                     "lower the learning rate")
        acc.backward(total)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item(), kd_value


def _checkpoint(acc, resume_dir: Path, step: int, history: dict[str, Any], trainable, opt) -> None:
    """Save the run's state (main process), every process waiting for it; a full disk costs the checkpoint only."""
    tensors = checkpoint_tensors(trainable, opt, keep=acc.is_main_process)  # every process: FSDP gathers
    if acc.is_main_process:
        try:
            save_checkpoint(resume_dir, step, history, tensors)
        except OSError as e:
            report.warn(f"could not write the checkpoint of step {step} ({e}); training goes on, and an "
                        "interrupted run resumes from an earlier checkpoint, if any")
    acc.wait_for_everyone()


STATE_JSON = "state.json"
# Each checkpoint's tensors go to a file named for its step, and state.json, written last, names the file it
# completes: a kill after the tensors and before the JSON leaves the previous checkpoint whole (its JSON still
# names its own file), instead of its tensors replaced and the pair discarded as damaged.
STATE_TENSORS = "state-{step:08d}.safetensors"


def _state_digest(meta: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def checkpoint_tensors(params: list[nn.Parameter], opt, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trainable parameters and their AdamW state, whole, on the CPU (``keep``: this process writes them).
    Sharded (FSDP) tensors are gathered: a collective every process takes part in, so a checkpoint is the same
    file whether one process or many trained (and resumes under either)."""
    tensors = {}
    sharded = any(sharding.is_sharded(p) for p in params)
    if not (keep or sharded):
        return tensors
    for i, p in enumerate(params):
        entries = [(f"param.{i}", p.detach())] + [(f"{k}.{i}", v if torch.is_tensor(v) else torch.tensor(v))
                                                   for k, v in opt.state.get(p, {}).items()]
        for key, t in entries:
            whole = sharding.full(t.detach())
            if keep:
                tensors[key] = whole.cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()  # LoRA dropout draws continue where they stopped
    return tensors


def save_checkpoint(where: Path, step: int, history: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The ``checkpoint_tensors`` as safetensors, step and history as JSON (no pickle), written atomically: the
    JSON, written last, is what marks the checkpoint complete; it holds the tensors' SHA-256 and its own, so a
    damaged checkpoint is recognised instead of trusted."""
    from safetensors.torch import save_file

    from llmprune.fsio import atomic_write_text, sha256_file

    where.mkdir(parents=True, exist_ok=True)
    params = [k for k in tensors if k.startswith("param.")]
    name = STATE_TENSORS.format(step=step)
    tmp = where / (name + ".tmp")
    save_file(tensors, tmp)
    tmp.replace(where / name)
    meta = {"step": step, "history": history, "params": len(params), "tensors": name,
            "tensors_sha256": sha256_file(where / name)}
    atomic_write_text(where / STATE_JSON, json.dumps({**meta, "sha256": _state_digest(meta)}))
    for old in where.glob("state*.safetensors*"):  # the previous checkpoint's, now superseded
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(where: Path, params: list[nn.Parameter], opt, max_step: int) -> tuple[int, dict[str, Any]] | None:
    """The step and history of the checkpoint in ``where``, its state loaded into ``params`` and ``opt``; or None
    when there is none. A checkpoint that does not verify (damaged JSON or tensors, another run's parameters, a step
    outside this run) is discarded with a warning, and the run starts afresh."""
    import shutil

    from safetensors.torch import load_file

    from llmprune import report
    from llmprune.fsio import sha256_file

    if not (where / STATE_JSON).is_file():
        return None
    try:
        meta = json.loads((where / STATE_JSON).read_text(encoding="utf-8"))
        digest = meta.pop("sha256", None) if isinstance(meta, dict) else None
        if digest is None or digest != _state_digest(meta):
            raise ValueError("its state.json was changed or truncated")
        tensors_file = where / str(meta["tensors"])
        if tensors_file.parent != where or sha256_file(tensors_file) != meta["tensors_sha256"]:
            raise ValueError("its tensors were changed or truncated")
        if meta["params"] != len(params):
            raise ValueError("it is for another set of trainable parameters")
        if not isinstance(meta["step"], int) or not 0 < meta["step"] < max_step:
            raise ValueError(f"its step {meta['step']!r} is outside this run's 1..{max_step - 1}")
        tensors = load_file(tensors_file)
        for i, p in enumerate(params):
            if tensors[f"param.{i}"].shape != p.shape:
                raise ValueError("its parameters have other shapes")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        report.warn(f"discarding the checkpoint in {where}: {e}; this step starts afresh")
        shutil.rmtree(where, ignore_errors=True)
        return None
    torch.set_rng_state(tensors.pop("rng.cpu"))
    with torch.no_grad():
        for i, p in enumerate(params):
            rows, start = sharding.local(p)  # under FSDP, this process's rows of the whole tensors saved
            rows.copy_(tensors[f"param.{i}"][start:start + rows.shape[0]])
            state = {k.rsplit(".", 1)[0]: sharding.like(v, p) for k, v in tensors.items()
                     if k.endswith(f".{i}") and not k.startswith("param.")}
            if state:
                opt.state[p] = state
    report.info(f"resuming from the checkpoint of step {meta['step']} of {max_step} ({where})")
    return meta["step"], meta["history"]


def _mean_tail(xs: list[float], n: int = 10) -> float:
    tail = xs[-n:]
    return round(sum(tail) / len(tail), 5) if tail else math.nan


def text_windows(model: nn.Module, tok, text: str | torch.Tensor, seqlen: int) -> torch.Tensor:
    """Fresh training windows of ``seqlen`` tokens cut from ``text`` (``--dataset`` of recover and regularize; or
    its token ids, already tokenized), a copy: the text and its tokens need not outlive them."""
    from llmprune import data
    from llmprune.modeling import check_context

    check_context(model, seqlen)
    ids = data.tokenize(tok, text) if isinstance(text, str) else text
    return data.eval_windows(ids, seqlen, None).clone()


def mixture_windows(model: nn.Module, tok, parts: list, seqlen: int, seed: int) -> torch.Tensor:
    """Training windows of a mixture (``data.Part``s with their texts): each part cut into fresh windows, then as
    many taken from each as its share of the largest total that needs no part's window twice, in a seeded order that
    interleaves the parts (so the held-out windows, the last ones, are a sample of the mixture too). A single part
    is its windows as ``text_windows`` cuts them, unchanged."""
    if len(parts) == 1:
        return text_windows(model, tok, parts[0].text, seqlen)
    cut = [text_windows(model, tok, p.text, seqlen) for p in parts]
    total = min(w.shape[0] / p.weight for w, p in zip(cut, parts))  # the most windows every part can supply
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for w, p in zip(cut, parts):
        n = max(1, min(w.shape[0], round(p.weight * total)))
        chosen.append(w[torch.randperm(w.shape[0], generator=gen)[:n]])
    mixed = torch.cat(chosen)
    return mixed[torch.randperm(mixed.shape[0], generator=gen)].clone()


def windows_digest(windows: torch.Tensor) -> str:
    """SHA-256 of a step's training windows (token ids): how a later step knows it was given the same windows."""
    import hashlib

    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def windows_seen(steps: int, batch_size: int, grad_accum: int) -> int:
    """Windows ``steps`` optimiser steps trained on, over every process of a launch."""
    return steps * batch_size * grad_accum * sharding.processes()


def passes(steps: int, batch_size: int, grad_accum: int, windows: int) -> float:
    """Passes over ``windows`` that ``steps`` optimiser steps make; under ``accelerate launch`` each step takes
    every process's batch."""
    return windows_seen(steps, batch_size, grad_accum) / windows


def warn_repeated_windows(steps: int, n_passes: float, windows: int, hint: str | None = None) -> None:
    """More than one pass over the calibration windows can overfit them (benchmarks/README.md: DReSS at 200 steps).
    ``hint``: what to do instead (default: name the calibration text with --dataset)."""
    if n_passes > 1:
        from llmprune import report

        hint = "; --dataset with the calibration text trains on fresh windows" if hint is None else hint
        report.warn(f"{steps} steps are {n_passes:.1f} passes over the {windows} calibration windows, which can "
                    f"overfit{hint}")


def split_holdout(windows: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows): the last ``holdout`` windows are never trained on."""
    from llmprune.errors import UserError

    if windows.shape[0] <= holdout:
        raise UserError(f"--holdout {holdout} leaves no training windows (there are {windows.shape[0]})")
    return windows[:-holdout], windows[-holdout:]


@torch.no_grad()
def heldout_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token NLL of ``model`` (in memory, on its current device) over ``windows``."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s : s + batch_size].to(dev)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()  # the logits go at once, not
        n = ids.shape[0] * (ids.shape[1] - 1)  # beside the next batch's (memory.estimate's evaluation phase)
        nll += loss * n
        count += n
    if was_training:
        model.train()
    return nll / count
