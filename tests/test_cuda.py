"""The CUDA path (``--device cuda``): one block and its activations on the GPU, the same patterns and nearly the same
numbers as on the CPU. Marked ``cuda``; skipped where no GPU is present (CI never has one): run them on a GPU
machine with ``pytest -m cuda tests`` (``benchmarks/gpu_check.sh`` does)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from conftest import cli
from llmprune import units
from llmprune import evaluate
from llmprune.lazy import Lazy, Rewrite
from llmprune.masks import nm_valid, parse_pattern
from llmprune.methods import METHODS
from llmprune.methods.base import PruneSpec
from llmprune.pruning import prune_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "wandapp", "ria"])
def test_streamed_prune_on_cuda_matches_cpu(tiny_root, tmp_path, method):
    m = METHODS[method]
    pat, s = parse_pattern("2:4", None)
    spec = PruneSpec(pat, s, m.options(tiny.fast_options(method)))
    torch.manual_seed(0)
    windows = torch.randint(0, tiny.VOCAB, (8, 32))
    results = {}
    for device in ("cpu", "cuda"):
        lazy = Lazy(tiny_root / "llama")
        out = tmp_path / device
        rewrite = Rewrite(lazy, out, units.linear_weight_names(lazy.model))
        prune_model(lazy.model, m, spec, windows, device=device, batch_size=4, weights=lazy, sink=rewrite.block)
        rewrite.close()
        results[device] = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name in units.linear_weight_names(AutoModelForCausalLM.from_pretrained(tmp_path / "cpu")):
        w, ref = results["cuda"][name], results["cpu"][name]
        assert w.device.type == "cpu" and nm_valid(w, 2, 4), name
        same = ((w == 0) == (ref == 0)).float().mean().item()
        assert same > 0.97, (name, same)  # float rounding flips a few near-tied scores, no more


def test_perplexity_on_cuda_matches_cpu(tiny_root):
    torch.manual_seed(1)
    windows = torch.randint(0, tiny.VOCAB, (5, 32))
    lazy = Lazy(tiny_root / "qwen3")
    gpu = evaluate.perplexity(lazy.model, windows, "cuda", batch_size=2, weights=lazy)
    cpu = evaluate.perplexity(lazy.model, windows, "cpu", batch_size=2, weights=lazy)
    assert math.isclose(gpu["perplexity"], cpu["perplexity"], rel_tol=1e-3)
    assert {p.device.type for p in lazy.model.parameters()} == {"meta"}


def test_prune_step_on_cuda_records_peak_device_memory(calibrated):
    wd = calibrated("llama")
    code, res = cli("prune", wd, "--method", "sparsegpt", "--pattern", "2:4", "--device", "cuda")
    assert code == 0 and res["sparsity"]["all"] == pytest.approx(0.5)
    assert res["peak_device_memory_mib"] > 0


def test_full_recovery_of_a_sparse_model_on_cuda_keeps_every_zero(calibrated):
    """The zero pattern is taken on the CPU and re-applied to weights accelerate moved to the GPU."""
    wd = calibrated("llama", samples=20, seqlen=32)
    assert cli("prune", wd, "--method", "wanda", "--sparsity", 0.5)[0] == 0
    code, res = cli("recover", wd, "--full", "--steps", 3, "--eval-every", 3, "--batch-size", 4, "--holdout", 4,
                    "--device", "cuda")
    assert code == 0 and res["sparsity"]["all"] >= res["sparsity_before"]["all"] - 1e-9


def test_masked_lora_recovery_on_cuda(calibrated):
    wd = calibrated("llama", samples=20, seqlen=32)
    assert cli("prune", wd, "--method", "wanda", "--pattern", "2:4")[0] == 0
    code, res = cli("recover", wd, "--steps", 3, "--eval-every", 3, "--batch-size", 4, "--holdout", 4,
                    "--device", "cuda")
    # A merge writes every position, the pruned ones included, so weights are always re-masked (on the CPU too);
    # trained through the mask, the re-masked merge is the trained model -- as tests/test_recover.py asserts there.
    assert code == 0 and res["sparsity"]["all"] == pytest.approx(0.5)
    assert res["ppl_remasked"] == pytest.approx(res["ppl_adapter"], rel=1e-3)


def test_dress_for_experts_and_a_budget_search_on_cuda(calibrated):
    """Expert removal inside regularize's measurements, and the budget search's candidates, on the GPU."""
    wd = calibrated("qwen3_moe", samples=16, seqlen=32)
    code, reg = cli("regularize", wd, "--structure", "experts", "--ratio", 0.5, "--steps", 4, "--eval-every", 2,
                    "--batch-size", 4, "--holdout", 4, "--lambda", 0.3, "--device", "cuda")
    assert code == 0 and reg["relative_norm"] == 0
    other = calibrated("llama", samples=16, seqlen=32)
    code, res = cli("prune", other, "--method", "dress", "--structure", "heads+mlp", "--target-params", 0.8,
                    "--device", "cuda")
    assert code == 0 and res["parameters"] <= 0.8 * res["parameters_before"]


def test_wandapp_bf16_ro_on_cuda(calibrated):
    wd = calibrated("llama")
    code, res = cli("prune", wd, "--method", "wandapp", "--pattern", "2:4", "--ro-dtype", "bf16", "--device", "cuda")
    assert code == 0 and res["sparsity"]["all"] == pytest.approx(0.5)
