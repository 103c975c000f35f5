"""Real-model tier, second model: Gemma-3-270M (Q4_K_M GGUF from PyPI, docs/benchmarks.md) on a reduced budget.

It differs from SmolLM2 in what breaks engines: one KV head, head_dim 256, sliding and full attention layers with two
rope bases, Gemma (1 + w) norms, a scaled embedding and a 262k vocabulary. Evaluation uses few test windows
(the 262k-way head makes each one cost about two seconds here). Never skipped: the assets are fetched or it fails.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import assets  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.needs("gguf")]  # the models come as GGUF files (PyPI)
SEQLEN = 512
EVAL_WINDOWS = 8  # of the 101 test windows
# At 100 examples the dense / SparseGPT / magnitude accuracies (0.27 / 0.145 / 0.005 at 200, benchmarks/results)
# stay apart; each example set costs as much as 25 test windows.
LASTWORD_LIMIT = 100
PARAMETERS = 268_098_176
LINEARS = 18 * 7


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    paths = assets.fetch(model="gemma3-270m")
    wd = tmp_path_factory.mktemp("gemma") / "base"
    code, res = cli("calibrate", wd, "--model", paths["model"], "--dataset", paths["calib"],
                    "--samples", 16, "--seqlen", SEQLEN)
    assert code == 0 and res["model_type"] == "gemma3_text" and res["parameters"] == PARAMETERS
    config = json.loads((wd / "model" / "config.json").read_text())
    # the layer types this model mixes: the per-block keyword arguments must follow them
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
    assert config["num_key_value_heads"] == 1 and config["head_dim"] == 256
    # the dense model's figures, measured once for the tests that compare with them
    return wd, paths, _eval(wd, paths, lastword=True)


def _eval(run: Path, paths: dict, lastword: bool = False) -> dict[str, float]:
    """``{"ppl": ...}`` on a few test windows; with ``lastword``, also ``"acc"``, the last-word accuracy."""
    task = f"lastword:{paths['test']}"
    tasks = ["--tasks", task, "--limit", LASTWORD_LIMIT] if lastword else []
    code, res = cli("eval", run, "--dataset", paths["test"], "--seqlen", SEQLEN, "--max-windows", EVAL_WINDOWS,
                    *tasks)
    assert code == 0 and res["windows"] == EVAL_WINDOWS
    out = {"ppl": res["perplexity"]}
    if lastword:
        out["acc"] = res["tasks"][task]["acc"]
    return out


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for shard in (run / "model").glob("*.safetensors"):
        out.update(load_file(shard))
    return out


def test_gemma_baselines_order_and_exact_sparsity(gemma, tmp_path):
    wd, paths, dense = gemma
    measured = {"dense": dense}
    for method in ("magnitude", "wanda", "sparsegpt"):
        run = tmp_path / method
        shutil.copytree(wd, run)
        assert cli("prune", run, "--method", method, "--sparsity", 0.5)[0] == 0
        layers = json.loads((run / "manifest.json").read_text())["steps"][-1]["metrics"]["layer_sparsity"]
        assert len(layers) == LINEARS
        assert all(s == 0.5 for s in layers.values()), {k: s for k, s in layers.items() if s != 0.5}
        # the accuracy only where the last check reads it
        measured[method] = _eval(run, paths, lastword=method != "wanda")
        shutil.rmtree(run / "model")  # keep the temporary disk small
    ppl = {name: m["ppl"] for name, m in measured.items()}
    acc = {name: m["acc"] for name, m in measured.items() if "acc" in m}
    print(ppl, acc)
    # benchmarks/results/gemma3-270m-prune-2026-12-03.md (64 windows, whole test split): magnitude 22296,
    # Wanda 90.25, SparseGPT 66.14, dense 30.48.
    assert ppl["magnitude"] > ppl["wanda"] > ppl["sparsegpt"] > ppl["dense"]
    assert ppl["sparsegpt"] < 4 * ppl["dense"] and ppl["magnitude"] > 20 * ppl["wanda"]
    assert acc["dense"] >= acc["sparsegpt"] >= acc["magnitude"] and acc["dense"] > acc["magnitude"]


def test_gemma_two_four_holds_on_every_weight(gemma, tmp_path):
    """Wanda 2:4 holds the pattern on all 126 Linears (q_proj's input is 640 wide, o_proj's 1024), and leaves the
    embedding, the norms (Gemma's 1 + w scales) and the q/k norms bit for bit."""
    from llmprune.masks import nm_valid

    wd, paths, dense = gemma
    run = tmp_path / "wanda24"
    shutil.copytree(wd, run)
    assert cli("prune", run, "--method", "wanda", "--pattern", "2:4")[0] == 0
    base, weights = _weights(wd), _weights(run)
    linear = [k for k in weights if k.startswith("model.layers.") and k.endswith("proj.weight")]
    assert len(linear) == LINEARS and all(nm_valid(weights[k], 2, 4) for k in linear)
    rest = [k for k in weights if k not in linear]
    assert any("q_norm" in k for k in rest) and any("pre_feedforward_layernorm" in k for k in rest)
    assert all(torch.equal(weights[k], base[k]) for k in rest)
    assert _eval(run, paths)["ppl"] < 13 * dense["ppl"]  # 2:4 Wanda: about 10x (313 on the whole split, dense 30.5)


def test_gemma_hidden_removal_is_a_smaller_standard_model(gemma, tmp_path):
    """Removing 10% of the hidden channels from Gemma gives the analytic parameter count (the tied 262k embedding,
    every projection and the four Gemma norms per block lose their columns; q/k norms are per head_dim and stay), a
    config transformers loads with plain from_pretrained, and a finite perplexity."""
    from transformers import AutoModelForCausalLM

    wd, paths, _ = gemma
    run = tmp_path / "hidden"
    shutil.copytree(wd, run)
    code, res = cli("prune", run, "--method", "dress", "--structure", "hidden", "--ratio", 0.1)
    assert code == 0 and res["units_removed"] == 64  # 640 -> 576, a multiple of the 4 heads
    c = json.loads((wd / "model" / "config.json").read_text())
    q, kv, inter = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"], \
        c["intermediate_size"]
    per_block = q + 2 * kv + q + 3 * inter + 4  # q,k,v inputs; o output; gate,up inputs, down output; 4 norms
    removed = 64 * (c["vocab_size"] + c["num_hidden_layers"] * per_block + 1)  # + the final norm
    assert res["parameters"] == PARAMETERS - removed
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.hidden_size == 576 and model.num_parameters() == res["parameters"]
    assert torch.isfinite(torch.tensor(_eval(run, paths)["ppl"]))


def test_gemma_gguf_in_llama_cpp_and_its_sentencepiece_tokenizer(gemma, tmp_path):
    """Gemma-3-270M as an f16 GGUF: llama.cpp's perplexity within 0.5% of transformers' on the same windows. Its
    tokenizer rebuilt from tokenizer.json alone (the source GGUF moved away: byte-fallback BPE written as llama.cpp's
    SentencePiece model, scores from the merge ranks) cuts text into transformers' ids."""
    from transformers import AutoTokenizer

    from llmprune import gguf_vocab, llamacpp

    wd, paths, dense = gemma
    run = tmp_path / "run"
    shutil.copytree(wd, run)
    args = ("eval", run, "--dataset", paths["test"], "--seqlen", SEQLEN, "--max-windows", 4)
    code, hf = cli(*args)
    code2, lc = cli(*args, "--backend", "llama.cpp")
    assert code == code2 == 0 and lc["tokens"] == hf["tokens"]
    assert abs(lc["perplexity"] / hf["perplexity"] - 1) < 0.005
    import gguf

    out = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(out), "gemma3")
    n = gguf_vocab.add_tokenizer(writer, run / "model")  # from tokenizer.json, not the source GGUF
    assert n == 262_144
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    text = (Path(paths["test"]).read_text(encoding="utf-8")[:20000] + " Ünïcödé 日本語 12345.678\ttabs\n\n")
    try:
        assert llamacpp.tokenize(llm, text) == AutoTokenizer.from_pretrained(run / "model").encode(
            text, add_special_tokens=False)
    finally:
        llm.close()
