"""Architecture knowledge as data: where a model keeps its decoder blocks and what runs after them.

Adding an architecture is one row here; nothing else in the code branches on ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmprune.errors import UserError


@dataclass(frozen=True)
class Arch:
    layers: str  # dotted path to the ModuleList of decoder blocks
    final: tuple[str, ...]  # modules applied, in order, between the last block and lm_head (absent ones skipped)
    lora_targets: tuple[str, ...]  # Linear names inside a block that LoRA adapts by default


_LLAMA_LIKE = Arch(
    layers="model.layers",
    final=("model.norm",),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,  # Llama-2/3, SmolLM
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi": Arch(  # Phi-2
        layers="model.layers",
        final=("model.final_layernorm",),
        lora_targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    ),
    "opt": Arch(
        layers="model.decoder.layers",
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    ),
}


def arch_for(model_type: str) -> Arch:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UserError(
            f"model type '{model_type}' is not supported; supported: {', '.join(sorted(ARCHS))}"
        ) from None


def get_module(root: nn.Module, dotted: str) -> nn.Module | None:
    mod: nn.Module | None = root
    for part in dotted.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def blocks(model: nn.Module) -> nn.ModuleList:
    return get_module(model, arch_for(model.config.model_type).layers)


def final_modules(model: nn.Module) -> list[nn.Module]:
    mods = (get_module(model, p) for p in arch_for(model.config.model_type).final)
    return [m for m in mods if m is not None]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The prunable Linear layers of one block, by their name inside it (e.g. ``self_attn.q_proj``)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
