"""LoRA recovery (peft) that keeps the sparsity exact.

Merging a LoRA update ``B @ A`` into a sparse weight makes it dense again: the product is dense. (The Wanda
repository's issue #83 reports 40% sparsity falling to 32.7% after a merge.) So the zero pattern of every pruned
weight is recorded *before* training and re-applied after the merge, and the step reports what that costs. Weights of
structurally pruned models (DReSS) hold no zeros to keep and merge plainly.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from llmprune import arch as _arch
from llmprune.errors import StepFailed, UserError


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The zero pattern of every block Linear that has one (a pruned weight), by the Linear's full name."""
    masks = {}
    layers = _arch.arch_for(model.config.model_type).layers
    for i, block in enumerate(_arch.blocks(model)):
        for name, lin in _arch.block_linears(block).items():
            zeros = lin.weight.detach() == 0
            if zeros.any():
                masks[f"{layers}.{i}.{name}"] = zeros
    return masks


def targets_for(model: nn.Module, targets: str) -> list[str]:
    """``auto``: the architecture table's LoRA targets; otherwise a comma list of Linear names (``q_proj,...``)."""
    names = list(_arch.arch_for(model.config.model_type).lora_targets) if targets == "auto" else [
        t.strip() for t in targets.split(",") if t.strip()]
    present = {n.rsplit(".", 1)[-1] for block in _arch.blocks(model) for n in _arch.block_linears(block)}
    missing = [n for n in names if n not in present]
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
            delta = (b @ a) * self.scaling[adapter] * _keep.to(a.dtype)
            base = self.base_layer
            return torch.nn.functional.linear(x, base.weight + delta.to(base.weight.dtype), base.bias)

        mod.forward = types.MethodType(forward, mod)
        done += 1
    return done


@torch.no_grad()
def reapply(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Zero the recorded pattern again; returns how many weights the merge had made non-zero."""
    changed = 0
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        changed += int((w[mask] != 0).sum())
        w.masked_fill_(mask, 0)
    return changed


def verify(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Every pruned Linear holds at least the zeros it had before recovery."""
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        if (w[mask] != 0).any():
            raise StepFailed(f"{name} lost zeros of its pruning pattern after the merge")


def lora_state(peft_model) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)


def has_adapter(manifest: dict[str, Any]) -> bool:
    return any(k.startswith("adapter/") for k in manifest["files"])


def pending_adapter(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The ``recover --no-merge`` step whose adapter is part of the workdir's current model, or None.

    An unmerged adapter belongs to the model that was current when it was trained; a later step that writes
    ``model/`` (a prune, a merging recover) has already folded it in, so it is pending only when that recover is the
    last step to touch the model or the adapter."""
    last = None
    for step in manifest.get("steps", []):
        outs = step.get("outputs", {})
        if any(k.startswith("model/") for k in outs):
            last = None
        if step["command"] == "recover" and any(k.startswith("adapter/") for k in outs):
            last = None if step["params"].get("merge", True) else step
    return last


def merge_pending(model: nn.Module, adapter_dir, step: dict[str, Any]) -> nn.Module:
    """The model a merging recover would have written: base + adapter, merged, with the zero pattern of a pruned
    model re-applied. For an adapter trained through the mask this is exactly the trained model."""
    from peft import PeftModel

    masks = zero_masks(model) if step["metrics"].get("pruned_layers") else {}
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    reapply(merged, masks)
    return merged


def peft_exact(step: dict[str, Any]) -> bool:
    """Whether plain peft (``W x + s B A x``) computes what was trained: not for an adapter trained through the zero
    pattern of a sparse model, whose update at pruned positions was never trained."""
    return not (step["params"].get("masked", True) and step["metrics"].get("masked_adapters", 0))
