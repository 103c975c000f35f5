"""The ``regularize`` step (DReSS's first half): choose the units to remove, train the whole model while their slices
are driven to zero (``penalty``), and record the plan that ``prune --method dress`` then applies. Resumable from its
checkpoints (``resume``); distilled from the workdir's teacher with ``--distill``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from llmprune import report, sharding, structures
from llmprune.distill import (KD_OPTIONS, distill_option, kd_temperature_option, kd_weight_option, resolve_options,
                              teacher_option, teacher_steps_option)
from llmprune.errors import UserError
from llmprune.methods.dress import DEFAULT_RATIO, DEFAULT_SELECT, DEFAULT_STRUCTURE, resolve_budget, search_combination
from llmprune.penalty import NORMS, SHRINKS, regularize
from llmprune.planfile import PlanRecord
from llmprune.precision import training_precision
from llmprune.options import (batch_option, check_all, check_device, device_option, fraction_open,
                              grad_checkpointing_option, memory_check_option, non_negative, option, positive,
                              precision_option,
                              text_field_option)
from llmprune.selection import SELECTS, check_choice, select
from llmprune.steps import KINDS
from llmprune.steps.base import Step
from llmprune.structured import STRUCTURES, Plan, align_ratio, check_supported, geometry, width_multiple_option
from llmprune.train import check_launcher, windows_digest, windows_seen
from llmprune.workdir import Workdir


@dataclass(frozen=True)
class RegularizeOptions:
    """What ``llmprune regularize`` was asked for; recorded as the step's parameters, in this order (``prepare``
    resolves what was left to a default: ``--ratio``, the KD settings)."""

    ratio: Optional[float] = option(None, f"Fraction of the structure's units to remove (default {DEFAULT_RATIO}).",
                                    check=fraction_open, show_default=False)
    structure: str = option(DEFAULT_STRUCTURE, "hidden (the paper), heads (KV groups), mlp, layers, experts (MoE: whole "
                            "routed experts).", choices=STRUCTURES, strict=False)
    select: str = option(DEFAULT_SELECT, "activation (lowest on calibration data; REAP for experts), tail, random; "
                         "experts also reap, frequency.", choices=SELECTS)
    norm: str = option("group", "group (one L2 norm per unit), l2 (per slice), l1 (element-wise).", choices=NORMS)
    shrink: str = option("prox", "prox: decoupled proximal shrink after each step; loss: penalty in the loss.",
                         choices=SHRINKS)
    lam: float = option(0.02, "Penalty strength, relative to each unit's initial norm (prox: shrink per step).",
                        flag="--lambda", check=positive)
    steps: int = option(100, "Optimiser steps (the most, with --until-converged).", check=positive)
    until_converged: bool = option(False, "Stop once the selected slices are ~0 and zeroing them costs <= --gap-tol.")
    gap_tol: float = option(0.01, "Relative perplexity gap (zeroed vs not) that counts as converged.",
                            check=non_negative)
    lr: float = option(1e-4, "AdamW learning rate (all parameters are trained).", check=positive)
    batch_size: int = batch_option(1, "Windows per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimiser step.", check=positive)
    holdout: int = option(8, "Windows kept out of training to measure the gap (of the training text's fresh windows, "
                          "or of the calibration windows with --calibration-windows); a combination's split is scored "
                          "on as many calibration windows.", check=positive)
    eval_every: int = option(25, "Measure the held-out gap every this many steps.", check=positive)
    seed: int = option(0, "Seed of the data order (and of --select random).")
    grad_checkpointing: bool = grad_checkpointing_option()
    device: str = device_option("where the model is trained")
    precision: str = precision_option()
    memory_check: bool = memory_check_option()
    distill: bool = distill_option()
    kd_temperature: Optional[float] = kd_temperature_option()
    kd_weight: Optional[float] = kd_weight_option()
    teacher: Optional[str] = teacher_option()
    target_params: Optional[str] = option(None, "A parameter budget instead of --ratio: a count (100M, 1.5B) or a "
                                          "fraction of the model (0.75).")
    width_multiple: int = width_multiple_option()
    search_steps: int = option(0, "A combination's budget: score each candidate split after this many regularisation "
                               "steps of a copy (0: by direct removal, cheaper, but it favours fine structures).",
                               check=non_negative)
    dataset: Optional[str] = option(None, "Training text, in fresh windows (default: the calibration text, read "
                                    "again; the units, and a combination's split, are chosen on the calibration "
                                    "windows either way); a mixture as SOURCE:SHARE,... (a.txt:0.7,b.jsonl:0.3) "
                                    "takes windows of each source in its share.")
    text_field: str = text_field_option()
    seqlen: Optional[int] = option(None, "Tokens per window of the training text (default: the calibration's).")
    teacher_steps: int = teacher_steps_option(", in memory")
    # Train on the calibration windows themselves. Default: fresh windows of the calibration text (as if it were
    # given as --dataset), which is what the record then names.
    calibration_windows: bool = option(False, "Train on the calibration windows themselves instead of fresh windows "
                                       "of the calibration text (the earlier default; more than one pass over them "
                                       "can overfit).", flag="--calibration-windows")
    # not a parameter of the result: a resumed run with another value is the same run
    save_every: int = option(25, "Checkpoint for resuming every this many steps (0: never): every weight and AdamW's "
                             "two moments, about three fp32 copies of the model on disk until the step commits.",
                             check=non_negative)

    def prepare(self) -> RegularizeOptions:
        """Checked, with the defaults left open filled in: what the step runs with and records."""
        temperature, weight = resolve_options(self.distill, self.kd_temperature, self.kd_weight, self.teacher,
                                              self.teacher_steps)
        check_all(self)
        if self.ratio is not None and self.target_params is not None:
            raise UserError("give --ratio or --target-params, not both")
        o = dataclasses.replace(self, ratio=DEFAULT_RATIO if self.ratio is None else self.ratio,
                                kd_temperature=temperature, kd_weight=weight)
        o.check()
        check_launcher()
        if sharding.requested():
            if o.shrink == "loss":
                raise UserError("FSDP: --shrink loss puts the penalty's gradient beside the sharded gradients, which "
                                "is not implemented; use --shrink prox (the default) or DDP")
            if not all(structures.STRUCTURES[s].zeroing_removes for s in o.structure.split("+")):
                raise UserError(f"FSDP: --structure {o.structure} measures its gap on the model with the units "
                                "removed, which a sharded model cannot be; run it with DDP")
        device = check_device(o.device)
        return dataclasses.replace(o, device=device, precision=training_precision(o.precision, device))

    def params(self) -> dict[str, Any]:
        p = dataclasses.asdict(self)
        del p["calibration_windows"]  # a record without a dataset trained on the calibration windows, as always
        del p["save_every"]
        if self.target_params is None:
            del p["target_params"]
        if not self.search_steps:  # scored by removal, as before the option existed
            del p["search_steps"]
        if self.width_multiple == 1:  # widths as the ratio gives them, as before the option existed
            del p["width_multiple"]
        if self.dataset is None:  # trained on the calibration windows: recorded as before the option existed
            for k in ("dataset", "text_field", "seqlen"):
                del p[k]
        if not self.distill:  # the KD settings do not apply: a plain run records what it always did
            for k in ("distill", *KD_OPTIONS):
                del p[k]
        if not self.teacher_steps:  # recorded only when the teacher was corrected: older records stay as they were
            del p["teacher_steps"]
        return p

    def check(self) -> None:
        check_choice(self.structure, self.select)
        if self.teacher is not None and not self.distill:
            raise UserError("--teacher names the model to distil from: add --distill")
        if self.calibration_windows and self.dataset is not None:
            raise UserError("--calibration-windows trains on the calibration windows, --dataset on another text's: "
                            "give one of them")
        if self.text_field != "text" and self.dataset is None:
            raise UserError("--text-field names the field of --dataset's records; give --dataset")
        if self.seqlen is not None and self.calibration_windows:
            raise UserError("--seqlen sets the windows of the training text; --calibration-windows trains on the "
                            "calibration windows as they are")
        if self.seqlen is not None and self.seqlen < 2:
            raise UserError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.search_steps and not ("+" in self.structure and self.target_params is not None):
            raise UserError("--search-steps scores the splits of a combination's budget: give --structure A+B "
                            "with --target-params")


def calibration_text(ws: Workdir, o: RegularizeOptions) -> tuple[str | None, RegularizeOptions, str | None]:
    """The default training text of ``regularize``: the calibration text, read again, so that training takes fresh
    windows of it (thousands on a real corpus) instead of the 64 calibration windows, which 100 steps pass over
    1.8 times and longer runs overfit (benchmarks/README.md: 23.59 against 25.69 test perplexity at the defaults on
    SmolLM2, 21.86 against 39.13 at 200 steps). Returns (text, the options naming it as --dataset, None), or
    (None, the options unchanged, why not) when the text cannot be read again (moved, or offline)."""
    from llmprune import data

    manifest = ws.manifest()
    source = manifest["calibration"]["source"]
    calibrate = next((s for s in manifest["steps"] if s["command"] == "calibrate"), None)
    field = (calibrate or {}).get("params", {}).get("text_field", "text")
    try:
        text = data.load_text(source, "calibration", field)
    except (UserError, OSError) as e:
        if o.seqlen is not None:
            raise UserError(f"--seqlen sets the windows of the calibration text, which cannot be read again ({e}); "
                            "give --dataset") from None
        return None, o, f"the calibration text cannot be read again ({e})"
    return text, dataclasses.replace(o, dataset=source, text_field=field), None


def stale_calibration_text(ws: Workdir, ids: torch.Tensor, windows: torch.Tensor) -> str | None:
    """Why the text read again is not the one ``calibrate`` cut its windows from (``None`` when it is): its windows
    are drawn again as calibrate drew them and compared token for token -- a changed file, or a relative path that
    now names another file, cannot pass."""
    from llmprune import data

    cal = ws.manifest()["calibration"]
    if ids.numel() != cal.get("source_tokens"):
        return f"the calibration text {cal['source']} has {ids.numel():,} tokens now, {cal.get('source_tokens'):,} " \
               "when calibrate read it"
    again = data.random_windows(ids, cal["samples"], cal["seqlen"], cal["seed"])
    if not torch.equal(again.to(windows.dtype), windows):
        return f"the calibration text {cal['source']} is not the text calibrate read"
    return None


def training_windows(ws: Workdir, lm: nn.Module, tok, text: str | list | None, windows: torch.Tensor,
                     o: RegularizeOptions, default_text: bool, fallback: str | None):
    """(training windows, held-out windows, the options as trained, why the calibration windows were used instead of
    the default text, or None). Fresh windows of ``text`` when there is one -- made before any search, so bad input
    fails first -- else the calibration ``windows``. The default text (``default_text``: the calibration text read
    again) falls back to the calibration windows when it is not the text calibrate read, or, cut into
    non-overlapping windows, gives no more of them than calibrate's overlapping ones; an explicit ``--seqlen`` is
    refused there instead of being ignored. A mixture (a list of ``data.Part``, ``--dataset a:0.7,b:0.3``) gives
    its windows in its shares (``train.mixture_windows``)."""
    from llmprune import data
    from llmprune.train import mixture_windows, split_holdout, text_windows

    if isinstance(text, list):
        fresh = mixture_windows(lm, tok, text, o.seqlen or ws.manifest()["calibration"]["seqlen"], o.seed)
        return (*split_holdout(fresh, o.holdout), o, None)
    if text is not None:
        seqlen = o.seqlen or ws.manifest()["calibration"]["seqlen"]
        ids = data.tokenize(tok, text)
        fallback = stale_calibration_text(ws, ids, windows) if default_text else None
        fresh = None if fallback else text_windows(lm, tok, ids, seqlen)  # a copy: the tokens are not kept
        if default_text and fresh is not None and o.seqlen is None and fresh.shape[0] <= windows.shape[0]:
            fallback = (f"the calibration text gives {fresh.shape[0]} fresh windows of {seqlen} tokens, no more than "
                        f"the {windows.shape[0]} calibration windows")
        if fallback and o.seqlen is not None:
            raise UserError(f"--seqlen sets the windows of the calibration text, but {fallback}; give --dataset")
        if not fallback:
            return (*split_holdout(fresh, o.holdout), o, None)
        o = dataclasses.replace(o, dataset=None, text_field="text")
    return (*split_holdout(windows, o.holdout), o, fallback)


def run(ws: Workdir, o: RegularizeOptions) -> dict[str, Any]:
    """The ``regularize`` step: choose the units, train the whole model while they are driven to zero, and record
    the plan as regularised and pending (``prune --method dress`` applies it)."""
    o = o.prepare()
    ws.require_calibration()
    from llmprune import data, distill, resume
    from llmprune.current import load_current
    from llmprune.modeling import save_model
    from llmprune import train as training
    from llmprune.train import TrainSpec, passes, warn_repeated_windows

    started = time.time()
    text = data.training_text(o.dataset, o.text_field) if o.dataset is not None else None  # fail fast
    fallback = None
    default_text = o.dataset is None and not o.calibration_windows
    if default_text:
        text, o, fallback = calibration_text(ws, o)
    from llmprune import memory
    from llmprune.current import dense_parameters

    manifest = ws.manifest()
    training.load_libraries()
    estimate = memory.training_check(ws.path / "model", memory.Setting(
        batch=o.batch_size, seqlen=o.seqlen or manifest["calibration"]["seqlen"], full=True,
        grad_checkpointing=o.grad_checkpointing, precision=o.precision,
        teacher_parameters=dense_parameters(manifest) if o.distill else 0), o.device, "regularize", o.memory_check)
    with ws.step("regularize", o.params()) as tx:
        ws.record_inputs(tx, "model")
        ws.record_inputs(tx, "calib")
        lm, tok = load_current(ws, "float32")  # trained in fp32: AdamW on half-precision weights drifts
        check_supported(lm, o.structure)
        windows = ws.windows()
        train_w, hold, o, fallback = training_windows(ws, lm, tok, text, windows, o, default_text, fallback)
        del text
        tx.step.params = o.params()  # a fallback trained on the calibration windows: recorded without the text
        n_passes = passes(o.steps, o.batch_size, o.grad_accum, train_w.shape[0])
        o, combined, budget = _resolve_ratio(ws, lm, o)
        tx.step.params["ratio"] = o.ratio
        plan = combined or select(lm, o.structure, o.ratio, o.select, windows, o.device, o.seed)
        where = resume_dir(ws, o, tx.step.params, plan, train_w, hold) if o.save_every else None
        distiller, correction = None, None
        if o.distill:
            if o.teacher is None:
                ws.record_inputs(tx, distill.TEACHER)
            teacher, correction = distill.prepare_teacher(
                ws, o.teacher, lm, tok, train_w, hold, o.teacher_steps, where=where, keep=True, seed=o.seed,
                batch_size=o.batch_size, grad_accum=o.grad_accum, grad_checkpointing=o.grad_checkpointing,
                device=o.device, precision=o.precision)
            distiller = distill.Distiller(teacher, o.kd_temperature, o.kd_weight)
        if fallback is not None:  # only once the plan holds: a refused one needs no warning before it
            report.warn(f"training on the {train_w.shape[0]} calibration windows: {fallback}; give --dataset to "
                        "train on fresh windows of a text, or --calibration-windows to say so")
        if o.dataset is None:
            warn_repeated_windows(o.steps, n_passes, train_w.shape[0], "" if fallback else
                                  "; without --calibration-windows regularize trains on fresh windows of the "
                                  "calibration text")
        spec = TrainSpec(steps=o.steps, lr=o.lr, batch_size=o.batch_size, grad_accum=o.grad_accum, seed=o.seed,
                         grad_checkpointing=o.grad_checkpointing, eval_every=o.eval_every, precision=o.precision)
        report.info(memory.report_line(estimate))
        hist = regularize(lm, train_w, hold, plan, norm=o.norm, shrink=o.shrink, lam=o.lam, spec=spec,
                          device=o.device, until_converged=o.until_converged, gap_tol=o.gap_tol, distiller=distiller,
                          resume_dir=where, save_every=o.save_every)
        tx.step.metrics = _record(o, plan, hist, train_w, n_passes, estimate, budget, correction)
        PlanRecord(plan, regularized=True, applied=False).write(tx)
        save_model(lm, tok, tx.stage("model"), ws.shard_size)
    resume.clear(ws.path, "regularize", where, started)  # with --save-every 0 too: older runs' are stale now
    return tx.step.metrics


def resume_dir(ws: Workdir, o: RegularizeOptions, params: dict[str, Any], plan: Plan, train_w: torch.Tensor,
               hold: torch.Tensor):
    """Where this run's checkpoint lives (``llmprune.resume``): keyed on the parameters as recorded, the model's and
    the calibration's files, the units chosen, the training and held-out windows themselves (whatever text made
    them) and the teacher -- a checkpoint resumes only the run that wrote it."""
    from llmprune import distill, resume

    folders = ("model", "calib", *((distill.TEACHER,) if o.distill and o.teacher is None else ()))
    teacher = resume.path_stamp(o.teacher) if o.distill and o.teacher else None
    return resume.checkpoint_dir(ws.path, "regularize", [
        params, resume.files_under(ws.manifest(), *folders), plan.to_json(), resume.tensor_digest(train_w),
        resume.tensor_digest(hold), teacher])


def _resolve_ratio(ws: Workdir, lm, o: RegularizeOptions):
    """``(options, combined plan or None, budget or None)``: a combination's split searched for its budget (ratio 0
    recorded), a single structure's budget as the ratio reaching it, that ratio aligned by ``--width-multiple``."""
    if "+" in o.structure:
        if o.target_params is None:
            raise UserError(f"--structure {o.structure} splits a parameter budget between its structures: give "
                            "--target-params (100M, or 0.75 of the model)")
        combined, budget = search_combination(lm, o.structure, o.target_params, o.select, ws.windows(), o.device,
                                              o.seed, o.holdout, regularized=o)
        return dataclasses.replace(o, ratio=0.0), combined, budget
    budget = None
    if o.target_params is not None:
        budget = resolve_budget(lm, o.structure, o.target_params)
        o = dataclasses.replace(o, ratio=budget["ratio"])
    if o.width_multiple != 1:
        o = dataclasses.replace(o, ratio=align_ratio(geometry(lm), o.structure, o.ratio, o.width_multiple))
    return o, None, budget


def _record(o, plan, hist: dict, train_w, n_passes: float, estimate: dict, budget, correction) -> dict[str, Any]:
    """The regularize step's metrics."""
    import resource

    last = hist["evals"][-1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"plan": plan.to_json(), "units_removed": plan.n_units, **{k: last[k] for k in (
        "relative_norm", "ppl", "ppl_zeroed", "gap")}, "before": hist["evals"][0], "steps": hist["steps"],
        "stopped_early": hist["stopped_early"], "resumed_from": hist.get("resumed_from"),
        "train_s": hist["seconds"], "train_windows": train_w.shape[0],
        # what recover needs to continue after these windows when it is given the same ones (same text and seed)
        "windows_seen": windows_seen(hist["steps"], o.batch_size, o.grad_accum),
        "windows_sha256": windows_digest(train_w), "seed": o.seed,
        "trained_on": o.dataset if o.dataset is not None else "calibration windows",
        "passes": round(n_passes * hist["steps"] / o.steps, 3), **({"seqlen": train_w.shape[1]} if o.dataset else {}),
        "peak_rss_mib": round(peak, 1), "memory_estimate": estimate, "loss": hist["loss"], "evals": hist["evals"],
        **({"budget": budget} if budget else {}),
        **({"kd": hist["kd"], "final_kd": hist["final_kd"]} if o.distill else {}),
        **({"teacher_correction": correction} if correction else {}),
        **({"sharding": hist["sharding"]} if "sharding" in hist else {})}


STEP = Step("regularize", RegularizeOptions, run, "DReSS: choose the units to remove, then train so that their "
            "information moves into the units that stay.", kind=KINDS["regularize"])
