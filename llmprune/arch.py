"""Architecture knowledge as data: where a model keeps its decoder blocks and what runs after them.

Adding an architecture is one row here; nothing else in the code branches on ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    # The output projections of token mixers other than ``o`` that some blocks hold instead (Qwen3.5's linear
    # attention: ``linear_attn.out_proj``): a block is removed with whichever of them and ``mlp_out`` it has.
    mixer_outs: tuple[str, ...] = ()
    # Per-query-head parameters (one entry per query head), cut with their heads: gpt-oss's attention sinks, a
    # learned logit each head's softmax also normalises over.
    head_vectors: tuple[str, ...] = ()
    # structure -> why transformers' own modeling code cannot express the smaller model
    cannot: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Experts:
    """A block's mixture-of-experts weights, stored by transformers 5 as 3-D parameters ``[E, out, in]`` (or
    ``[E, in, out]``: ``transposed``).

    The unit of pruning is one expert's 2-D slice ``param[e]`` (a Linear's ``[out, in]``, input from the tokens
    routed to e). The table also says how a checkpoint stores them -- one 2-D tensor per expert and source, the 3-D
    parameter being the stack over experts of the concatenation (rows) of its sources -- which is how most Hub
    releases and ``save_pretrained`` write them (transformers converts on load and back on save).
    """

    path: str = "mlp.experts"  # the module inside a block that holds the 3-D parameters
    # parameter -> its per-expert sources on disk, concatenated along rows: gate_up_proj[e] = [gate_e; up_e]
    params: tuple[tuple[str, tuple[str, ...]], ...] = (("gate_up_proj", ("gate_proj", "up_proj")),
                                                       ("down_proj", ("down_proj",)))
    # (No sources: the checkpoint stores the 3-D parameter itself, as gpt-oss, Llama 4 and Gemma 4 releases do.)
    disk_path: str = "mlp.experts"  # where a checkpoint keeps expert e's tensors: ``{disk_path}.{e}.{source}.weight``
    # How a 3-D parameter holds expert e: ``[E, out, in]``, a Linear's weight per expert, or ``[E, in, out]``
    # multiplied as ``x @ W[e]`` (gpt-oss, Llama 4), whose Linear weight is then ``W[e]`` transposed.
    transposed: bool = False
    # Per-expert biases ``[E, out]`` of the experts module: parameter -> its bias (gpt-oss). Never pruned; an
    # expert's bias goes with it when experts are removed.
    biases: tuple[tuple[str, str], ...] = ()
    # The experts' forward, as data (``experts.routed`` replays it expert by expert; tests/test_moe.py proves each
    # equal to the model's own):
    # - "gated": out = sum over the top-k experts e of w_e(x) * down_e(act(gate_e x) * up_e x), gate and up the two
    #   row halves of gate_up_proj[e];
    # - "clamped" (gpt-oss): gate and up interleaved (even and odd rows), both clamped, the gate through
    #   x * sigmoid(alpha x), multiplied by (up + 1), biases on both projections -- the experts module's own
    #   ``_apply_gate``;
    # - "prescaled" (Llama 4): every expert runs on every token whose input rows the router score has already
    #   multiplied (zero rows for the tokens not routed to it), out_e = down_e(up_e x * act(gate_e x)).
    forward: str = "gated"
    router: str = "mlp.gate"  # the module that routes: called on the tokens, it chooses each one's top-k experts
    count: str = "num_experts"  # config key of the number of routed experts (Mixtral: num_local_experts)
    top_k: str = "num_experts_per_tok"  # config key of the experts each token is routed to (Gemma 4: top_k_experts)
    # Whether the router renormalises the weights over the chosen top-k (then removing an expert that a token does
    # not choose leaves that token's output exactly unchanged): a config key, or "" for always (Mixtral).
    renormalises: str = "norm_topk_prob"
    # The router's tensors (names inside it) that hold one row or entry per expert, cut with the expert: its [E, H]
    # weight (one logit per expert) and bias where it has one; DeepSeek-V3's and GLM-4.5's
    # ``e_score_correction_bias``, a buffer added to the scores when the top-k is chosen; Gemma 4's projection and
    # ``per_expert_scale``.
    router_cuts: tuple[str, ...] = ("weight", "bias")
    # Config key of a group count for group-limited routing (DeepSeek-V3: the top-k is chosen only among the
    # ``topk_group`` groups of experts with the best scores), or "". With more than one group, experts go evenly
    # from every group (``structures/experts.py``).
    groups: str = ""
    # The output projections of the shared experts beside the routed ones (ordinary Linears): with the routed experts'
    # down projections, what a block's mixture adds to the residual stream.
    shared_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class Gguf:
    """How llama.cpp knows this family (``export --format gguf``; docs/gguf.md).

    ``arch`` names a ``gguf.MODEL_ARCH`` member, whose tensor-name table (``gguf.TensorNameMap``) maps the
    transformers names. Norm scales are written as ``Parts.norm_offset + w`` (llama.cpp multiplies by the stored
    value), biases and everything else as they are.
    """

    arch: str
    # llama.cpp's "llama" graph rotates adjacent pairs of each head (GPT-J style) where transformers rotates the two
    # halves (GPT-NeoX style): the rows of q and k are reordered within each head so both compute the same scores.
    rope_pairs: bool = False
    # Per-layer sliding-window attention from ``config.layer_types`` (Gemma 2/3): the window and each layer's kind
    # are written; a family without it in llama.cpp refuses a config with a sliding window.
    sliding: bool = False
    # 3-D expert parameters: gate_up_proj[e] = [gate_e; up_e] splits into ffn_gate_exps / ffn_up_exps.
    experts: bool = False
    # llama.cpp's graph leaves rotary embeddings out of every N-th layer (SmolLM3: 4), a period it does not read
    # from the file: a config whose per-layer ``no_rope_layers`` is not that period (after block removal, say) is
    # refused. 0: every layer rotates.
    no_rope_period: int = 0
    # why llama.cpp cannot run this family, or "" (it can)
    cannot: str = ""


@dataclass(frozen=True)
class Arch:
    layers: str  # dotted path to the ModuleList of decoder blocks
    final: tuple[str, ...]  # modules applied, in order, between the last block and lm_head (absent ones skipped)
    lora_targets: tuple[str, ...]  # Linear names inside a block that LoRA adapts by default
    parts: Parts = Parts()
    # Config key of a soft cap on the final logits, ``cap * tanh(logits / cap)`` (Gemma 2), applied by the model's
    # forward after the head -- so the streamed head must apply it too. Unset or None in the config: no cap.
    logit_softcap: str = ""
    experts: Experts | None = None  # mixture-of-experts blocks
    # Modules inside a block whose weights are never pruned: routers and shared-expert gates (a handful of rows
    # that decide where every token goes; zeroing half of them reroutes the model), and depthwise convolution kernels
    # (Qwen3.5's linear attention: a few taps per channel, no input to compare weights over).
    never_prune: tuple[str, ...] = ()
    # (model name fragment, checkpoint name fragment): the checkpoint's names differ from the modules' (Mixtral
    # releases keep ``block_sparse_moe`` for what transformers 5 calls ``mlp``)
    renames: tuple[tuple[str, str], ...] = ()
    gguf: Gguf = Gguf("", cannot="no GGUF mapping for this family")
    # Config lists with one entry per decoder block: block removal keeps the survivors' entries.
    per_layer: tuple[str, ...] = ("layer_types",)
    # Embeddings besides the input embedding that the token ids index before the first block (Gemma 4's per-layer
    # embeddings): a streamed model reads only the rows the windows use, of each.
    token_embeddings: tuple[str, ...] = ()
    # (config key, why): a config that sets the key (to anything but 0, false or empty) is refused for every
    # operation, at ``calibrate`` -- a variant of the family the table does not describe.
    refuse: tuple[tuple[str, str], ...] = ()
    # How a config places its kinds of blocks (MoE families with dense blocks), which block removal keeps true:
    # lists of block indices (Qwen-MoE's ``mlp_only_layers``, Llama 4's ``moe_layers``: renumbered), counts of
    # leading blocks (DeepSeek-V3's ``first_k_dense_replace``: the survivors among them), and a period (Qwen-MoE's
    # ``decoder_sparse_step``: above 1 every N-th block is sparse, a pattern removal would shift -- refused).
    layer_indices: tuple[str, ...] = ()
    leading_blocks: tuple[str, ...] = ()
    layer_period: str = ""


_LLAMA_LIKE = Arch(
    layers="model.layers",
    final=("model.norm",),
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    gguf=Gguf("LLAMA", rope_pairs=True),
)
_OPT_CANNOT = "OPT's modeling code ties the attention width to hidden_size (no head_dim option)"

# Gemma: (1 + w) RMSNorms, embeddings scaled by sqrt(hidden_size), a norm after attention and after the MLP as well
# as before each; Gemma 2 and 3 alternate sliding-window and full-attention layers (``config.layer_types``), which
# the engine's capture handles by recording every block's own arguments.
_GEMMA_PARTS = Parts(norm_offset=1.0, embed_scaled=True)
_GEMMA2_PARTS = Parts(norm_offset=1.0, embed_scaled=True,
                      norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                             "post_feedforward_layernorm"))

# Mixture-of-experts: Qwen-MoE and Mixtral keep routed experts as 3-D parameters and a router ``mlp.gate`` (a plain
# [E, H] weight); Qwen2-MoE adds a shared expert (ordinary Linears, pruned like a dense MLP) and its one-row gate.
# Removing whole experts (--structure experts) slices the expert parameters and the router's rows together, KV
# groups (heads) touch the attention only, and a whole block is the identity once its attention output, every
# expert's down projection (and bias) and its shared experts' are zero; hidden channels and MLP channels would have
# to cut every expert along with the rest: refused for now.
_MOE_WHY = ("this structure does not slice mixture-of-experts blocks yet (every expert and the router would have to "
            "be cut together); --structure experts removes whole experts")
_MOE_CANNOT = tuple((structure, _MOE_WHY) for structure in ("hidden", "mlp"))
# LoRA adapts the attention of MoE models by default: peft (0.21) maps the MLP names gate_proj / up_proj /
# down_proj onto the 3-D expert parameters (its transformers-4 compatibility layer), dropping the dense and shared
# MLP Linears of those names, and the zero-mask training of ``recovery`` covers Linears only.
_MOE_LORA = ("q_proj", "k_proj", "v_proj", "o_proj")
_QWEN_MOE = Arch(layers="model.layers", final=("model.norm",), lora_targets=_MOE_LORA,
                 parts=Parts(cannot=_MOE_CANNOT), experts=Experts(), never_prune=("mlp.gate",),
                 layer_indices=("mlp_only_layers",), layer_period="decoder_sparse_step",
                 gguf=Gguf("QWEN3MOE", experts=True))

# DeepSeek-V3 and GLM-4.5: sigmoid router scores, a score-correction bias used only to choose the top-k, the chosen
# scores renormalised (``norm_topk_prob``) and scaled; shared experts (ordinary Linears, pruned like a dense MLP)
# beside the routed ones; the first ``first_k_dense_replace`` blocks dense.
_SIGMOID_EXPERTS = Experts(count="n_routed_experts", router_cuts=("weight", "e_score_correction_bias"),
                           groups="n_group", shared_out=("mlp.shared_experts.down_proj",))
_SIGMOID_NEVER = ("mlp.gate",)
# Multi-head latent attention (DeepSeek-V2/V3): q and kv pass through low-rank latents (q_a_proj -> q_a_layernorm ->
# q_b_proj; kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj) whose norms run over the latent width, and each head's
# query is split into a rotary and a non-rotary part of different widths.
_MLA_HEADS = ("heads", "the latent projections of deepseek_v3 (q_b_proj, kv_b_proj) hold every head's rotary and "
                       "non-rotary parts at different widths; removing heads is not supported")
_MLA_HIDDEN = ("hidden", "the latent projections of deepseek_v3 couple the q and kv ranks to the hidden size through "
                         "their own norms, and every expert of its mixture-of-experts blocks would be cut; "
                         "not supported")
_MLA_LORA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

# Qwen3.5: hybrid blocks -- three of four replace attention by a gated linear attention (Gated DeltaNet: in_proj_qkv,
# in_proj_z, in_proj_a, in_proj_b, a depthwise causal conv1d over the q/k/v channels, out_proj, a gated norm over each
# value head), the rest are full attention whose q_proj also gives a per-channel output gate; RMSNorms scale by 1 + w.
# The conv1d kernels (4 taps per channel) are never pruned. Blocks of two kinds hold different attention weights,
# which the table's one attention per block cannot couple: heads and hidden are refused.
_LINEAR_ATTN = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
_QWEN35_NEVER = ("linear_attn.conv1d",)
_QWEN35_HEADS = ("heads", "its linear-attention blocks have heads of another kind (Gated DeltaNet key and value heads) "
                          "and its full-attention q_proj holds an output gate beside each head's query; not supported")
_QWEN35_HIDDEN = ("hidden", "the hidden size couples the linear-attention projections of some blocks and the "
                            "attention projections of others; not supported")
_QWEN35_GGUF = Gguf("", cannot="llmprune does not map Qwen3.5's linear-attention blocks onto llama.cpp yet")

# gpt-oss: Llama-like attention with q/k/v/o biases and one learned attention sink per query head (a logit that only
# its own head's softmax normalises over: cut with the head, removal stays exact), sliding-window and full-attention
# layers; every block a mixture of experts stored [E, in, out] with biases, gate and up interleaved and clamped, a
# router with a bias whose softmax runs over the chosen top-k.
_GPT_OSS_EXPERTS = Experts(params=(("gate_up_proj", ()), ("down_proj", ())), transposed=True,
                           biases=(("gate_up_proj", "gate_up_proj_bias"), ("down_proj", "down_proj_bias")),
                           forward="clamped", router="mlp.router", count="num_local_experts", renormalises="")
# Llama 4: MoE blocks (every one in Scout, every other one in Maverick: ``moe_layers``) hold 3-D experts stored
# [E, in, out] whose input rows the router's sigmoid score has already multiplied, beside a shared expert (ordinary
# Linears, pruned like a dense MLP); the router is a Linear (``feed_forward.router``) whose top-k logits pass through
# a sigmoid, without renormalising -- removing an expert a token did not choose leaves its output unchanged. Dense
# blocks' MLP is ``feed_forward`` itself, ``intermediate_size_mlp`` wide.
_LLAMA4_EXPERTS = Experts(params=(("gate_up_proj", ()), ("down_proj", ())), path="feed_forward.experts",
                          transposed=True, forward="prescaled", router="feed_forward.router",
                          count="num_local_experts", renormalises="",
                          shared_out=("feed_forward.shared_expert.down_proj",))
_LLAMA4_PARTS = Parts(mlp_in=("feed_forward.gate_proj", "feed_forward.up_proj"), mlp_out="feed_forward.down_proj",
                      mlp_width="intermediate_size_mlp", cannot=_MOE_CANNOT)

# Gemma 4: Gemma 3's blocks (norms before and after attention and MLP, sliding and full-attention layers) whose
# full-attention layers have a head width and KV head count of their own (``per_layer_config``; their keys double as
# values where ``attention_k_eq_v``), q/k/v norms, per-layer inputs (PLE: a second embedding of every token, one
# slice per block, gated into the residual stream after the MLP) and a learned per-block output scale. The MoE
# release runs a mixture of experts beside the dense MLP of every block: a router of its own (norm, scale,
# projection, softmax over all experts, the top-k renormalised, a per-expert scale) and experts [E, out, in].
_GEMMA4_EXPERTS = Experts(params=(("gate_up_proj", ()), ("down_proj", ())), path="experts", router="router",
                          router_cuts=("proj.weight", "per_expert_scale"), top_k="top_k_experts", renormalises="")
_GEMMA4_CANNOT = (
    ("heads", "its sliding and full-attention blocks have different head widths and KV head counts (and full-attention "
              "keys can serve as values); not supported"),
    ("hidden", "its per-layer input embeddings and projections couple the hidden size; not supported"),
    ("layers", "its per-layer input embedding holds a slice for every block, and per_layer_config is keyed by block "
               "index; not supported"))
_GEMMA4_KV_SHARING = ("num_kv_shared_layers", "gemma4_text blocks that reuse the keys and values of earlier blocks "
                                              "(Gemma 4 E2B / E4B) are not supported yet")

ARCHS: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,  # Llama-2/3, SmolLM
    "mistral": _LLAMA_LIKE,
    "qwen2": replace(_LLAMA_LIKE, gguf=Gguf("QWEN2")),
    "qwen3": replace(_LLAMA_LIKE, gguf=Gguf("QWEN3")),
    "phi": Arch(  # Phi-2
        layers="model.layers",
        final=("model.final_layernorm",),
        lora_targets=("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
        parts=Parts(final_norm="model.final_layernorm", o="self_attn.dense", mlp_in=("mlp.fc1",),
                    mlp_out="mlp.fc2", norms=("input_layernorm",), rms_norm=False),
        gguf=Gguf("PHI2"),
    ),
    "gemma": Arch(layers="model.layers", final=("model.norm",), lora_targets=_LLAMA_LIKE.lora_targets,
                   parts=_GEMMA_PARTS, gguf=Gguf("GEMMA")),
    "gemma2": Arch(layers="model.layers", final=("model.norm",), lora_targets=_LLAMA_LIKE.lora_targets,
                   parts=_GEMMA2_PARTS, logit_softcap="final_logit_softcapping", gguf=Gguf("GEMMA2", sliding=True)),
    "gemma3_text": Arch(layers="model.layers", final=("model.norm",), lora_targets=_LLAMA_LIKE.lora_targets,
                        parts=_GEMMA2_PARTS, logit_softcap="final_logit_softcapping",
                        gguf=Gguf("GEMMA3", sliding=True)),
    "phi3": Arch(  # Phi-3, Phi-3.5, Phi-4 (dense): fused qkv_proj and gate_up_proj
        layers="model.layers",
        final=("model.norm",),
        lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        parts=Parts(q="self_attn.qkv_proj", k="self_attn.qkv_proj", v="self_attn.qkv_proj",
                    mlp_in=("mlp.gate_up_proj",), qkv_fused=True, mlp_in_fused=True),
        gguf=Gguf("PHI3"),
    ),
    "qwen3_moe": _QWEN_MOE,
    "qwen2_moe": Arch(layers="model.layers", final=("model.norm",), lora_targets=_MOE_LORA,
                      parts=Parts(cannot=_MOE_CANNOT), experts=Experts(shared_out=("mlp.shared_expert.down_proj",)),
                      layer_indices=("mlp_only_layers",), layer_period="decoder_sparse_step",
                      never_prune=("mlp.gate", "mlp.shared_expert_gate"), gguf=Gguf("QWEN2MOE", experts=True)),
    "mixtral": Arch(layers="model.layers", final=("model.norm",), lora_targets=_MOE_LORA,
                    parts=Parts(cannot=_MOE_CANNOT),
                    experts=Experts(params=(("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))),
                                    disk_path="block_sparse_moe.experts", count="num_local_experts", renormalises=""),
                    never_prune=("mlp.gate",), renames=((".mlp.", ".block_sparse_moe."),),
                    gguf=Gguf("LLAMA", rope_pairs=True, experts=True)),
    # SmolLM3: Llama blocks, some without rotary embeddings (``no_rope_layers``: 1 rotates, 0 does not).
    "smollm3": replace(_LLAMA_LIKE, per_layer=("layer_types", "no_rope_layers"),
                       gguf=Gguf("SMOLLM3", rope_pairs=True, no_rope_period=4)),
    # OLMo 3: no norm before attention or MLP, an RMSNorm after each (over the hidden size), q and k normalised
    # across all heads at once (q_norm over heads x head_dim), sliding-window and full-attention layers. Removing
    # heads would change every kept head's scale under that joint norm: refused.
    "olmo3": Arch(layers="model.layers", final=("model.norm",), lora_targets=_LLAMA_LIKE.lora_targets,
                  parts=Parts(norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                              cannot=(("heads", "q_norm and k_norm normalise across all heads at once: removing "
                                                "heads changes every kept head's scale"),
                                      ("hidden", "its norms after attention and MLP see branch outputs whose mean "
                                                 "square can be near the norm's eps, which a narrower width weighs "
                                                 "differently: the removal is not exact"))),
                  gguf=Gguf("OLMO2", sliding=True)),
    # GLM-4.5 / 4.6 / 4.7: Llama attention (q/k/v biases, partial rotary, optional per-head q/k norms) and
    # DeepSeek-V3's MoE.
    "glm4_moe": Arch(layers="model.layers", final=("model.norm",), lora_targets=_MOE_LORA,
                     parts=Parts(cannot=_MOE_CANNOT), experts=_SIGMOID_EXPERTS, never_prune=_SIGMOID_NEVER,
                     leading_blocks=("first_k_dense_replace",),
                     gguf=Gguf("", cannot="llmprune has no mapping onto llama.cpp's GLM4_MOE graph yet")),
    "deepseek_v3": Arch(layers="model.layers", final=("model.norm",), lora_targets=_MLA_LORA,
                        parts=Parts(cannot=(*_MOE_CANNOT, _MLA_HEADS, _MLA_HIDDEN)), experts=_SIGMOID_EXPERTS,
                        never_prune=_SIGMOID_NEVER, leading_blocks=("first_k_dense_replace",),
                        gguf=Gguf("", cannot="llmprune has no mapping onto llama.cpp's DEEPSEEK2 graph yet "
                                             "(its kv_b_proj is stored split per head there)")),
    "qwen3_5_text": Arch(layers="model.layers", final=("model.norm",),
                         lora_targets=(*_LLAMA_LIKE.lora_targets, *_LINEAR_ATTN),
                         parts=Parts(norm_offset=1.0, mixer_outs=("linear_attn.out_proj",),
                                     cannot=(_QWEN35_HEADS, _QWEN35_HIDDEN)),
                         never_prune=_QWEN35_NEVER, gguf=_QWEN35_GGUF),
    # Qwen3.5-MoE: the same blocks with Qwen2-MoE's experts (a router that always renormalises, a gated shared expert)
    "qwen3_5_moe_text": Arch(layers="model.layers", final=("model.norm",), lora_targets=(*_MOE_LORA, *_LINEAR_ATTN),
                             parts=Parts(norm_offset=1.0, mixer_outs=("linear_attn.out_proj",),
                                         cannot=(*_MOE_CANNOT, _QWEN35_HEADS)),
                             experts=Experts(renormalises="", shared_out=("mlp.shared_expert.down_proj",)),
                             never_prune=("mlp.gate", "mlp.shared_expert_gate", *_QWEN35_NEVER), gguf=_QWEN35_GGUF),
    "gpt_oss": Arch(layers="model.layers", final=("model.norm",), lora_targets=_MOE_LORA,
                    parts=Parts(head_vectors=("self_attn.sinks",), cannot=_MOE_CANNOT), experts=_GPT_OSS_EXPERTS,
                    never_prune=("mlp.router",),
                    gguf=Gguf("", cannot="llmprune has no mapping onto llama.cpp's gpt-oss graph yet")),
    "llama4_text": Arch(layers="model.layers", final=("model.norm",), lora_targets=_MOE_LORA, parts=_LLAMA4_PARTS,
                        experts=_LLAMA4_EXPERTS, never_prune=("feed_forward.router",),
                        per_layer=("layer_types", "no_rope_layers"), layer_indices=("moe_layers",),
                        gguf=Gguf("", cannot="llmprune has no mapping onto llama.cpp's LLAMA4 graph yet")),
    "gemma4_text": Arch(layers="model.layers", final=("model.norm",), lora_targets=_MOE_LORA,
                        parts=Parts(embed_scaled=True, norms=(*_GEMMA2_PARTS.norms, "post_per_layer_input_norm"),
                                    cannot=_GEMMA4_CANNOT),
                        logit_softcap="final_logit_softcapping", experts=_GEMMA4_EXPERTS, never_prune=("router",),
                        token_embeddings=("model.embed_tokens_per_layer",), refuse=(_GEMMA4_KV_SHARING,),
                        gguf=Gguf("", cannot="llmprune has no mapping onto llama.cpp's GEMMA4 graph yet")),
    "opt": Arch(
        layers="model.decoder.layers",
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
        parts=Parts(embed="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm",
                    o="self_attn.out_proj", mlp_in=("fc1",), mlp_out="fc2",
                    norms=("self_attn_layer_norm", "final_layer_norm"), rms_norm=False, mlp_width="ffn_dim",
                    cannot=(("hidden", _OPT_CANNOT), ("heads", _OPT_CANNOT))),
        gguf=Gguf("", cannot="llama.cpp has no OPT architecture"),
    ),
}


@dataclass(frozen=True)
class Multimodal:
    """A vision-language release whose language model is a family of the table (``calibrate --text-only`` takes the
    language model alone): where the checkpoint keeps the text model's tensors, and the prefixes of everything else it
    holds (vision and audio towers, projectors), which is not kept."""

    text: tuple[tuple[str, str], ...]  # (the text model's name prefix, the checkpoint's)
    others: tuple[str, ...]


_QWEN35_VL = Multimodal(text=(("model.", "model.language_model."),), others=("model.visual.",))
# model_type of the release -> where its language model is (its config's ``text_config`` says which family)
MULTIMODAL: dict[str, Multimodal] = {
    "qwen3_5": _QWEN35_VL,
    "qwen3_5_moe": _QWEN35_VL,
    "llama4": Multimodal(text=(("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
                         others=("vision_model.", "multi_modal_projector.")),
    "gemma4": Multimodal(text=(("model.", "model.language_model."),),
                         others=("model.vision_tower.", "model.embed_vision.", "model.audio_tower.",
                                 "model.embed_audio.")),
}


def arch_for(model_type: str) -> Arch:
    try:
        return ARCHS[model_type]
    except KeyError:
        if model_type in MULTIMODAL:
            raise UserError(f"model type '{model_type}' is a vision-language release: calibrate --text-only takes its "
                            "language model alone") from None
        raise UserError(
            f"model type '{model_type}' is not supported; supported: {', '.join(sorted(ARCHS))}"
        ) from None


def expert_groups(config) -> int:
    """The groups a group-limited router chooses among (``Experts.groups``; 1 without)."""
    spec = arch_for(config.model_type).experts
    return int(getattr(config, spec.groups, 1) or 1) if spec is not None and spec.groups else 1


def config_values(config, key: str) -> list:
    """Every value ``config`` gives ``key``: one, or one per block where the config is heterogeneous (Gemma 4's
    ``head_dim`` and ``num_key_value_heads`` differ between its sliding and full-attention blocks, and transformers
    refuses a global read of them)."""
    spec = config.__dict__.get("_heterogeneity_spec")
    if spec is not None and key in spec.per_layer_attributes:
        return [getattr(layer, key, None) for layer in config.per_layer_config]
    return [getattr(config, key, None)]


def config_value(config, key: str, default=None):
    """``config.key``; for a per-block key of a heterogeneous config, the global value it keeps beside the
    per-block ones (what a homogeneous reading would see: only code that the table lets run on such a family, which
    never relies on it being every block's, reads it)."""
    spec = config.__dict__.get("_heterogeneity_spec")
    if spec is None or key not in spec.per_layer_attributes:
        return getattr(config, key, default)
    before = config.allow_global_per_layer_attribute_access
    config.allow_global_per_layer_attribute_access = True  # transformers' documented opt-in
    try:
        return getattr(config, key, default)
    finally:
        config.allow_global_per_layer_attribute_access = before


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


def arch_of_block(block: nn.Module) -> Arch:
    """The table row of the model a block belongs to. Blocks carry no config of their own in every family: the first
    module inside that does is asked (a Qwen3.5 linear-attention block's is its MLP's)."""
    config = next((m.config for m in block.modules() if getattr(getattr(m, "config", None), "model_type", "")), None)
    if config is None:
        return _LLAMA_LIKE  # a block the table cannot place has no experts and nothing to exempt
    return ARCHS.get(config.model_type, _LLAMA_LIKE)
