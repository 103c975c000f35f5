"""Knowledge distillation from the dense model (Hinton et al. 2015), the recovery structured pruning is usually given.

``loss = T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))`` averaged over the predicted tokens
(docs/methods.md), optionally mixed with the language-modelling loss. Minitron (Muralidharan et al. 2024) and
Sheared-LLaMA (Xia et al. 2024) recover structurally pruned models this way; both distil at ``T = 1``.

The teacher is the model the workdir was calibrated with: ``calibrate`` keeps it as ``WORK/teacher/`` (hard links of
the shards it wrote, so it costs no space until a step replaces ``model/``), and ``--teacher SOURCE`` names it for a
workdir that does not keep one. Its logits are computed on the fly, in the same forward order as the student's:
exact (a top-k cache drops the tail of the distribution, and the full distribution of 512 tokens over Gemma's 262k
vocabulary is 537 MB per window), and a teacher forward costs about a third of a student training step (no backward),
which ``benchmarks/recover_bench.py`` measures.

Teacher correction (Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice: The Minitron Approach", sec.
2): the teacher is first fine-tuned on the distillation text, because distilling from a teacher that has never seen
that text's distribution teaches the student the teacher's mismatch. Here it decides whether distillation pays at
all: on SmolLM2-135M and Gemma-3-270M, after DReSS removed a quarter of the blocks, distillation lost to the LM loss
from the released model and beat it from a teacher corrected for 100 steps (benchmarks/README.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.errors import UserError
from llmprune.options import option
from llmprune.stats import exp_nll

TEACHER = "teacher"  # the workdir folder that keeps the calibrated model
KD_OPTIONS = ("kd_temperature", "kd_weight", "teacher")  # recorded only by a step that distils
TEACHER_LR = 2e-5  # the correction trains every weight: the step of ``recover --full``, which it is


# --- the options of distillation, shared by ``regularize`` and ``recover`` (declared here, once) ----------------
PANEL = "Distillation"


def distill_option() -> bool:
    return option(False, "Train on the KL divergence from the dense teacher's next-token distribution (the workdir's "
                  "teacher/, or --teacher).", flag="--distill", panel=PANEL)


def kd_temperature_option() -> float | None:
    return option(None, "--distill: softmax temperature T of both distributions (the loss is scaled by T^2; "
                  "default 1).", panel=PANEL, show_default=False)


def kd_weight_option() -> float | None:
    return option(None, "--distill: the KD share of the loss, in (0, 1]; the rest is the LM loss (default 1).",
                  panel=PANEL, show_default=False)


def teacher_option() -> str | None:
    return option(None, "--distill: the teacher, a Hub id, safetensors folder or .gguf file (default: the workdir's "
                  "teacher/, kept by calibrate).", panel=PANEL)


def teacher_steps_option(more: str = "") -> int:
    return option(0, "--distill: teacher correction (Sreenivas et al. 2024) -- first fine-tune every weight of the "
                  f"teacher this many steps on the training windows (LM loss, lr 2e-5){more}. 0: distil from the "
                  "teacher as it is.", panel=PANEL)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` at temperature ``T``, averaged over the positions that predict a next token (all but
    the last of each window, the positions the LM loss scores too). ``T^2`` keeps the gradient's scale independent of
    ``T`` (Hinton et al. 2015, sec. 2)."""
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    log_ps = F.log_softmax(s, dim=-1).flatten(0, 1)
    log_pt = F.log_softmax(t, dim=-1).flatten(0, 1)
    # kl_div(input = log q, target = log p, log_target) = sum p (log p - log q); "batchmean" divides by the rows
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * temperature**2


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The next-token cross-entropy ``model(input_ids=ids, labels=ids).loss`` computes, from logits already at hand."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


class Distiller:
    """The teacher (frozen, in eval mode) and how its loss mixes with the LM loss:
    ``weight * KD + (1 - weight) * LM``."""

    def __init__(self, teacher: nn.Module, temperature: float = 1.0, weight: float = 1.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.weight = temperature, weight

    def to(self, device) -> "Distiller":
        self.teacher.to(device)
        return self

    def objective(self, ids: torch.Tensor, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the loss to minimise, the LM loss, the KD loss) of one micro-batch."""
        with torch.no_grad():
            t = self.teacher(input_ids=ids, use_cache=False).logits
        kd = kd_loss(student_logits, t, self.temperature)
        lm = lm_loss(student_logits, ids)
        total = kd if self.weight == 1.0 else self.weight * kd + (1.0 - self.weight) * lm
        return total, lm, kd


def resolve_options(distill: bool, temperature: float | None, weight: float | None,
                    teacher: str | None = None, teacher_steps: int = 0) -> tuple[float, float]:
    """The KD settings as given on the command line (``None``: not given): refused without ``--distill`` (they
    would be silently ignored), checked, and defaulted to T = 1 and a weight of 1 (KD alone)."""
    if teacher_steps < 0:
        raise UserError(f"--teacher-steps must be >= 0 (0: no teacher correction), got {teacher_steps}")
    if not distill:
        given = [n for n, v in (("--kd-temperature", temperature), ("--kd-weight", weight), ("--teacher", teacher),
                                ("--teacher-steps", teacher_steps or None)) if v is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise UserError(f"{' and '.join(given)} {verb} to distillation: add --distill")
    temperature, weight = (1.0 if temperature is None else temperature), (1.0 if weight is None else weight)
    check_options(temperature, weight)
    return temperature, weight


def check_options(temperature: float, weight: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--kd-temperature must be positive, got {temperature}")
    if not (math.isfinite(weight) and 0 < weight <= 1):
        raise UserError(f"--kd-weight must be in (0, 1] (the KD share of the loss; the rest is the LM loss), got {weight}")


def load_teacher(ws, given: str | None, student: nn.Module, dtype: str = "float32") -> nn.Module:
    """The teacher: ``--teacher SOURCE`` (a Hub id, a safetensors folder or a ``.gguf`` file) or the workdir's ``teacher/``, checked
    against its hashes; refused when it cannot teach this student (another vocabulary)."""
    from llmprune.modeling import load_model, load_source

    if given is None:
        folder = ws.path / TEACHER
        if not (folder / "config.json").is_file():
            src = ws.manifest().get("base_model", {}).get("source") or "the model it was calibrated from"
            raise UserError(f"{ws.path} keeps no teacher (it was calibrated with --no-keep-teacher, or before "
                            f"llmprune kept one); pass --teacher with {src}")
        ws.verify(TEACHER)
        teacher, _ = load_model(folder, dtype)
    else:  # whatever calibrate accepts: a Hub id, a safetensors folder, a .gguf file
        teacher, _, _ = load_source(given, None, dtype, False)
    v_t = teacher.get_output_embeddings().weight.shape[0]
    v_s = student.get_output_embeddings().weight.shape[0]
    if v_t != v_s:
        raise UserError(f"the teacher's vocabulary ({v_t:,}) is not the student's ({v_s:,}); distillation compares "
                        "their next-token distributions token by token")
    return teacher.eval().requires_grad_(False)


def prepare_teacher(ws, given: str | None, student: nn.Module, tok, windows: torch.Tensor, hold: torch.Tensor,
                    steps: int, *, where, keep: bool, seed: int, batch_size: int, grad_accum: int,
                    grad_checkpointing: bool, device: str, precision: str = "fp32") -> tuple[nn.Module, dict | None]:
    """The teacher a training step distils from, and its correction record (None with ``steps`` 0): the corrected
    teacher an interrupted run kept in ``where`` (its resume folder) if there is one, else ``load_teacher``'s,
    corrected ``steps`` steps on ``windows`` and, with ``keep``, kept in ``where`` for a rerun."""
    from llmprune import resume

    kept = resume.kept_teacher(where) if where is not None and steps else None
    if kept is not None:
        return kept
    teacher = load_teacher(ws, given, student)
    if not steps:
        return teacher, None
    correction = correct_teacher(teacher, windows, hold, steps, seed=seed, batch_size=batch_size,
                                 grad_accum=grad_accum, grad_checkpointing=grad_checkpointing, device=device,
                                 precision=precision)
    if keep and where is not None:
        resume.keep_teacher(teacher, tok, where, correction, ws.shard_size)
    return teacher, correction


def correct_teacher(teacher: nn.Module, windows: torch.Tensor, hold: torch.Tensor, steps: int, *, seed: int = 0,
                    batch_size: int = 1, grad_accum: int = 1, grad_checkpointing: bool = False,
                    device: str = "cpu", precision: str = "fp32") -> dict:
    """Teacher correction (module docstring): fine-tune every weight of ``teacher`` ``steps`` steps on the LM loss
    over ``windows`` -- exactly what ``recover --full --steps N`` does to the dense model -- and freeze it again.
    Returns its record: the held-out perplexity on ``hold`` before and after, the steps, the time."""
    from llmprune.train import TrainSpec, heldout_nll, train

    before = exp_nll(heldout_nll(teacher, hold))
    teacher.requires_grad_(True)
    spec = TrainSpec(steps=steps, lr=TEACHER_LR, batch_size=batch_size, grad_accum=grad_accum, seed=seed,
                     grad_checkpointing=grad_checkpointing, eval_every=0, precision=precision)
    hist = train(teacher, windows, spec, device=device, description="correcting the teacher",
                 evaluate=lambda m, step: {"ppl": round(exp_nll(heldout_nll(m, hold)), 4)})
    teacher.eval().requires_grad_(False)
    return {"steps": hist["steps"], "lr": TEACHER_LR, "ppl_before": round(before, 4),
            "ppl_after": hist["evals"][-1]["ppl"], "seconds": hist["seconds"], "final_loss": hist["final_loss"]}
