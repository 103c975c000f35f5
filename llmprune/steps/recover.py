"""The ``recover`` step: recovery fine-tuning -- LoRA (peft) or all weights (``--full``), on the LM loss or distilled
from the dense teacher (``--distill``) -- with the sparsity kept exact (``llmprune.recovery`` says how)."""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from llmprune import data, distill, evaluate, memory, report, resume
from llmprune.current import dense_parameters, load_current, pending_adapter
from llmprune.distill import (KD_OPTIONS, distill_option, kd_temperature_option, kd_weight_option, resolve_options,
                              teacher_option, teacher_steps_option)
from llmprune.errors import UserError
from llmprune.modeling import save_model
from llmprune.options import (batch_option, check_all, check_device, device_option, grad_checkpointing_option, option,
                              memory_check_option, precision_option, schedule_option,
                              positive, specs, text_field_option)
from llmprune.precision import training_precision
from llmprune.recovery import add_lora, is_sparse, mask_adapters, save_adapter, targets_for, verify
from llmprune.stats import exp_nll
from llmprune.steps import KINDS
from llmprune.steps.base import Step
from llmprune import train as training
from llmprune.train import (TrainSpec, check_launcher, mixture_windows, passes, split_holdout, train, windows_digest,
                            warn_repeated_windows)
from llmprune.units import reapply, zero_masks
from llmprune.workdir import Workdir

LORA = "LoRA"
LORA_DEFAULTS = {"rank": 8, "alpha": 16.0, "dropout": 0.05, "masked": True}


@dataclass(frozen=True)
class RecoverOptions:
    """What ``llmprune recover`` was asked for; recorded as the step's parameters, in this order (``prepare`` fills
    in what was left to a default: the LoRA settings, the KD settings)."""

    dataset: Optional[str] = option(None, "Training text (default: the workdir's calibration windows); a mixture as "
                                    "SOURCE:SHARE,... (a.txt:0.7,b.jsonl:0.3) takes windows of each source in its "
                                    "share (distillation: teacher logits over the mixture).")
    text_field: str = text_field_option()
    seqlen: Optional[int] = option(None, "Tokens per window of --dataset (default: the calibration's).")
    steps: Optional[int] = option(None, "Optimiser steps (default 100).", check=positive)
    epochs: Optional[float] = option(None, "Passes over the training windows, instead of --steps.", check=positive)
    # None: 2e-4 for LoRA, 2e-5 for --full
    lr: Optional[float] = option(None, "AdamW learning rate (default: 2e-4 for LoRA, 2e-5 with --full).",
                                 check=positive)
    # Named --lora-*: prune's --alpha is Wanda++'s gradient weight; the short names stay accepted.
    rank: Optional[int] = option(None, f"LoRA rank (default {LORA_DEFAULTS['rank']}; also --rank).", check=positive,
                                 panel=LORA, flag="--lora-rank", aliases=("--rank",))
    alpha: Optional[float] = option(None, "LoRA alpha (the update is scaled by alpha / rank; default "
                                    f"{LORA_DEFAULTS['alpha']:g}; also --alpha).", check=positive, panel=LORA,
                                    flag="--lora-alpha", aliases=("--alpha",))
    dropout: Optional[float] = option(None, f"LoRA dropout (default {LORA_DEFAULTS['dropout']}; also --dropout).",
                                      panel=LORA, flag="--lora-dropout", aliases=("--dropout",))
    targets: str = option("auto", "auto (the architecture's table) or a comma list: q_proj,v_proj,...", panel=LORA)
    schedule: str = schedule_option()
    batch_size: int = batch_option(1, "Windows per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimiser step.", check=positive)
    merge: bool = option(True, "Fold the adapter into the weights and re-apply the zero pattern.", panel=LORA)
    masked: Optional[bool] = option(None, "Sparse models: train the adapter through the zero pattern, so the merge "
                                    "loses nothing (default on).", flag="--masked/--no-masked", panel=LORA)
    holdout: int = option(8, "Windows kept out of training for the held-out perplexity.", check=positive)
    eval_every: int = option(25, "Held-out perplexity every this many steps.", check=positive)
    seed: int = option(0, "Seed of the data order and the adapter's init.")
    grad_checkpointing: bool = grad_checkpointing_option()
    device: str = device_option("where the model is trained")
    precision: str = precision_option()
    memory_check: bool = memory_check_option()
    full: bool = option(False, "Train every weight instead of a LoRA adapter (structured models have no zeros to "
                        "keep; a sparse model's pattern is re-applied after each step).", flag="--full")
    distill: bool = distill_option()
    kd_temperature: Optional[float] = kd_temperature_option()
    kd_weight: Optional[float] = kd_weight_option()  # the KD share of the loss; the rest is the LM loss
    teacher: Optional[str] = teacher_option()  # None: the workdir's teacher/
    teacher_steps: int = teacher_steps_option("; on both benchmark models distillation beat the LM loss only after "
                                              "it. Kept as one fp32 copy beside the resume checkpoint until the step "
                                              "commits")
    # not a parameter of the result: a resumed run with another value is the same run
    save_every: int = option(25, "Checkpoint for resuming every this many steps (0: never).")

    @property
    def learning_rate(self) -> float:
        # Full fine-tuning moves every weight: the step LoRA's small adapters take would wreck a pruned model.
        return self.lr if self.lr is not None else (2e-5 if self.full else 2e-4)

    def prepare(self) -> RecoverOptions:
        """Checked, with the defaults left open filled in: what the step runs with and records."""
        if self.steps is not None and self.epochs is not None:
            raise UserError("give --steps or --epochs, not both")
        if self.dataset is None and self.seqlen is not None:
            raise UserError("--seqlen sets the windows of --dataset; without it the calibration windows are used")
        if self.dataset is None and self.text_field != "text":
            raise UserError("--text-field names the field of --dataset's records; give --dataset")
        if self.full and self.targets != "auto":
            raise UserError("--targets names the Linears LoRA adapts; --full trains every weight (drop one of them)")
        if self.full and not self.merge:
            raise UserError("--full trains the weights themselves: there is no adapter to keep unmerged (drop "
                            "--no-merge)")
        flags = {o.name: o.flag for o in specs(RecoverOptions)}
        lora = [flags[n] for n in LORA_DEFAULTS if getattr(self, n) is not None]
        if self.full and lora:
            raise UserError(f"{', '.join(lora)} set the LoRA adapter; --full trains every weight (drop one of them)")
        temperature, weight = resolve_options(self.distill, self.kd_temperature, self.kd_weight, self.teacher,
                                              self.teacher_steps)
        o = dataclasses.replace(self, kd_temperature=temperature, kd_weight=weight, **{
            n: d for n, d in LORA_DEFAULTS.items() if getattr(self, n) is None})
        check_launcher()
        check_all(o)
        if not 0 <= o.dropout < 1 or o.save_every < 0:
            raise UserError("--lora-dropout must be in [0, 1) and --save-every >= 0")
        device = check_device(o.device)
        return dataclasses.replace(o, device=device, precision=training_precision(o.precision, device))

    def params(self) -> dict[str, Any]:
        p = {k: v for k, v in asdict(self).items() if k != "save_every"}
        p["lr"] = self.learning_rate
        if not self.distill:  # the KD settings do not apply: a plain run records what it always did
            for k in KD_OPTIONS:
                del p[k]
        if not self.teacher_steps:  # recorded only when the teacher was corrected: older records stay as they were
            del p["teacher_steps"]
        if self.schedule == "constant":  # the rate every run had before the option existed: recorded as before
            del p["schedule"]
        return p


def run(ws: Workdir, o: RecoverOptions) -> dict[str, Any]:
    """Recovery fine-tuning (LoRA, or every weight with --full) on the LM loss or distilled from the dense teacher
    (--distill); with --merge the sparsity pattern is re-applied and verified after the merge."""
    o = o.prepare()
    return Recovery(ws.require_calibration(), o).run()


def after_regularize(manifest: dict, windows: torch.Tensor, seed: int) -> int:
    """The windows of ``windows``' seeded order that the workdir's last ``regularize`` trained on, when it was given
    the very same windows and seed (``--dataset`` naming the text it trained on; its default, the calibration text,
    is the one recover's ``--dataset`` then names): recovery starts after them. Retraining on them made recovery
    after DReSS worse on held-out text than no recovery at all (docs/benchmarks.md, "Generalisation")."""
    reg = next((s for s in reversed(manifest["steps"]) if s["command"] == "regularize"), None)
    m = reg["metrics"] if reg else {}
    if m.get("windows_sha256") != windows_digest(windows) or m.get("seed") != seed:
        return 0
    n = int(m["windows_seen"])
    report.info(f"recover starts after the {min(n, windows.shape[0])} of these {windows.shape[0]} windows that "
                "regularize trained on" + (" (every one: it repeats them)" if n >= windows.shape[0] else ""))
    return n


class Recovery:
    """The ``recover`` step, in order: setup (the model, the data, the adapter) -> train -> save (the adapter, and
    with ``merge`` the merged model with its zero pattern re-applied and verified)."""

    def __init__(self, ws: Workdir, opts: RecoverOptions):
        self.ws, self.opts = ws, opts
        self.manifest = ws.manifest()

    def _resume_dir(self, text: str | list | None) -> Path:
        """Where this run's checkpoint lives (``llmprune.resume``): keyed on the parameters, the model's files, the
        training text's contents and, when distilling, the teacher (with a teacher correction the kept teacher
        belongs to the teacher's files too: a recalibrated teacher/)."""
        o = self.opts
        folders = ("model", "teacher") if o.distill and o.teacher_steps else ("model",)
        inputs = {"text": data.text_digest(text) if text is not None else None,
                  "teacher": resume.path_stamp(o.teacher) if o.distill and o.teacher else None}
        return resume.checkpoint_dir(self.ws.path, "recover", [o.params(), resume.files_under(self.manifest, *folders),
                                                               inputs])

    def run(self) -> dict[str, Any]:
        o = self.opts
        started = time.time()
        text = data.training_text(o.dataset, o.text_field) if o.dataset is not None else None
        self.resume_dir = self._resume_dir(text)
        windows = self.ws.windows() if o.dataset is None else None  # before the step: fail fast on bad input
        training.load_libraries()
        self.memory = memory.training_check(
            self.ws.path / "model", memory.Setting(
                batch=o.batch_size, seqlen=o.seqlen or self.manifest["calibration"]["seqlen"], full=o.full,
                lora_rank=o.rank, lora_dropout=o.dropout > 0, grad_checkpointing=o.grad_checkpointing,
                precision=o.precision, teacher_parameters=dense_parameters(self.manifest) if o.distill else 0),
            o.device, "recover", o.memory_check)
        with self.ws.step("recover", o.params()) as tx:
            self.ws.record_inputs(tx, "model")
            model, hold, masks = self._setup(tx, text, windows)
            hist = self._train(model, hold, masks)
            m = self._save(tx, model, hold, masks, hist)
            tx.step.metrics = m
        resume.clear(self.ws.path, "recover", self.resume_dir, started)
        return m

    def _setup(self, tx, text: str | None, windows: torch.Tensor | None):
        o = self.opts
        lm, self.tok = load_current(self.ws, "float32")
        if pending_adapter(self.manifest) is not None and not o.merge:
            # The new adapter's base is the model with the previous adapter folded in: that model becomes model/.
            save_model(lm, self.tok, tx.stage("model"), self.ws.shard_size)
        if text is not None:
            windows = mixture_windows(lm, self.tok, text if isinstance(text, list) else [data.Part(o.dataset, 1.0, text)],
                                      o.seqlen or self.manifest["calibration"]["seqlen"], o.seed)
        else:
            self.ws.record_inputs(tx, "calib")
        self.train_w, hold = split_holdout(windows, o.holdout)
        self.passed = after_regularize(self.manifest, self.train_w, o.seed)
        self.n_steps = o.steps if o.steps is not None else (
            math.ceil(o.epochs * self.train_w.shape[0] / (o.batch_size * o.grad_accum)) if o.epochs is not None
            else 100)
        self.names = ["all"] if o.full else targets_for(lm, o.targets)  # bad --targets fail before any warning
        masks = zero_masks(lm) if is_sparse(self.manifest) else {}
        self.sparsity_before = evaluate.summary(lm)["sparsity"]
        self.distiller = None
        if o.distill:
            if o.teacher is None:
                self.ws.record_inputs(tx, distill.TEACHER)
            teacher, self.correction = distill.prepare_teacher(
                self.ws, o.teacher, lm, self.tok, self.train_w, hold, o.teacher_steps, where=self.resume_dir,
                keep=bool(o.save_every), seed=o.seed, batch_size=o.batch_size, grad_accum=o.grad_accum,
                grad_checkpointing=o.grad_checkpointing, device=o.device, precision=o.precision)
            self.distiller = distill.Distiller(teacher, o.kd_temperature, o.kd_weight)
        if o.dataset is None and o.epochs is None:
            # Fresh windows of the calibration text are what generalises after DReSS, which already trained on these
            # windows (benchmarks/README.md has the measurement).
            n = self.train_w.shape[0]
            warn_repeated_windows(self.n_steps, passes(self.n_steps, o.batch_size, o.grad_accum, n), n)
        if o.full:
            self.masked_layers = 0
            return lm.requires_grad_(True), hold, masks
        model = add_lora(lm, self.names, o.rank, o.alpha, o.dropout, o.seed)
        self.masked_layers = mask_adapters(model, masks) if o.masked else 0
        return model, hold, masks

    def _train(self, model, hold: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
        o = self.opts
        report.info(memory.report_line(self.memory))
        self.ppl_before = exp_nll(training.heldout_nll(model, hold))
        spec = TrainSpec(steps=self.n_steps, lr=o.learning_rate, schedule=o.schedule, passed=self.passed,
                         batch_size=o.batch_size, grad_accum=o.grad_accum, seed=o.seed, grad_checkpointing=o.grad_checkpointing,
                         eval_every=o.eval_every, precision=o.precision)
        # All weights trained on a sparse model: the pattern comes back after each step, so it holds throughout.
        keep = (lambda m, step, lr: reapply(m, masks)) if o.full and masks else None
        return train(model, self.train_w, spec, device=o.device,
                     params=[p for p in model.parameters() if p.requires_grad], after_step=keep,
                     evaluate=lambda m, step: {"ppl": round(exp_nll(training.heldout_nll(m, hold)), 4)},
                     description="distilling" if o.distill else "recovering", resume_dir=self.resume_dir,
                     save_every=o.save_every, distiller=self.distiller)

    def _save(self, tx, model, hold: torch.Tensor, masks: dict[str, torch.Tensor], hist: dict[str, Any]) -> dict[str, Any]:
        o = self.opts
        m = {"ppl_before": round(self.ppl_before, 4), "steps": hist["steps"], "memory_estimate": self.memory,
             "resumed_from": hist.get("resumed_from"), "train_s": hist["seconds"], "curve": hist["evals"],
             "loss": hist["loss"], "targets": self.names, "pruned_layers": len(masks),
             "masked_adapters": self.masked_layers, "mode": "full" if o.full else "lora",
             "objective": "distill" if o.distill else "lm",
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "windows_passed": self.passed,
             **({"sharding": hist["sharding"]} if "sharding" in hist else {})}
        if o.distill:
            m.update(kd=hist["kd"], final_kd=hist["final_kd"],
                     teacher_parameters=sum(p.numel() for p in self.distiller.teacher.parameters()))
            if o.teacher_steps:
                m["teacher_correction"] = self.correction
        if o.full:
            verify(model, masks)  # re-applied after every step: a failure here is a bug, not a merge cost
            m["ppl_after"] = hist["evals"][-1]["ppl"]
            m.update(evaluate.summary(model), sparsity_before=self.sparsity_before)
            save_model(model, self.tok, tx.stage("model"), self.ws.shard_size)
        else:
            save_adapter(model, tx.stage("adapter"))
            m["ppl_adapter"] = m["ppl_after"] = hist["evals"][-1]["ppl"]
        if o.merge and not o.full:
            merged = model.merge_and_unload()
            m["ppl_merged"] = round(exp_nll(training.heldout_nll(merged, hold)), 4)
            m["weights_remasked"] = reapply(merged, masks)
            verify(merged, masks)
            m["ppl_remasked"] = m["ppl_after"] = round(exp_nll(training.heldout_nll(merged, hold)), 4)
            m.update(evaluate.summary(merged), sparsity_before=self.sparsity_before)
            save_model(merged, self.tok, tx.stage("model"), self.ws.shard_size)
        m["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return m


STEP = Step("recover", RecoverOptions, run, "Recovery fine-tuning (LoRA, or every weight with --full) on the LM loss "
            "or distilled from the dense teacher (--distill); with --merge the sparsity pattern is re-applied and "
            "verified after the merge.", kind=KINDS["recover"])
