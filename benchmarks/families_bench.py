"""What this year's block designs cost to prune: Wanda 2:4 and SparseGPT 50% on random-init models of a realistic
shape, streamed from disk, against a Llama of about the same size.

Five families of ~0.3B parameters, all with hidden size 1024, 16 blocks and SmolLM2's 49,152-token vocabulary:
- ``llama``: the reference (16 heads, 4 KV groups, MLP 4096);
- ``qwen3_5_text``: Qwen3.5's hybrid blocks, three gated linear-attention blocks to one full-attention block (as
  released), MLP 4096;
- ``deepseek_v3``: multi-head latent attention and a mixture of experts (a dense first block, then 8 routed experts
  of width 512, 2 per token, and one shared expert), one expert group;
- ``gpt_oss``: 8 experts of width 512 stored ``[E, in, out]`` with biases, 2 per token, attention sinks;
- ``llama4_text``: dense and MoE blocks alternating, 8 experts of width 512 beside a shared one, 1 per token.

For each: ``calibrate`` (16 x 512 windows of the benchmark text), then ``prune --method wanda --pattern 2:4`` and
``prune --method sparsegpt --sparsity 0.5`` on hard-linked copies of the calibrated workdir, each in its own process
(peak RSS from ``wait4``). Random weights: the seconds and memory are the figures here, not the perplexities.

    python benchmarks/families_bench.py --samples 8 --seqlen 256     # about 12 minutes on 2 cores
    python benchmarks/families_bench.py --families llama,qwen3_5_text
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, popen_rss, save_results  # noqa: E402
from scale_bench import linked_copy  # noqa: E402

COMMON = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
              vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-6,
              bos_token_id=0, eos_token_id=0, pad_token_id=None)
FAMILIES = {
    "llama": dict(intermediate_size=4096),
    "qwen3_5_text": dict(intermediate_size=4096, linear_num_key_heads=8, linear_num_value_heads=16,
                         linear_key_head_dim=64, linear_value_head_dim=64,
                         layer_types=["linear_attention"] * 3 + ["full_attention"]),  # repeated to 16 below
    "deepseek_v3": dict(intermediate_size=4096, moe_intermediate_size=512, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=384,
                        kv_lora_rank=256, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
                        num_key_value_heads=16),
    # gpt-oss: 8 experts of width 512 stored [E, in, out] with biases, 2 per token, attention sinks, sliding and full
    # layers (its YaRN needs its own context length)
    "gpt_oss": dict(intermediate_size=512, num_local_experts=8, num_experts_per_tok=2, sliding_window=128,
                    layer_types=["sliding_attention", "full_attention"], max_position_embeddings=131072),
    # Llama 4: dense and MoE blocks alternating (Maverick), 8 experts of width 512 and a shared one, 1 per token
    "llama4_text": dict(intermediate_size=512, intermediate_size_mlp=4096, num_local_experts=8, num_experts_per_tok=1,
                        interleave_moe_layer_step=2),
}


def config(family: str):
    from transformers import AutoConfig

    kw = {**COMMON, **FAMILIES[family]}
    if "layer_types" in kw:
        kw["layer_types"] = (kw["layer_types"] * kw["num_hidden_layers"])[: kw["num_hidden_layers"]]
    if family == "deepseek_v3":
        kw.pop("head_dim")
    return AutoConfig.for_model(family, **kw, dtype="bfloat16")


def build(family: str, out: Path) -> None:
    """In a child process (its peak RSS must not carry into the commands' ``wait4`` figures: scale_bench.py)."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[3]); import random_model, families_bench as f; "
            "random_model.write(__import__('pathlib').Path(sys.argv[2]), f.config(sys.argv[1]), torch.bfloat16)")
    subprocess.run([sys.executable, "-c", code, family, str(out), str(Path(__file__).parent)], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("runs/families"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    paths = assets.fetch()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in args.families.split(","):
        src = args.out / f"random-{family}"
        build(family, src)
        base = args.out / f"work-{family}"
        shutil.rmtree(base, ignore_errors=True)
        res, wall, rss = popen_rss([*LLMPRUNE, "calibrate", str(base), "--model", str(src), "--dataset",
                                    paths["calib"], "--samples", str(args.samples), "--seqlen", str(args.seqlen)])
        row = dict(family=family, parameters=res["parameters"], calibrate_s=round(wall, 1),
                   calibrate_rss_gb=round(rss / 1024, 2))
        for method, pattern in (("wanda", ["--pattern", "2:4"]), ("sparsegpt", ["--sparsity", "0.5"])):
            wd = args.out / f"{family}-{method}"
            linked_copy(base, wd)
            res, wall, rss = popen_rss([*LLMPRUNE, "prune", str(wd), "--method", method, *pattern])
            row[f"{method}_s"], row[f"{method}_rss_gb"] = round(wall, 1), round(rss / 1024, 2)
            row[f"{method}_sparsity"] = res["sparsity"]["all"]
            row[f"{method}_no_token_weights"] = res.get("no_token_weights", 0)
            shutil.rmtree(wd)
        shutil.rmtree(base)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write(rows, args)


def write(rows: list[dict], args) -> None:
    ref = next((r for r in rows if r["family"] == "llama"), None)
    ratio = (lambda r, k: f"{r[k] / ref[k]:.2f}x" if ref else "")  # noqa: E731
    lines = ["| family | parameters (M) | calibrate s | Wanda 2:4 s | vs Llama | peak RSS GB | vs Llama "
             "| SparseGPT 50% s | vs Llama | peak RSS GB | vs Llama |", "|---" * 11 + "|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['parameters'] / 1e6:.0f} | {r['calibrate_s']} | {r['wanda_s']} | "
                     f"{ratio(r, 'wanda_s')} | {r['wanda_rss_gb']} | {ratio(r, 'wanda_rss_gb')} | {r['sparsegpt_s']} | "
                     f"{ratio(r, 'sparsegpt_s')} | {r['sparsegpt_rss_gb']} | {ratio(r, 'sparsegpt_rss_gb')} |")
    command = (f"python benchmarks/families_bench.py --families {args.families} --samples {args.samples} "
               f"--seqlen {args.seqlen}")
    for r in rows:
        r["command"] = command
    caption = (f"Random-init bf16 models streamed from disk, {args.samples} x {args.seqlen} calibration windows, one "
               f"process per command, 2 CPU cores. `{command}`")
    save_results(args.results, "families", rows, caption, "\n".join(lines))


if __name__ == "__main__":
    main()
