"""Recovery fine-tuning -- LoRA (peft) or all weights (``--full``), on the LM loss or distilled from the dense
teacher (``--distill``, ``distill.py``) -- that keeps the sparsity exact.

Merging a LoRA update ``B @ A`` into a sparse weight makes it dense again: the product is dense. (The Wanda
repository's issue #83 reports 40% sparsity falling to 32.7% after a merge.) So the zero pattern of every pruned
weight is recorded *before* training and re-applied after the merge, and the step reports what that costs. Weights of
structurally pruned models (DReSS) hold no zeros to keep and merge plainly. Full fine-tuning of a sparse model
re-applies the pattern after every optimiser step (AdamW's momentum would otherwise grow the pruned weights back).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import units
from llmprune.units import reapply, zero_masks
from llmprune import resume
from llmprune.errors import StepFailed, UserError
from llmprune.stats import exp_nll
from llmprune.workdir import Workdir


@dataclass(frozen=True)
class RecoverOptions:
    """What ``llmprune recover`` was asked for; recorded as the step's parameters, in this order."""

    dataset: str | None = None  # None: the calibration windows
    text_field: str = "text"
    seqlen: int | None = None  # windows of ``dataset`` (None: the calibration's)
    steps: int | None = None
    epochs: float | None = None
    lr: float | None = None  # None: 2e-4 for LoRA, 2e-5 for --full
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str = "auto"
    batch_size: int = 1
    grad_accum: int = 1
    merge: bool = True
    masked: bool = True
    holdout: int = 8
    eval_every: int = 25
    seed: int = 0
    grad_checkpointing: bool = False
    device: str = "cpu"
    full: bool = False  # every weight trainable instead of a LoRA adapter
    distill: bool = False
    kd_temperature: float = 1.0
    kd_weight: float = 1.0  # the KD share of the loss; the rest is the LM loss
    teacher: str | None = None  # None: the workdir's teacher/
    teacher_steps: int = 0  # teacher correction: steps of full fine-tuning of the teacher first (0: none)
    save_every: int = 25  # not a parameter of the result: a resumed run with another value is the same run

    @property
    def learning_rate(self) -> float:
        # Full fine-tuning moves every weight: the step LoRA's small adapters take would wreck a pruned model.
        return self.lr if self.lr is not None else (2e-5 if self.full else 2e-4)

    def params(self) -> dict[str, Any]:
        p = {k: v for k, v in asdict(self).items() if k != "save_every"}
        p["lr"] = self.learning_rate
        if not self.distill:  # the KD settings do not apply: a plain run records what it always did
            from llmprune.distill import KD_OPTIONS

            for k in KD_OPTIONS:
                del p[k]
        if not self.teacher_steps:  # recorded only when the teacher was corrected: older records stay as they were
            del p["teacher_steps"]
        return p


def is_sparse(manifest: dict[str, Any]) -> bool:
    """Whether a prune step left a zero pattern to keep: its record says so (``zero_pattern``). A step recorded
    before that field existed is asked of the method registry (a method this version does not know: keep its
    zeros)."""
    from llmprune.methods import METHODS

    for s in manifest["steps"]:
        if s["command"] != "prune":
            continue
        if "zero_pattern" in s["metrics"]:
            if s["metrics"]["zero_pattern"]:
                return True
            continue
        method = METHODS.get(s["params"].get("method"))
        if method is None or method.exact_zeros:
            return True
    return False


class Recovery:
    """The ``recover`` step, in order: setup (the model, the data, the adapter) -> train -> save (the adapter, and
    with ``merge`` the merged model with its zero pattern re-applied and verified)."""

    def __init__(self, ws: Workdir, opts: RecoverOptions):
        self.ws, self.opts = ws, opts
        self.manifest = ws.manifest()

    def _resume_dir(self, text: str | None) -> Path:
        """Where this run's checkpoint lives (``llmprune.resume``): keyed on the parameters, the model's files, the
        training text's contents and, when distilling, the teacher (with a teacher correction the kept teacher
        belongs to the teacher's files too: a recalibrated teacher/)."""
        o = self.opts
        folders = ("model", "teacher") if o.distill and o.teacher_steps else ("model",)
        inputs = {"text": hashlib.sha256(text.encode()).hexdigest() if text is not None else None,
                  "teacher": resume.path_stamp(o.teacher) if o.distill and o.teacher else None}
        return resume.checkpoint_dir(self.ws.path, "recover", [o.params(), resume.files_under(self.manifest, *folders),
                                                               inputs])

    def run(self) -> dict[str, Any]:
        from llmprune import data

        o = self.opts
        started = time.time()
        text = data.load_text(o.dataset, "training", o.text_field) if o.dataset is not None else None
        self.resume_dir = self._resume_dir(text)
        windows = self.ws.windows() if o.dataset is None else None  # before the step: fail fast on bad input
        with self.ws.step("recover", o.params()) as tx:
            self.ws.record_inputs(tx, "model")
            model, hold, masks = self._setup(tx, text, windows)
            hist = self._train(model, hold, masks)
            m = self._save(tx, model, hold, masks, hist)
            tx.step.metrics = m
        resume.clear(self.ws.path, "recover", self.resume_dir, started)
        return m

    def _setup(self, tx, text: str | None, windows: torch.Tensor | None):
        from llmprune import distill, evaluate
        from llmprune.current import load_current, pending_adapter
        from llmprune.modeling import save_model
        from llmprune.train import (
            passes,
            split_holdout,
            text_windows,
            warn_repeated_windows,
        )

        o = self.opts
        lm, self.tok = load_current(self.ws, "float32")
        if pending_adapter(self.manifest) is not None and not o.merge:
            # The new adapter's base is the model with the previous adapter folded in: that model becomes model/.
            save_model(lm, self.tok, tx.stage("model"), self.ws.shard_size)
        if text is not None:
            windows = text_windows(lm, self.tok, text, o.seqlen or self.manifest["calibration"]["seqlen"])
        else:
            self.ws.record_inputs(tx, "calib")
        self.train_w, hold = split_holdout(windows, o.holdout)
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
                grad_checkpointing=o.grad_checkpointing, device=o.device)
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
        from llmprune.train import TrainSpec, heldout_nll, train

        o = self.opts
        self.ppl_before = exp_nll(heldout_nll(model, hold))
        spec = TrainSpec(steps=self.n_steps, lr=o.learning_rate, batch_size=o.batch_size, grad_accum=o.grad_accum,
                         seed=o.seed, grad_checkpointing=o.grad_checkpointing, eval_every=o.eval_every)
        # All weights trained on a sparse model: the pattern comes back after each step, so it holds throughout.
        keep = (lambda m, step, lr: reapply(m, masks)) if o.full and masks else None
        return train(model, self.train_w, spec, device=o.device,
                     params=[p for p in model.parameters() if p.requires_grad], after_step=keep,
                     evaluate=lambda m, step: {"ppl": round(exp_nll(heldout_nll(m, hold)), 4)},
                     description="distilling" if o.distill else "recovering", resume_dir=self.resume_dir,
                     save_every=o.save_every, distiller=self.distiller)

    def _save(self, tx, model, hold: torch.Tensor, masks: dict[str, torch.Tensor], hist: dict[str, Any]) -> dict[str, Any]:
        import resource

        from llmprune import evaluate
        from llmprune.modeling import save_model
        from llmprune.train import heldout_nll

        o = self.opts
        m = {"ppl_before": round(self.ppl_before, 4), "steps": hist["steps"],
             "resumed_from": hist.get("resumed_from"), "train_s": hist["seconds"], "curve": hist["evals"],
             "loss": hist["loss"], "targets": self.names, "pruned_layers": len(masks),
             "masked_adapters": self.masked_layers, "mode": "full" if o.full else "lora",
             "objective": "distill" if o.distill else "lm",
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
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
            m["ppl_merged"] = round(exp_nll(heldout_nll(merged, hold)), 4)
            m["weights_remasked"] = reapply(merged, masks)
            verify(merged, masks)
            m["ppl_remasked"] = m["ppl_after"] = round(exp_nll(heldout_nll(merged, hold)), 4)
            m.update(evaluate.summary(merged), sparsity_before=self.sparsity_before)
            save_model(merged, self.tok, tx.stage("model"), self.ws.shard_size)
        m["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return m


def save_adapter(model, out: Path) -> None:
    """The adapter as safetensors + adapter_config.json. Its base is the workdir's model, whose path is no part of
    the result: leave it out (peft would record this machine's absolute path) and skip peft's generated card."""
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = None  # peft fills it in from the model at save time
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def targets_for(model: nn.Module, targets: str) -> list[str]:
    """``auto``: the architecture table's LoRA targets; otherwise a comma list of Linear names (``q_proj,...``)."""
    names = list(_arch.arch_for(model.config.model_type).lora_targets) if targets == "auto" else [
        t.strip() for t in targets.split(",") if t.strip()]
    present = {n.rsplit(".", 1)[-1] for block in _arch.blocks(model) for n in units.block_linears(block)
               if not n.endswith("]")}
    if targets == "auto":  # the table's names this model has (an all-sparse MoE has no dense MLP Linears)
        names = [n for n in names if n in present]
    missing = [n for n in names if n not in present]
    experts = _arch.arch_for(model.config.model_type).experts
    fused = [n for n in missing if experts and n in dict(experts.params)]
    if fused:
        raise UserError(f"--targets {', '.join(fused)}: LoRA on 3-D expert parameters is not supported; the routed "
                        "experts stay as they are (adapt the attention, and any shared expert)")
    if not names or missing:
        raise UserError(f"--targets {targets}: no Linear named {', '.join(missing) or '(none given)'} in this "
                        f"model's blocks; it has {', '.join(sorted(present)) or 'none'}")
    return names


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # the adapters' A matrices are drawn at random: the same seed, the same run
    layers = re.escape(_arch.arch_for(model.config.model_type).layers)
    # Only Linears inside the decoder blocks: lm_head or a projection outside the blocks is never adapted.
    pattern = rf"^{layers}\.\d+\..*\b({'|'.join(targets)})$"
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def mask_adapters(peft_model, masks: dict[str, torch.Tensor]) -> int:
    """Train the adapters *through* the zero pattern: a masked layer computes ``x (W + s * (B A) * M)^T`` instead of
    ``x W^T + s * x A^T B^T``, so the update never lands on a pruned weight and the merged, re-masked model is exactly
    the model that was trained (no quality lost at the merge). LoRA dropout does not apply on masked layers (the
    update is folded into the weight). The price is one ``B @ A`` per layer and step: small next to the activations.
    Returns the number of layers masked."""
    import types

    from peft.tuners.lora import Linear as LoraLinear

    done = 0
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLinear):
            continue
        base_name = name.removeprefix("base_model.model.")
        if base_name not in masks:
            continue
        keep = ~masks[base_name]

        def forward(self, x, *args, _keep=keep, **kwargs):
            adapter = self.active_adapters[0]
            a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            delta = (b @ a) * self.scaling[adapter] * _keep.to(device=a.device, dtype=a.dtype)
            base = self.base_layer
            return torch.nn.functional.linear(x, base.weight + delta.to(base.weight.dtype), base.bias)

        mod.forward = types.MethodType(forward, mod)
        done += 1
    return done


def verify(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Every pruned Linear holds at least the zeros it had before recovery."""
    for name, mask in masks.items():
        w = units.weight_of(model, name)
        if (w[mask.to(w.device)] != 0).any():
            raise StepFailed(f"{name} lost zeros of its pruning pattern after the merge")


