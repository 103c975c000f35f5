"""A model as one GGUF file that llama.cpp runs (``export --format gguf``; docs/gguf.md).

Tensor names come from the gguf package's tables (``gguf.TensorNameMap``), each family's conventions from
``arch.Gguf``. Whether llama.cpp can express the model is decided (``check``) before a byte is written; the file is
then written tensor by tensor, so the peak is the model plus one converted tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from llmprune import arch as _arch
from llmprune.errors import UserError

# --gguf-type -> gguf.LlamaFileType member. The gguf package writes the plain types itself; the k-quants come from
# llama.cpp's own quantizer (llama-cpp-python, ``llmprune.llamacpp``), run on an f32 file written first.
PLAIN_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}
K_TYPES = {"q2_k": "MOSTLY_Q2_K", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L",
           "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M",
           "q6_k": "MOSTLY_Q6_K"}
GGUF_TYPES = tuple(PLAIN_TYPES) + tuple(K_TYPES)


def gguf_type_option(what: str, panel: str | None = None) -> str:
    """``--gguf-type``, declared once for ``export`` and ``eval --backend llama.cpp``."""
    from llmprune.options import option

    return option("f16", f"{what}: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 (written by the gguf package) or a "
                  "k-quant q2_k .. q6_k, q4_k_m (llama.cpp's quantizer: llmprune\\[gguf]).", choices=GGUF_TYPES,
                  panel=panel)


def type_of(path: Path) -> str:
    """The ``--gguf-type`` name of a GGUF file's ``general.file_type`` ("?" when it names none we write)."""
    from llmprune.provenance import gguf_metadata
    import gguf

    ftype = gguf_metadata(path).get("general.file_type")
    names = {int(getattr(gguf.LlamaFileType, v)): k for k, v in {**PLAIN_TYPES, **K_TYPES}.items()}
    return names.get(int(ftype), "?") if isinstance(ftype, int) else "?"

# The activation each llama.cpp graph hard-codes: a config asking for another computes something else there.
_ACTIVATIONS = {"GEMMA": ("gelu_pytorch_tanh", "gelu"), "GEMMA2": ("gelu_pytorch_tanh",),
                "GEMMA3": ("gelu_pytorch_tanh",), "PHI2": ("gelu_new",)}
_ROPE_TYPES = ("default", "linear", "llama3")  # rope scalings written as GGUF; the others are refused


def file_name(stem: str, gguf_type: str) -> str:
    """The file's name in the export folder, the Hub's convention: ``NAME-TYPE.gguf`` (``model-Q4_K_M.gguf``)."""
    return f"{stem}-{gguf_type.upper()}.gguf"


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    value = getattr(config, key, default)
    return default if value is None else value


def head_dim(config: Any) -> int:
    return int(_cfg(config, "head_dim", config.hidden_size // config.num_attention_heads))


def _rope(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The rotary parameters of one layer type (transformers 5 keeps one dict, or one per layer type)."""
    params = _cfg(config, "rope_parameters", {}) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    return {"theta": float(params.get("rope_theta", _cfg(config, "rope_theta", 10000.0))),
            "type": params.get("rope_type", "default"), "factor": params.get("factor"),
            "partial": float(params.get("partial_rotary_factor", _cfg(config, "partial_rotary_factor", 1.0)))}


def check(config: Any) -> _arch.Gguf:
    """The family's GGUF description, or a ``UserError`` naming what llama.cpp cannot express in this config."""
    model_type = getattr(config, "model_type", "?")
    spec = _arch.arch_for(model_type).gguf
    why = spec.cannot or _refusal(config, spec)
    if why:
        raise UserError(f"export --format gguf: {model_type}: {why}")
    return spec


def _refusal(config: Any, spec: _arch.Gguf) -> str:
    act = _cfg(config, "hidden_act", None) or _cfg(config, "hidden_activation", "silu")
    if act not in _ACTIVATIONS.get(spec.arch, ("silu",)):
        return f"llama.cpp's {spec.arch.lower()} graph computes another activation than hidden_act={act!r}"
    types = list(_cfg(config, "layer_types", []) or [])
    sliding = any(t == "sliding_attention" for t in types) or (not types and _cfg(config, "sliding_window") and
                                                                _cfg(config, "use_sliding_window", True))
    if sliding and not spec.sliding:
        return (f"sliding-window attention (window {_cfg(config, 'sliding_window')}) has no place in llama.cpp's "
                f"{spec.arch.lower()} graph")
    if set(types) - {"sliding_attention", "full_attention"}:
        return f"layer types {sorted(set(types))} are not written as GGUF"
    for layer_type in ("full_attention", "sliding_attention") if spec.sliding else ("full_attention",):
        rope = _rope(config, layer_type)
        if rope["type"] not in _ROPE_TYPES or (rope["type"] == "linear" and layer_type != "full_attention") or (
                rope["type"] == "llama3" and spec.arch != "LLAMA"):
            return f"rope scaling {rope['type']!r} ({layer_type}) is not written as GGUF for {spec.arch.lower()}"
    scalar = _cfg(config, "query_pre_attn_scalar")
    if scalar is not None and int(scalar) != head_dim(config):
        return f"query_pre_attn_scalar {scalar} differs from head_dim {head_dim(config)}: llama.cpp scales by head_dim"
    if spec.no_rope_period:
        want = [int((i + 1) % spec.no_rope_period != 0) for i in range(config.num_hidden_layers)]
        if list(_cfg(config, "no_rope_layers", want)) != want:
            return (f"llama.cpp's {spec.arch.lower()} graph leaves rotary embeddings out of every "
                    f"{spec.no_rope_period}th layer, and this model's layers without them are "
                    f"{[i for i, r in enumerate(config.no_rope_layers) if not r]}")
    if _cfg(config, "mlp_bias", False):
        return "MLP biases (mlp_bias) have no tensor in llama.cpp's graph"
    if not _cfg(config, "tie_word_embeddings", False) and _head_name(spec) is None:
        return (f"llama.cpp's {spec.arch.lower()} graph reads the output head from the embedding, and this model's "
                "head is a matrix of its own (tie_word_embeddings=False)")
    if spec.experts and (_cfg(config, "mlp_only_layers", []) or int(_cfg(config, "decoder_sparse_step", 1)) != 1):
        return "dense MLP layers between the expert layers (mlp_only_layers, decoder_sparse_step) are not in its graph"
    return ""


def _head_name(spec: _arch.Gguf) -> str | None:
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.arch), 1).get_name("lm_head")


def metadata(writer: Any, config: Any, spec: _arch.Gguf, n_vocab: int) -> None:
    """The hyper-parameters llama.cpp reads for this family, from the (possibly smaller) config."""
    w, c = writer, config
    hd = head_dim(c)
    w.add_context_length(int(_cfg(c, "max_position_embeddings", 2048)))
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(int(_cfg(c, "intermediate_size", 0)))
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(int(_cfg(c, "num_key_value_heads", c.num_attention_heads)))
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_vocab_size(n_vocab)
    if hasattr(c, "rms_norm_eps"):
        w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    else:
        w.add_layer_norm_eps(float(_cfg(c, "layer_norm_eps", 1e-5)))
    rope = _rope(c)
    w.add_rope_freq_base(rope["theta"])
    w.add_rope_dimension_count(int(hd * rope["partial"]))
    if rope["type"] == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if spec.sliding:
        types = list(_cfg(c, "layer_types", []))
        w.add_sliding_window(int(c.sliding_window))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])  # per layer: block removal keeps
        w.add_rope_freq_base_swa(_rope(c, "sliding_attention")["theta"])  # each survivor's own kind
    for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                     ("final_logit_softcapping", w.add_final_logit_softcapping)):
        if _cfg(c, key) is not None:
            add(float(_cfg(c, key)))
    if spec.experts:
        w.add_expert_count(int(_cfg(c, "num_experts", _cfg(c, "num_local_experts", 0))))
        w.add_expert_used_count(int(c.num_experts_per_tok))
        if _cfg(c, "moe_intermediate_size"):
            w.add_expert_feed_forward_length(int(c.moe_intermediate_size))
        if _cfg(c, "shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(int(c.shared_expert_intermediate_size))


def llama3_rope_factors(head_dim: int, theta: float, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's rotary scaling as the per-frequency divisors llama.cpp reads from ``rope_freqs.weight``: a
    frequency whose wavelength is shorter than ``original context / high_freq_factor`` is kept (1), one longer than
    ``original context / low_freq_factor`` is slowed by ``factor``, and between the two the divisor interpolates
    smoothly (Meta's Llama 3.1 reference code; transformers' ``_compute_llama3_parameters``)."""
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    context = float(params.get("original_max_position_embeddings", 8192))
    out = []
    for freq in (1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def rope_pairs(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of each head from transformers' halves layout (rotate ``x[:d/2]`` with ``x[d/2:]``) to
    the adjacent-pairs layout of llama.cpp's llama graph (rotate ``x[2i]`` with ``x[2i+1]``): row ``i`` of the
    first half goes to ``2i``, row ``i`` of the second to ``2i + 1``. Works for a weight or a bias."""
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


@dataclass(frozen=True)
class Tensor:
    """One tensor of the file: its GGUF name, the numpy shape of its values, and how to compute them."""

    name: str
    shape: tuple[int, ...]
    values: Callable[[], torch.Tensor]


def tensors(model: Any, spec: _arch.Gguf) -> Iterator[Tensor]:
    """Every tensor of ``model`` under its GGUF name, with the family's conversions applied."""
    import gguf

    config = model.config
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.arch), n_layers)
    parts = _arch.arch_for(config.model_type).parts
    tied = bool(_cfg(config, "tie_word_embeddings", False))
    heads, kv_heads = config.num_attention_heads, int(_cfg(config, "num_key_value_heads", config.num_attention_heads))
    rope = _rope(config)
    if rope["type"] == "llama3":
        factors = llama3_rope_factors(int(head_dim(config) * rope["partial"]), rope["theta"],
                                      _cfg(config, "rope_parameters", {}))
        yield Tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", tuple(factors.shape),
                     lambda: factors)
    for hf_name, param in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the head from token_embd when output is absent
        base, _, suffix = hf_name.rpartition(".")
        if spec.experts and hf_name.endswith("experts.gate_up_proj"):
            yield from _split_gate_up(hf_name, param)
            continue
        if spec.experts and hf_name.endswith("experts.down_proj"):
            yield Tensor(_layer_name(hf_name, gguf.MODEL_TENSOR.FFN_DOWN_EXP), tuple(param.shape),
                         lambda p=param: p)
            continue
        target = names.get_name(base)
        if target is None:
            raise UserError(f"export --format gguf: {config.model_type}: no GGUF name for the tensor {hf_name}")
        name, fn = f"{target}.{suffix}", (lambda p=param: p)
        if spec.rope_pairs and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            n = heads if base.endswith("q_proj") else kv_heads
            fn = (lambda p=param, n=n: rope_pairs(p, n))
        elif parts.norm_offset and param.dim() == 1 and "norm" in base and suffix == "weight":
            fn = (lambda p=param: p.float() + parts.norm_offset)  # llama.cpp multiplies by the stored scale
        if param.dim() == 2 and param.shape[0] == 1 and target.endswith("ffn_gate_inp_shexp"):
            fn, shape = (lambda p=param: p.reshape(-1)), (param.shape[1],)  # one gate: a vector in llama.cpp
        else:
            shape = tuple(param.shape)
        yield Tensor(name, shape, fn)


def _layer_name(hf_name: str, kind: Any) -> str:
    import gguf

    bid = int(hf_name.split(".layers.", 1)[1].split(".", 1)[0])
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"


def _split_gate_up(hf_name: str, param: torch.Tensor) -> Iterator[Tensor]:
    """``gate_up_proj[e] = [gate_e; up_e]`` (rows) as llama.cpp's two stacks ``ffn_gate_exps`` and ``ffn_up_exps``."""
    import gguf

    e, rows, cols = param.shape
    half = rows // 2
    yield Tensor(_layer_name(hf_name, gguf.MODEL_TENSOR.FFN_GATE_EXP), (e, half, cols), lambda: param[:, :half])
    yield Tensor(_layer_name(hf_name, gguf.MODEL_TENSOR.FFN_UP_EXP), (e, half, cols), lambda: param[:, half:])


def ggml_type(tensor: Tensor, gguf_type: str) -> Any:
    """The storage type of one tensor at ``gguf_type`` (a plain type): vectors stay f32, as llama.cpp's own
    conversion keeps them; a quantized type falls back to f16 where a row is not a whole number of its blocks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(tensor.shape) < 2 or gguf_type == "f32":
        return Q.F32
    qtype = getattr(Q, gguf_type.upper())
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if tensor.shape[-1] % block == 0 else Q.F16


def encode(values: torch.Tensor, qtype: Any) -> np.ndarray:
    """The bytes (or f32/f16 values) of one tensor in ``qtype``, through the gguf package's own quantizers."""
    import gguf

    array = values.detach().to(torch.float32).contiguous().numpy()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def write(model: Any, out: Path, gguf_type: str, *, add_tokenizer: Callable[[Any], int],
          general: dict[str, Any], progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write ``model`` to ``out`` at a plain ``gguf_type``: metadata, the tokenizer (``add_tokenizer(writer)``
    returns the vocabulary's size), ``general`` keys (name, license, provenance), then each tensor in turn."""
    import gguf

    if gguf_type not in PLAIN_TYPES:
        raise ValueError(gguf_type)
    spec = check(model.config)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, spec.arch)])
    n_vocab = add_tokenizer(writer)
    rows = model.get_input_embeddings().weight.shape[0]
    if n_vocab != rows:
        raise UserError(f"export --format gguf: the tokenizer has {n_vocab} tokens and the embedding {rows} rows")
    metadata(writer, model.config, spec, n_vocab)
    writer.add_file_type(getattr(gguf.LlamaFileType, PLAIN_TYPES[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in general.items():
        _add_general(writer, key, value)
    plan = [(t, ggml_type(t, gguf_type)) for t in tensors(model, spec)]
    for t, qtype in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (t, qtype) in enumerate(plan):
        if progress is not None:
            progress(i, len(plan), t.name)
        writer.write_tensor_data(encode(t.values(), qtype))
    writer.close()
    return out


def _add_general(writer: Any, key: str, value: Any) -> None:
    import gguf

    if value is None:
        return
    if isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    elif isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint64(key, value) if value >= 0 else writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)
    else:
        writer.add_key_value(key, str(value), gguf.GGUFValueType.STRING)


def source_gguf(base: dict[str, Any]) -> Path | None:
    """The GGUF file the workdir was calibrated from, when it is still where it was named and unchanged (its
    SHA-256): its tokenizer keys are copied as they are. None otherwise (the tokenizer is built from
    ``tokenizer.json``)."""
    from llmprune.fsio import sha256_file

    src = base.get("source", "")
    path = Path(src) if isinstance(src, str) and src.endswith(".gguf") else None
    if path is None or not path.is_file() or not base.get("sha256"):
        return None
    return path if sha256_file(path) == base["sha256"] else None


def general_keys(manifest: dict[str, Any], name: str, license_: str | None, digest: str) -> dict[str, Any]:
    """``general.*`` and ``llmprune.*`` keys: the name, licence, base model and provenance (llmprune's version, the
    steps that made the model, the source's and the model's SHA-256)."""
    from llmprune import __version__

    base = manifest.get("base_model", {})
    steps = manifest.get("steps", [])
    methods = [f"{s['command']}:{s['params'].get('method') or s['params'].get('structure') or ''}".rstrip(":")
               for s in steps if s["command"] in ("regularize", "prune", "recover")]
    keys: dict[str, Any] = {"general.name": name, "general.quantized_by": "llmprune",
                            "general.license": license_ or base.get("license"),
                            "llmprune.version": __version__, "llmprune.steps": ", ".join(methods) or "none",
                            "llmprune.source": Path(str(base.get("source", ""))).name or None,
                            "llmprune.source_sha256": base.get("sha256"), "llmprune.model_sha256": digest}
    if base.get("hub_id"):
        keys.update({"general.base_model.count": 1, "general.base_model.0.name": base["hub_id"],
                     "general.base_model.0.repo_url": f"https://huggingface.co/{base['hub_id']}"})
    return keys


def from_workdir(ws: Any, out: Path, gguf_type: str, name: str, license_: str | None = None) -> Path:
    """The workdir's current model (a pending adapter merged) as ``out`` at ``gguf_type``; a k-quant is quantized by
    llama.cpp from an f32 file written beside ``out`` first (and removed)."""
    from transformers import AutoConfig

    from llmprune import gguf_vocab, llamacpp, report
    from llmprune.current import load_current, model_digest

    manifest = ws.manifest()
    spec = check(AutoConfig.from_pretrained(ws.model_dir))  # refused before the model is loaded or written
    if gguf_type in K_TYPES:
        llamacpp.require(f"--gguf-type {gguf_type}")
    model, _tok = load_current(ws)
    general = general_keys(manifest, name, license_, model_digest(manifest))
    src = source_gguf(manifest.get("base_model", {}))
    plain = out if gguf_type in PLAIN_TYPES else out.with_name(f".{out.name}.f32")
    with report.progress(f"writing {plain.name}", sum(1 for _ in tensors(model, spec))) as advance:
        write(model, plain, gguf_type if gguf_type in PLAIN_TYPES else "f32",
              add_tokenizer=lambda w: gguf_vocab.add_tokenizer(w, ws.model_dir, src), general=general,
              progress=lambda i, n, t: advance())
    if plain != out:
        try:
            report.info(f"quantizing to {gguf_type} with llama.cpp")
            llamacpp.quantize(plain, out, K_TYPES[gguf_type])
        finally:
            plain.unlink(missing_ok=True)
    return out
