"""The peak memory of regularize and recover, estimated before anything is loaded (``llmprune.memory``): the count
of what autograd keeps per block equals what it keeps, the estimate is recorded, and a step that would not fit is
refused in one line naming what would."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import cli
from llmprune import memory
from llmprune.cli import run


def saved_bytes(model_dir, layers: int, seqlen: int, lora_dropout: float | None) -> int:
    """Bytes autograd keeps for one training forward of one window (each storage once, weights excluded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if lora_dropout is not None:
        from llmprune.recovery import add_lora, targets_for

        model = add_lora(model, targets_for(model, "auto"), 8, 16, lora_dropout)
    model.train()
    weights = {p.data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (1, seqlen))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(kept.values())


@pytest.mark.parametrize("lora_dropout", [None, 0.05], ids=["full", "lora"])
def test_the_per_block_count_is_what_autograd_keeps(tiny_root, lora_dropout):
    """One block more keeps ``8 h + 2 kv + 4 i`` values per token (fp32), and LoRA with dropout each adapter's
    dropped input and its mask on top: measured as the difference between a 2-block and a 1-block model."""
    folder = tiny_root / "llama"
    g = memory.geometry(folder)
    seqlen = 32
    per_block = (saved_bytes(folder, 2, seqlen, lora_dropout) - saved_bytes(folder, 1, seqlen, lora_dropout)) / seqlen
    g1 = memory.Geometry(g.parameters, g.hidden, 1, g.mlp_width, g.kv_width, g.vocab,
                         g.block_linears[: len(g.block_linears) // g.layers])
    want = 4 * memory.block_values_per_token(g1)
    if lora_dropout:
        want += 4 * memory.lora_values_per_token(g1, True)
    assert per_block == pytest.approx(want, rel=0.03)  # a norm's statistics and the attention's log-sum-exp: <3%


def test_geometry_reads_the_config_and_headers_only(tiny_root):
    g = memory.geometry(tiny_root / "qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "qwen3_moe")
    assert g.parameters == sum(p.numel() for p in model.parameters())
    cfg = model.config
    assert g.mlp_width == cfg.num_experts_per_tok * cfg.moe_intermediate_size + getattr(
        cfg, "shared_expert_intermediate_size", 0)
    assert g.layers == cfg.num_hidden_layers and g.vocab == cfg.vocab_size


def test_each_part_scales_as_it_should(tiny_root):
    g = memory.geometry(tiny_root / "llama")
    one = memory.estimate(g, memory.Setting(batch=1, seqlen=64, full=True))
    two = memory.estimate(g, memory.Setting(batch=2, seqlen=64, full=True))
    lora = memory.estimate(g, memory.Setting(batch=1, seqlen=64, full=False))
    ckpt = memory.estimate(g, memory.Setting(batch=1, seqlen=64, full=True, grad_checkpointing=True))
    bf16 = memory.estimate(g, memory.Setting(batch=1, seqlen=64, full=True, precision="bf16"))
    assert two["activations"] == 2 * one["activations"] and two["weights"] == one["weights"]
    assert one["optimizer"] == 2 * one["gradients"] == 8 * g.parameters
    assert lora["gradients"] == 4 * 8 * sum(i + o for i, o in g.block_linears) and lora["weights"] == one["weights"]
    assert ckpt["activations"] < one["activations"] and bf16["activations"] < one["activations"]


def test_the_estimate_is_printed_and_recorded(calibrated, capsys):
    wd = calibrated("llama", samples=20, seqlen=64)
    code, res = cli("recover", wd, "--steps", 2, "--eval-every", 2, "--batch-size", 4, "--holdout", 4)
    assert code == 0
    est = res["memory_estimate"]
    assert est["device"] == "cpu" and est["peak_mib"] >= est["base_mib"] > 0 and est["available_mib"] > 0
    assert "memory: about" in capsys.readouterr().err
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["metrics"]["memory_estimate"] == est


def test_a_step_that_cannot_fit_is_refused_naming_what_would(calibrated, monkeypatch, capsys):
    """With less memory free than recover --full at batch 8 needs but enough for it with gradient checkpointing,
    it is refused before anything is loaded, naming that; --no-memory-check runs it anyway."""
    wd = calibrated("llama", samples=20, seqlen=64)
    g = memory.geometry(wd / "model")
    base = 100 * memory.MIB
    monkeypatch.setattr(memory, "process_bytes", lambda: base)
    small = memory.estimate(g, memory.Setting(batch=8, seqlen=64, full=True, grad_checkpointing=True))["peak"]
    monkeypatch.setattr(memory, "available_bytes", lambda device: base + small + 1)
    manifest = (wd / "manifest.json").read_text()
    capsys.readouterr()
    assert run(["recover", str(wd), "--full", "--batch-size", "8", "--holdout", "4", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "recover needs about" in err and "it would fit with --grad-checkpointing" in err and "Traceback" not in err
    assert (wd / "manifest.json").read_text() == manifest  # nothing ran
    code, _ = cli("recover", wd, "--full", "--batch-size", "8", "--holdout", "4", "--steps", "1",
                  "--no-memory-check")
    assert code == 0
