"""Expert removal on a small mixture-of-experts model trained here (no real MoE model can be fetched: see README).

A Qwen3-MoE-shaped model (SmolLM2's tokenizer, 4 blocks of width 128, 8 experts of width 128, 2 per token, the
router renormalising over them, as Qwen3-MoE releases do) is trained from scratch with the LM loss on the protocol's
calibration text (the fit part; never the test split) for ``--train-steps`` steps, so that its router has learnt
something to lose. Then, from one calibrated workdir of it, ``llmprune prune --method dress --structure experts``
removes 25% and 50% of the experts of every block, selected by REAP, frequency and at random, directly or after
``llmprune regularize --structure experts`` (DReSS for experts); each row's test perplexity is read against the
trained model's. A toy-sized model: the ranking of the selections is what it can show, not a real model's numbers.

    python benchmarks/moe_bench.py                                     # train (~3 min), then every row
    python benchmarks/moe_bench.py --ratios 0.5 --selects reap --reg "--steps 200"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from prune_bench import LLMPRUNE, calibrated_base, popen_rss, save_results  # noqa: E402
from wandapp_ablation import split_calibration  # noqa: E402


def train_moe(out: Path, tokenizer_dir: Path, text: Path, steps: int, seqlen: int, seed: int = 0) -> dict:
    """Train the small MoE from scratch on ``text``; saved to ``out`` with the tokenizer. Returns its training log."""
    import transformers as tf

    from llmprune import data

    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = tf.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, intermediate_size=256, moe_intermediate_size=128,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=1024,
                            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    ids = data.tokenize(tok, text.read_text(encoding="utf-8"))
    windows = data.random_windows(ids, steps * 8, seqlen, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        batch = windows[step * 8 : (step + 1) * 8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if step % 50 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"train_steps": steps, "train_s": round(time.perf_counter() - t0, 1), "final_loss": sum(losses[-20:]) / 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=600)
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--selects", default="reap,frequency,random")
    ap.add_argument("--modes", default="direct,dress")
    ap.add_argument("--reg", default="--steps 100 --lambda 0.02", help="options of `llmprune regularize`")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("runs/moe-bench"))
    ap.add_argument("--save", default="moe-experts")
    args = ap.parse_args()

    paths = assets.fetch()
    fit, _ = split_calibration(Path(paths["calib"]))
    tokenizer_dir = calibrated_base(Path("runs/bench"), paths, 64, 512) / "model"
    model_dir = args.out / f"moe-{args.train_steps}"
    log = args.out / f"moe-{args.train_steps}.json"
    if not log.exists():
        if model_dir.exists():
            shutil.rmtree(model_dir)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps(train_moe(model_dir, tokenizer_dir, fit, args.train_steps, args.seqlen)))
    trained = json.loads(log.read_text())
    base = args.out / "base"
    if not (base / "manifest.json").exists():
        popen_rss([*LLMPRUNE, "calibrate", str(base), "--model", str(model_dir), "--dataset", str(fit), "--samples",
                   "64", "--seqlen", str(args.seqlen), "--force"])
    evalargs = ["--dataset", paths["test"], "--seqlen", str(args.seqlen), "--max-windows", "256"]
    dense, _, _ = popen_rss([*LLMPRUNE, "eval", str(base), *evalargs])
    rows = []
    for ratio in args.ratios.split(","):
        for select in args.selects.split(","):
            for mode in args.modes.split(","):
                wd = args.out / f"{select}-{ratio}-{mode}"
                if wd.exists():
                    shutil.rmtree(wd)
                shutil.copytree(base, wd)
                sel = ["--structure", "experts", "--ratio", ratio, "--select", select]
                reg, reg_s = {}, None
                if mode == "dress":
                    reg, reg_s, _ = popen_rss([*LLMPRUNE, "regularize", str(wd), *sel, *args.reg.split()])
                res, _, _ = popen_rss([*LLMPRUNE, "prune", str(wd), "--method", "dress",
                                       *(sel if mode == "direct" else [])])
                ev, _, _ = popen_rss([*LLMPRUNE, "eval", str(wd), *evalargs])
                row = dict(ratio=float(ratio), select=select, mode=mode, parameters=res["parameters"],
                           parameters_before=res["parameters_before"], ppl=ev["perplexity"],
                           dense_ppl=dense["perplexity"], regularize_s=reg_s, heldout_gap=reg.get("gap"),
                           removed=res["plan"]["removed"], windows=ev["windows"])
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(wd)
    caption = (f"A Qwen3-MoE-shaped model (4 blocks, width 128, 8 experts of 128, top-2, renormalised) trained here "
               f"from scratch for {trained['train_steps']} steps ({trained['train_s']} s, final loss "
               f"{trained['final_loss']:.3f}) on the calibration text; test perplexity over {rows[0]['windows']} "
               f"windows of {args.seqlen}; regularize options: {args.reg}. Command: python benchmarks/moe_bench.py "
               + " ".join(sys.argv[1:]))
    save_results(Path(__file__).parent / "results", args.save, rows, caption, table(rows))


def table(rows: list[dict]) -> str:
    direct = {(r["ratio"], r["select"]): r["ppl"] for r in rows if r["mode"] == "direct"}
    lines = ["| experts removed | select | mode | parameters | ppl | / trained model | / direct |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = direct.get((r["ratio"], r["select"]))
        vs_direct = f"{r['ppl'] / d:.3f}" if d else "–"
        lines.append(f"| {r['ratio']:.0%} | {r['select']} | {r['mode']} | {r['parameters']:,} | {r['ppl']:.2f} | "
                     f"{r['ppl'] / r['dense_ppl']:.2f} | {vs_direct} |")
    lines.append(f"\ntrained model: {rows[0]['parameters_before']:,} parameters, perplexity {rows[0]['dense_ppl']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
