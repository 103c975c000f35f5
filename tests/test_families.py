"""This year's families end to end through the commands a user runs: calibrate, prune (a method at 2:4), full
recovery, eval, export, and every structured removal the family allows -- each export loads with plain
``from_pretrained`` and computes what the workdir's model computes; what the family refuses is refused in one line.

The per-operation equivalences (streamed == in memory, removal of zeroed units == zeroing, routed experts == the
model's experts) are in test_streaming.py, test_structured.py and test_moe.py, over every architecture.
"""

import shutil

import pytest
import tiny
import torch
from conftest import cli
from transformers import AutoModelForCausalLM

from llmprune import structured

STRUCTURES = ("hidden", "heads", "mlp", "layers", "experts")
# What each family offers (the README's support table): the rest is refused with its reason.
OFFERED = {"smollm3": {"hidden", "heads", "mlp", "layers"}, "olmo3": {"mlp", "layers"},
           "glm4_moe": {"heads", "experts", "layers"},
           "deepseek_v3": {"layers", "experts"},  # latent attention; experts evenly from its groups
           "qwen3_5_text": {"mlp", "layers"}, "qwen3_5_moe_text": {"experts", "layers"},
           "gpt_oss": {"heads", "experts", "layers"},  # the attention sinks go with their heads
           "llama4_text": {"heads", "experts", "layers"},
           "gemma4_text": {"mlp", "experts"}}  # the dense MLP beside the experts; two head geometries, PLE


def _allowed(arch: str, structure: str, model) -> str | None:
    """None if ``structure`` can be removed from ``model``, else the refusal's reason."""
    try:
        structured.check_supported(model, structure)
    except Exception as e:  # UserError: the one line the command prints
        return str(e)
    return None


def _same_function(folder, ref_folder) -> None:
    ids = torch.randint(0, tiny.VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()(ids).logits
        ref = AutoModelForCausalLM.from_pretrained(ref_folder).eval()(ids).logits
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize("arch", tiny.FAMILIES_2026)
def test_prune_recover_eval_export(calibrated, tiny_root, tmp_path, arch):
    wd = calibrated(arch, samples=12, seqlen=32)
    code, res = cli("prune", wd, "--method", "sparsegpt", "--pattern", "2:4")
    assert code == 0 and res["sparsity"]["all"] == 0.5
    code, res = cli("recover", wd, "--full", "--steps", 2, "--eval-every", 2, "--lr", 1e-3, "--batch-size", 4,
                    "--holdout", 4)
    assert code == 0
    code, res = cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 32, "--max-windows", 2)
    assert code == 0 and res["windows"] == 2 and res["perplexity"] > 1
    code, _ = cli("export", wd, "--out", tmp_path / "out")
    assert code == 0
    _same_function(tmp_path / "out", wd / "model")


@pytest.mark.parametrize("arch", tiny.FAMILIES_2026)
def test_every_structure_is_removed_or_refused_in_one_line(calibrated, tmp_path, capsys, arch):
    wd = calibrated(arch, samples=12, seqlen=32)
    model = AutoModelForCausalLM.from_pretrained(wd / "model")
    offered = set()
    for structure in STRUCTURES:
        reason = _allowed(arch, structure, model)
        one = tmp_path / structure
        shutil.copytree(wd, one)
        ratio = 0.5 if structure in ("layers", "experts") else 0.25
        code, res = cli("prune", one, "--method", "dress", "--structure", structure, "--ratio", ratio)
        err = capsys.readouterr().err
        if reason:
            assert code != 0 and reason.split(": ", 1)[1] in " ".join(err.split()) and "Traceback" not in err
            continue
        offered.add(structure)
        assert code == 0, err
        small = AutoModelForCausalLM.from_pretrained(one / "model")
        assert small.num_parameters() < model.num_parameters(), structure
        assert cli("export", one, "--out", tmp_path / f"{structure}-out")[0] == 0
        _same_function(tmp_path / f"{structure}-out", one / "model")
    assert offered == OFFERED[arch]


def test_a_hybrid_model_keeps_a_full_attention_block(tiny_root):
    """Qwen3.5 (a linear-attention block, then a full-attention one): every selection passes over the only
    full-attention block, and a count that cannot spare it is refused in one line."""
    from llmprune.errors import UserError
    from llmprune.selection import select, take

    model = AutoModelForCausalLM.from_pretrained(tiny_root / "qwen3_5_text")
    windows = torch.randint(0, tiny.VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    plans = [select(model, "layers", 0.5, "random", None, seed=s) for s in range(6)]
    plans += [select(model, "layers", 0.5, "activation", windows), select(model, "layers", 0.5, "tail", None)]
    assert all(p.removed == [0] for p in plans)
    keep = structured.kind("layers").keep_one(model.config)
    assert keep[0] == {1}
    with pytest.raises(UserError, match="keep at least one full-attention block"):
        take([1, 0], 2, keep)  # both blocks


def test_gemma4_blocks_sharing_keys_and_values_are_refused_at_calibrate(tiny_root, tmp_path, capsys):
    """Gemma 4 E2B / E4B: the last blocks reuse the keys and values of earlier ones, which a block-by-block walk
    cannot replay: refused in one line, before anything is written."""
    from transformers import Gemma4TextConfig

    cfg = tiny.config("gemma4_text").to_dict()
    cfg.update(num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "full_attention"],
               num_kv_shared_layers=1)
    cfg.pop("per_layer_config", None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma4TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    model.save_pretrained(tmp_path / "e2b-like")
    tiny.tokenizer().save_pretrained(tmp_path / "e2b-like")
    code, _ = cli("calibrate", tmp_path / "wd", "--model", tmp_path / "e2b-like", "--dataset", tiny_root / "corpus.txt",
                  "--samples", 4, "--seqlen", 16)
    err = " ".join(capsys.readouterr().err.split())
    assert code != 0 and "num_kv_shared_layers = 1" in err and "reuse the keys and values" in err
    assert "Traceback" not in err and not (tmp_path / "wd").exists()


def test_gemma4_without_per_layer_inputs_streams(tiny_root, tmp_path):
    """The 26B-A4B and 31B releases have no per-layer embeddings (``hidden_size_per_layer_input`` 0): the streamed
    walk reads only the embeddings the model has, and gives the in-memory perplexity."""
    from transformers import Gemma4TextConfig

    from llmprune import evaluate
    from llmprune.lazy import Lazy

    cfg = tiny.config("gemma4_text").to_dict()
    cfg.update(hidden_size_per_layer_input=0)
    cfg.pop("per_layer_config", None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma4TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    model.save_pretrained(tmp_path / "g4")
    windows = torch.randint(0, tiny.VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    lazy = Lazy(tmp_path / "g4")
    streamed = evaluate.perplexity(lazy.model, windows, batch_size=2, weights=lazy)
    in_memory = evaluate.perplexity(model.eval(), windows, batch_size=2)
    assert streamed == pytest.approx(in_memory, rel=1e-5)
