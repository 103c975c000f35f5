"""Recovery fine-tuning -- LoRA (peft) or all weights (``--full``), on the LM loss or distilled from the dense
teacher (``--distill``, ``distill.py``) -- that keeps the sparsity exact.

Merging a LoRA update ``B @ A`` into a sparse weight makes it dense again: the product is dense. (The Wanda
repository's issue #83 reports 40% sparsity falling to 32.7% after a merge.) So the zero pattern of every pruned
weight is recorded *before* training and re-applied after the merge, and the step reports what that costs. Weights of
structurally pruned models (DReSS) hold no zeros to keep and merge plainly. Full fine-tuning of a sparse model
re-applies the pattern after every optimiser step (AdamW's momentum would otherwise grow the pruned weights back).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune import units
from llmprune.errors import StepFailed, UserError


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


