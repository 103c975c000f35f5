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


def _llama7b() -> memory.Geometry:
    """Llama-2-7B's shapes (32 blocks of hidden 4096, MLP 11008, vocabulary 32000), without a file."""
    h, i, layers, vocab = 4096, 11008, 32, 32000
    block = ((h, h),) * 4 + ((h, i), (h, i), (i, h))
    params = layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * vocab * h + h
    return memory.Geometry(parameters=params, hidden=h, layers=layers, mlp_width=i, kv_width=h, vocab=vocab,
                           block_linears=block * layers)


def test_fsdp_shards_the_states_and_keeps_a_unit_whole():
    """Under FSDP over N processes each holds 1/N of the weights, gradients and moments plus the whole weights of
    two blocks and the root unit; after training the whole weights come back (``gathered``). For 7B over 8 GPUs
    the per-process peak falls from ~113 GB (more than an H100) to about a fifth of it."""
    g = _llama7b()
    one = memory.estimate(g, memory.Setting(batch=1, seqlen=2048, full=True))
    eight = memory.estimate(g, memory.Setting(batch=1, seqlen=2048, full=True, shards=8))
    block = sum(i * o for i, o in g.block_linears) // g.layers
    root = g.parameters - g.layers * block
    assert eight["optimizer"] == 2 * 4 * (g.parameters // 8)
    assert eight["weights"] == 4 * (g.parameters // 8 + 2 * block + root)
    assert eight["activations"] == one["activations"]  # each process its own batch
    assert eight["gathered"] == 4 * g.parameters + eight["weights"] and "gathered" not in one
    assert one["peak"] > 100 * 2**30 and eight["peak"] < one["peak"] / 3


def test_a_step_too_large_for_one_gpu_is_offered_fsdp(monkeypatch):
    """On a machine with 8 GPUs, a 7B regularisation that does not fit one names FSDP over the 8 (and the config
    to launch with); on the CPU, where the processes share one memory, FSDP is not offered."""
    g = _llama7b()
    s = memory.Setting(batch=1, seqlen=2048, full=True, grad_checkpointing=True)
    monkeypatch.setattr(memory, "_gpus", lambda: 8)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 80 * 2**30)
    with pytest.raises(memory.UserError) as e:
        memory.check(g, s, "cuda", "regularize")
    assert "FSDP over 8 GPUs" in str(e.value) and "configs/fsdp.yaml" in str(e.value)
    monkeypatch.setattr(memory, "process_bytes", lambda: 0)
    with pytest.raises(memory.UserError) as e:
        memory.check(g, s, "cpu", "regularize")
    assert "FSDP" not in str(e.value)


# --- prune (llmprune.prune_memory) ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_prune_estimate_is_printed_and_recorded(calibrated, capsys, method):
    from llmprune import prune_memory

    wd = calibrated("llama", samples=20, seqlen=64)
    capsys.readouterr()
    code, res = cli("prune", wd, "--method", method, "--sparsity", "0.5", "--device", "cpu")
    assert code == 0
    est = res["memory_estimate"]
    assert est["device"] == "cpu" and est["peak_mib"] >= est["base_mib"] > 0 and est["available_mib"] > 0
    assert est["activations_on"] == "cpu" and est["chunk_windows"] == 4
    assert "memory: about" in capsys.readouterr().err
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["command"] == "prune" and step["metrics"]["memory_estimate"] == est
    g, b = memory.geometry(wd / "model"), prune_memory.blocks(wd / "model")
    parts = prune_memory.estimate(g, b, prune_memory.PruneSetting(method, samples=20, seqlen=64), "cpu", 1 << 40)
    assert est["method"] == round(parts["method"] / memory.MIB) and est["peak"] == round(parts["peak"] / memory.MIB)


def test_a_prune_that_cannot_fit_is_refused_naming_what_would(calibrated, monkeypatch, capsys):
    """With less memory free than Wanda at --batch-size 4 needs but enough at 2, the prune is refused before the
    model is loaded (a bad option is still its own error first), naming that; --no-memory-check runs it."""
    from llmprune import prune_memory

    wd = calibrated("llama", samples=20, seqlen=64)
    g, b = memory.geometry(wd / "model"), prune_memory.blocks(wd / "model")
    base = 100 * memory.MIB
    monkeypatch.setattr(memory, "process_bytes", lambda: base)
    two = prune_memory.estimate(g, b, prune_memory.PruneSetting("wanda", 20, 64, batch=2), "cpu", 0)["peak"]
    four = prune_memory.estimate(g, b, prune_memory.PruneSetting("wanda", 20, 64, batch=4), "cpu", 0)["peak"]
    assert four > two
    monkeypatch.setattr(memory, "available_bytes", lambda device: base + two + 1)
    manifest = (wd / "manifest.json").read_text()
    capsys.readouterr()
    assert run(["prune", str(wd), "--method", "wanda", "--sparsity", "1.5", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "needs about" not in err and "sparsity" in err  # the option's own error, not the memory check's
    assert run(["prune", str(wd), "--method", "wanda", "--sparsity", "0.5", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "prune needs about" in err and "it would fit with --batch-size 2" in err and "Traceback" not in err
    assert "--no-memory-check" in err and len(err.strip().splitlines()) == 1
    assert (wd / "manifest.json").read_text() == manifest  # nothing ran
    code, _ = cli("prune", wd, "--method", "wanda", "--sparsity", "0.5", "--device", "cpu", "--no-memory-check")
    assert code == 0


def test_the_prune_estimate_scales_as_it_should():
    """Twice the samples, twice the activations; bf16 activations half of fp32; SparseGPT's statistics pass holds
    4 in^2 bytes per Linear (one fp32 Hessian each) on top of Wanda's; the factorisation of a square Linear three
    matrices of its width; Wanda++'s RO adds the block's optimiser state and its dense outputs."""
    from llmprune import prune_memory as pm

    g = _llama7b()
    layer = g.block_linears[: len(g.block_linears) // g.layers]
    b = pm.Blocks(block_bytes=2 * sum(i * o for i, o in layer), block_parameters=sum(i * o for i, o in layer),
                  model_bytes=2 * g.parameters, linears=layer, weight_bytes=2)
    cpu = 1 << 50

    def parts(method="wanda", **kw):
        return pm.estimate(g, b, pm.PruneSetting(method, **{"samples": 128, "seqlen": 2048, **kw}), "cpu", cpu)

    one, two = parts(), parts(samples=256)
    assert two["activations"] == 2 * one["activations"] == 2 * 3 * 128 * 2048 * g.hidden * 4
    assert parts(act_bytes=2)["activations"] == one["activations"] // 2
    assert parts(batch=8)["forward"] == 2 * one["forward"] and parts(batch=8)["activations"] == one["activations"]
    sgpt = parts("sparsegpt")
    copy = 128 * 2048 * g.hidden * 4
    assert sgpt["statistics"] == sgpt["weights"] + 2 * copy + sgpt["forward"] + 4 * sum(i * i for i, _ in layer)
    square = pm.Blocks(1, 1, 1, ((4096, 4096),), 2)
    assert pm.hessian_bytes(square, pm.PruneSetting("sparsegpt", 1, 1)) == 3 * 4 * 4096**2
    # the widest input (the MLP's down projection, 11008) sets SparseGPT's peak: three matrices of its width
    assert sgpt["method"] == 3 * 4 * 11008**2 and sgpt["pruning"] == sgpt["weights"] + 2 * copy + sgpt["method"]
    assert sgpt["peak"] == sgpt["propagation"]  # 128 x 2048 fp32 windows of 4096 values: 4.3 GB a copy, three live
    wpp = parts("wandapp", wandapp=pm.RO(iters=2, samples=32))
    rgs = parts("wandapp", wandapp=pm.RO(iters=0))
    assert wpp["activations"] - rgs["activations"] == 64 * 2048 * g.hidden * 4  # the dense outputs of 2 x 32 draws
    assert wpp["method"] > rgs["method"] + 2 * 4 * sum(i * o for i, o in layer)  # fp32 gradients and RMSprop's state
    # on a GPU whose half cannot hold two copies, the copies go to host memory and the device keeps a chunk
    gpu = pm.estimate(g, b, pm.PruneSetting("wanda", 128, 2048), "cuda", 4 * copy - 1)
    assert gpu["activations"] == 0 and gpu["host"] == 3 * copy
