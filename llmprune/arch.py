"""Architecture knowledge as data: where a model keeps its decoder blocks and what runs after them.

Adding an architecture is one row here; nothing else in the code branches on ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmprune.errors import UserError


@dataclass(frozen=True)
class Parts:
    """Which tensors couple when a structure is removed (DReSS and the other structured removals).

    Names are relative to one decoder block, except ``embed`` and ``final_norm`` (relative to the model).
    """

    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")  # per block, over the hidden size
    rms_norm: bool = True  # RMSNorm: removing zero channels is exact after a sqrt(d/d') rescale; LayerNorm is not
    # The norm multiplies by (norm_offset + weight): Gemma's RMSNorm stores its scale as an offset from 1, so a
    # rescale by f is w' = (1 + w) f - 1, not w f.
    norm_offset: float = 0.0
    # The embedding's output is multiplied by sqrt(hidden_size), computed from the config (Gemma): a narrower model
    # computes a smaller factor, which the kept embedding values must make up for.
    embed_scaled: bool = False
    # Fused projections (Phi-3): q, k and v are one Linear whose output rows are [q; k; v] (then q == k == v
    # above), and the MLP's input is one Linear whose rows are [gate; up] (then mlp_in holds that one name).
    qkv_fused: bool = False
    mlp_in_fused: bool = False
    mlp_width: str = "intermediate_size"  # config key of the MLP width
    # structure -> why transformers' own modeling code cannot express the smaller model
    cannot: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Arch:
    layers: str  # dotted path to the ModuleList of decoder blocks
    final: tuple[str, ...]  # modules applied, in order, between the last block and lm_head (absent ones skipped)
    lora_targets: tuple[str, ...]  # Linear names inside a block that LoRA adapts by default
    parts: Parts = Parts()
    # Config key of a soft cap on the final logits, ``cap * tanh(logits / cap)`` (Gemma 2), applied by the model's
    # forward after the head -- so the streamed head must apply it too. Unset or None in the config: no cap.
    logit_softcap: str = ""


_LLAMA_LIKE = Arch(
    layers="model.layers",
    final=("model.norm",),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
_OPT_CANNOT = "OPT's modeling code ties the attention width to hidden_size (no head_dim option)"

# Gemma: (1 + w) RMSNorms, embeddings scaled by sqrt(hidden_size), a norm after attention and after the MLP as well
# as before each; Gemma 2 and 3 alternate sliding-window and full-attention layers (``config.layer_types``), which
# the engine's capture handles by recording every block's own arguments.
_GEMMA_PARTS = Parts(norm_offset=1.0, embed_scaled=True)
_GEMMA2_PARTS = Parts(norm_offset=1.0, embed_scaled=True,
                      norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                             "post_feedforward_layernorm"))

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,  # Llama-2/3, SmolLM
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi": Arch(  # Phi-2
        layers="model.layers",
        final=("model.final_layernorm",),
        lora_targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
        parts=Parts(final_norm="model.final_layernorm", o="self_attn.dense", mlp_in=("mlp.fc1",),
                    mlp_out="mlp.fc2", norms=("input_layernorm",), rms_norm=False),
    ),
    "gemma": Arch(layers="model.layers", final=("model.norm",), lora_targets=_LLAMA_LIKE.lora_targets,
                   parts=_GEMMA_PARTS),
    "gemma2": Arch(layers="model.layers", final=("model.norm",), lora_targets=_LLAMA_LIKE.lora_targets,
                   parts=_GEMMA2_PARTS, logit_softcap="final_logit_softcapping"),
    "gemma3_text": Arch(layers="model.layers", final=("model.norm",), lora_targets=_LLAMA_LIKE.lora_targets,
                        parts=_GEMMA2_PARTS, logit_softcap="final_logit_softcapping"),
    "phi3": Arch(  # Phi-3, Phi-3.5, Phi-4 (dense): fused qkv_proj and gate_up_proj
        layers="model.layers",
        final=("model.norm",),
        lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        parts=Parts(q="self_attn.qkv_proj", k="self_attn.qkv_proj", v="self_attn.qkv_proj",
                    mlp_in=("mlp.gate_up_proj",), qkv_fused=True, mlp_in_fused=True),
    ),
    "opt": Arch(
        layers="model.decoder.layers",
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        parts=Parts(embed="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm",
                    o="self_attn.out_proj", mlp_in=("fc1",), mlp_out="fc2",
                    norms=("self_attn_layer_norm", "final_layer_norm"), rms_norm=False, mlp_width="ffn_dim",
                    cannot=(("hidden", _OPT_CANNOT), ("heads", _OPT_CANNOT))),
    ),
}


def arch_for(model_type: str) -> Arch:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UserError(
            f"model type '{model_type}' is not supported; supported: {', '.join(sorted(ARCHS))}"
        ) from None


def logit_softcap(config) -> float | None:
    """The soft cap on the final logits of a model of this ``config``, or None."""
    key = arch_for(config.model_type).logit_softcap
    return getattr(config, key, None) if key else None


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


def linear_weight_names(model: nn.Module) -> set[str]:
    """Full names (as in the checkpoint) of the weight of every prunable Linear of every block."""
    layers = arch_for(model.config.model_type).layers
    return {f"{layers}.{i}.{name}.weight" for i, block in enumerate(blocks(model)) for name in block_linears(block)}
