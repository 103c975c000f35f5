"""Tiny random-init models of every supported architecture, and a tokenizer, built offline from configs."""

from __future__ import annotations

import random
from pathlib import Path

import torch

VOCAB = 384
WORDS = (
    "the model of a language predicts next token from its context weights are pruned when small and the "
    "activations large sparse networks keep accuracy with careful calibration data blocks layers heads channels "
    "attention mlp residual stream norm embedding output input matrix row column group pattern two four eight"
).split()


def corpus(n_words: int = 20000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sents = []
    while n_words > 0:
        k = rng.randint(5, 15)
        sents.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return " ".join(sents)


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus(5000, seed=1)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def config(model_type: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if model_type == "llama":
        return tf.LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True)
    if model_type == "mistral":
        return tf.MistralConfig(**common, intermediate_size=128, num_key_value_heads=2, sliding_window=None)
    if model_type == "qwen2":
        return tf.Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2)
    if model_type == "qwen3":
        return tf.Qwen3Config(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16)
    if model_type == "phi":
        return tf.PhiConfig(**common, intermediate_size=128, partial_rotary_factor=0.5)
    if model_type == "gemma":
        return tf.GemmaConfig(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16)
    # Gemma 2 / 3: both layer types, with a sliding window shorter than the tests' sequences, so that a block given
    # another layer type's mask or rotary tables computes something else; Gemma 2's logit cap low enough to bite.
    # (The released Gemmas tie their head; Gemma 2 here does not, so both rescales of hidden removal are tested.)
    if model_type == "gemma2":
        return tf.Gemma2Config(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                               query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=3.0,
                               attn_logit_softcapping=20.0, layer_types=["sliding_attention", "full_attention"],
                               tie_word_embeddings=False)  # a scaled embedding with its own head: the other rescale
    if model_type == "gemma3_text":
        return tf.Gemma3TextConfig(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                   query_pre_attn_scalar=16, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"])
    if model_type == "smollm3":  # the second block without rotary embeddings (the release: every fourth)
        return tf.SmolLM3Config(**common, intermediate_size=128, num_key_value_heads=2, pad_token_id=None,
                                bos_token_id=0, eos_token_id=0, no_rope_layers=[1, 0])
    if model_type == "olmo3":  # post-norms, q/k norms across heads, a sliding layer with a window shorter than tests
        return tf.Olmo3Config(**common, intermediate_size=128, num_key_value_heads=2, pad_token_id=None,
                              bos_token_id=0, eos_token_id=0, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"])
    if model_type == "phi3":
        return tf.Phi3Config(**common, intermediate_size=128, num_key_value_heads=2, pad_token_id=0,
                             bos_token_id=0, eos_token_id=0)
    # Mixture-of-experts: 4 experts, 2 per token, so that with a few windows some expert of some block may see
    # few or no tokens; Qwen3-MoE with a dense MLP layer after a sparse one, Qwen2-MoE with its shared expert.
    moe = dict(num_key_value_heads=2, num_experts_per_tok=2)
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, **moe, num_experts=4, moe_intermediate_size=32, intermediate_size=128,
                                 head_dim=16, mlp_only_layers=[1])
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, **moe, num_experts=4, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=96, intermediate_size=128)
    if model_type == "mixtral":
        return tf.MixtralConfig(**common, **moe, num_local_experts=4, intermediate_size=32, sliding_window=None)
    # DeepSeek-V3's MoE (sigmoid scores, a score-correction bias, scaled weights, shared experts, a dense first
    # block): GLM-4.5 with one expert group (its release) and q/k/v biases and q/k norms; DeepSeek-V3 with two groups
    # (the release: 8) and its latent attention, ranks and head widths all distinct.
    sigmoid = dict(moe, n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                   routed_scaling_factor=2.5, intermediate_size=128, pad_token_id=None, bos_token_id=0,
                   eos_token_id=0)
    if model_type == "glm4_moe":
        return tf.Glm4MoeConfig(**common, **sigmoid, head_dim=16, n_group=1, topk_group=1, attention_bias=True,
                                use_qk_norm=True)
    if model_type == "deepseek_v3":
        return tf.DeepseekV3Config(**common, **{**sigmoid, "n_routed_experts": 8}, n_group=2, topk_group=1,
                                   q_lora_rank=48, kv_lora_rank=32,
                                   qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=24)
    # Qwen3.5: a linear-attention block, then a full-attention one (the release: three, then one); its MoE sibling
    # with Qwen2-MoE's experts and gated shared expert.
    hybrid = dict(num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=8, linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"],
                  pad_token_id=None, bos_token_id=0, eos_token_id=0)
    if model_type == "qwen3_5_text":
        return tf.Qwen3_5TextConfig(**common, **hybrid, intermediate_size=128)
    if model_type == "qwen3_5_moe_text":
        return tf.Qwen3_5MoeTextConfig(**common, **hybrid, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, shared_expert_intermediate_size=96)
    # gpt-oss: experts stored [E, in, out] with biases, gate and up interleaved, a clamp low enough to bite on
    # these activations (the release: 7.0), a router with a bias, per-head attention sinks, q/k/v/o biases, both
    # layer types with a window shorter than the tests' sequences.
    if model_type == "gpt_oss":
        return tf.GptOssConfig(**{**common, "max_position_embeddings": 4096 * 32}, **moe,  # the length of its YaRN
                               num_local_experts=4, intermediate_size=32, head_dim=16,
                               sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                               swiglu_limit=0.5, pad_token_id=None, bos_token_id=0, eos_token_id=0)
    # Llama 4: a dense block then an MoE one (interleaved as in Maverick) with a shared expert beside the experts,
    # each token's router score multiplied into the experts' input, one expert per token (the release); chunked
    # attention with a chunk shorter than the tests' sequences on the rotary block, temperature tuning on the
    # block without rotary embeddings.
    if model_type == "llama4_text":
        return tf.Llama4TextConfig(**common, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                   num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=128,
                                   interleave_moe_layer_step=2, no_rope_layers=[1, 0], attention_chunk_size=8,
                                   floor_scale=4, pad_token_id=None, bos_token_id=0, eos_token_id=0)
    # Gemma 4: a sliding block, then a full-attention one with its own head width and KV head count whose keys serve
    # as values; per-layer inputs; the MoE release's experts beside the dense MLP of each block; a logit cap.
    if model_type == "gemma4_text":
        return tf.Gemma4TextConfig(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                   global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                                   hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"], enable_moe_block=True,
                                   num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                                   final_logit_softcapping=3.0, pad_token_id=None, bos_token_id=0, eos_token_id=0)
    if model_type == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64)
    raise ValueError(model_type)


def fast_options(method: str) -> dict:
    """Options that keep a method cheap on the tiny models without skipping a code path: Wanda++ runs one RO round
    and keeps the regional-gradient term (its defaults, alpha 0, would leave the backward pass untested)."""
    return {"ro_iters": 1, "alpha": 100.0} if method == "wandapp" else {}


MOE_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral", "glm4_moe", "deepseek_v3", "qwen3_5_moe_text", "gpt_oss",
             "llama4_text", "gemma4_text")
# those whose experts can be removed: all (DeepSeek-V3's group-limited router, evenly from every group)
EXPERT_REMOVAL_TYPES = MOE_TYPES
# The families released in 2025-2026 that the table added (issue #47): each runs the whole pipeline in
# tests/test_families.py.
FAMILIES_2026 = ("smollm3", "olmo3", "glm4_moe", "deepseek_v3", "qwen3_5_text", "qwen3_5_moe_text", "gpt_oss",
                 "llama4_text", "gemma4_text")
ARCH_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "opt", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3",
              "olmo3", "qwen3_5_text", *MOE_TYPES)


def build(model_type: str, out: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(model_type))
    # Random init is near-uniform; a larger scale gives distinct weights and activations to prune.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # Linears, 3-D expert parameters, routers
                p.normal_(0, 0.08)
            elif "norm" in name and name.endswith("weight"):
                # norms away from their init (ones, or Gemma's zeros for 1 + w): a rescale that forgets Gemma's
                # offset, or a norm left out of it, shows in the structured-removal exactness tests
                p.add_(torch.randn_like(p), alpha=0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros at init: a removal that forgets to cut it shows
                b.normal_(0, 0.1)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer().save_pretrained(out)
    return out


def model_and_inputs(root: Path, model_type: str, samples: int, seqlen: int, batch_size: int, seed: int = 0):
    """A tiny model from ``root``, random token windows, and the captured inputs of its block 0."""
    from transformers import AutoModelForCausalLM

    from llmprune import engine

    model = AutoModelForCausalLM.from_pretrained(root / model_type).eval()
    torch.manual_seed(seed)
    windows = torch.randint(0, VOCAB, (samples, seqlen))
    return model, windows, engine.capture(model, windows, batch_size=batch_size)
