"""``export --format gguf`` and ``eval --backend llama.cpp``: llama.cpp itself (llama-cpp-python, installed by
scripts/setup.sh as the ``gguf`` extra) is the judge -- its logits against transformers' for every family it can
run, dense and structurally pruned; its tokens against transformers' tokenizer; refusals for what it cannot run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny
from conftest import cli
from llmprune import gguf_vocab, gguf_write, llamacpp
from llmprune.errors import UserError

pytestmark = pytest.mark.needs("gguf", "llama_cpp")

# Families llama.cpp runs, as the tiny configs build them; the others are refused, each for a reason of its own.
WRITTEN = ("llama", "mistral", "qwen2", "qwen3", "phi", "gemma", "gemma3_text", "phi3", "olmo3", "qwen2_moe", "mixtral")
REFUSED = {"opt": "llama.cpp has no OPT architecture",
           "gemma2": "reads the output head from the embedding",  # the tiny Gemma 2 has a head of its own
           "qwen3_moe": "dense MLP layers between the expert layers",
           "smollm3": "every 4th layer",
           "glm4_moe": "no mapping", "deepseek_v3": "no mapping", "qwen3_5_text": "linear-attention blocks",
           "qwen3_5_moe_text": "linear-attention blocks", "gpt_oss": "no mapping", "llama4_text": "no mapping",
           "gemma4_text": "no mapping"}  # the tiny SmolLM3 leaves rotary embeddings out of its second block
SAMPLE = "The model of a language predicts 12345 tokens, isn't it?  Weights\n\nare pruned when small."


def test_every_family_is_written_or_refused():
    assert set(WRITTEN) | set(REFUSED) == set(tiny.ARCH_TYPES)


def _logits_both(wd, gguf_path, seqlen=32):
    """transformers' logits of the workdir's model and llama.cpp's of the GGUF file, on one random window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(wd / "model").eval()
    torch.manual_seed(1)
    ids = torch.randint(0, tiny.VOCAB, (1, seqlen))
    with torch.no_grad():
        ref = model(ids).logits[0].float().numpy()
    llm = llamacpp.load(gguf_path, n_ctx=seqlen)
    try:
        got = llamacpp.window_logits(llm, ids[0].tolist())
        tok = AutoTokenizer.from_pretrained(wd / "model")
        same_tokens = tok.encode(SAMPLE, add_special_tokens=False) == llamacpp.tokenize(llm, SAMPLE)
    finally:
        llm.close()
    return ref, got, same_tokens


def _export(wd, out, *args):
    code, res = cli("export", wd, "--out", out, "--format", "gguf", *args)
    assert code == 0
    return out / next(f["path"] for f in res["files"] if f["path"].endswith(".gguf"))


@pytest.mark.parametrize("arch", WRITTEN)
def test_f16_gguf_computes_the_models_logits_in_llama_cpp(arch, calibrated, tmp_path):
    wd = calibrated(arch)
    path = _export(wd, tmp_path / "out")
    ref, got, same_tokens = _logits_both(wd, path)
    assert np.abs(got - ref).max() < 0.02 * max(1.0, np.abs(ref).max())  # f16 weights, f32 norms
    assert same_tokens


@pytest.mark.parametrize("arch,structure,ratio", [("llama", "mlp", 0.25), ("llama", "heads", 0.5),
                                                  ("llama", "hidden", 0.25), ("llama", "layers", 0.5),
                                                  ("gemma3_text", "layers", 0.5), ("gemma3_text", "hidden", 0.25),
                                                  ("qwen3", "heads", 0.5), ("mixtral", "experts", 0.5)])
def test_structurally_pruned_model_is_a_smaller_gguf_with_the_same_logits(arch, structure, ratio, calibrated,
                                                                           tmp_path):
    wd = calibrated(arch)
    assert cli("prune", wd, "--method", "dress", "--structure", structure, "--ratio", ratio)[0] == 0
    config = json.loads((wd / "model" / "config.json").read_text())
    path = _export(wd, tmp_path / "out")
    ref, got, _ = _logits_both(wd, path)
    assert np.abs(got - ref).max() < 0.02 * max(1.0, np.abs(ref).max())
    from llmprune.provenance import gguf_metadata

    meta = gguf_metadata(path, "")
    arch_name = meta["general.architecture"]
    assert meta[f"{arch_name}.block_count"] == config["num_hidden_layers"]
    assert meta[f"{arch_name}.embedding_length"] == config["hidden_size"]
    if structure == "layers" and arch == "gemma3_text":  # the survivor's own kind of attention, per layer
        assert meta[f"{arch_name}.attention.sliding_window_pattern"] == [
            t == "sliding_attention" for t in config["layer_types"]]


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_what_llama_cpp_cannot_run_is_refused_before_anything_is_written(arch, calibrated, tmp_path):
    wd = calibrated(arch)
    out = tmp_path / "out"
    code, _ = cli("export", wd, "--out", out, "--format", "gguf")
    assert code == 1 and not out.exists()
    with pytest.raises(UserError, match=REFUSED[arch]):
        from transformers import AutoConfig

        gguf_write.check(AutoConfig.from_pretrained(wd / "model"))


def test_quantized_types_load_and_stay_close(calibrated, tmp_path, tiny_root):
    """q8_0 (the gguf package) within 2% of the f16 perplexity; q4_k_m (llama.cpp's quantizer) loads and is a
    smaller file whose perplexity is finite."""
    wd = calibrated("llama")
    ppl, size = {}, {}
    for t in ("f16", "q8_0", "q4_k_m"):
        path = _export(wd, tmp_path / t, "--gguf-type", t)
        size[t] = path.stat().st_size
        assert gguf_write.type_of(path) == t
        code, res = cli("eval", wd, "--dataset", tiny_root / "corpus.txt", "--backend", "llama.cpp", "--gguf", path,
                        "--max-windows", 8)
        assert code == 0 and res["backend"] == "llama.cpp" and res["gguf_type"] == t
        ppl[t] = res["perplexity"]
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.02
    assert np.isfinite(ppl["q4_k_m"]) and size["q4_k_m"] < size["q8_0"] < size["f16"]


def test_llama_cpp_perplexity_matches_transformers_on_the_same_windows(calibrated, tiny_root):
    wd = calibrated("qwen3")
    args = ("eval", wd, "--dataset", tiny_root / "corpus.txt", "--max-windows", 8)
    code, hf = cli(*args)
    code2, lc = cli(*args, "--backend", "llama.cpp", "--gguf-type", "f32")
    assert code == code2 == 0
    assert lc["tokens"] == hf["tokens"] and lc["windows"] == hf["windows"]
    assert abs(lc["perplexity"] / hf["perplexity"] - 1) < 1e-3  # f32 weights: the same model, another engine
    manifest = json.loads((wd / "manifest.json").read_text())
    assert manifest["steps"][-1]["metrics"]["backend"] == "llama.cpp"


def test_a_gguf_of_another_model_state_is_refused(calibrated, tmp_path, tiny_root):
    wd = calibrated("llama")
    path = _export(wd, tmp_path / "before")
    assert cli("prune", wd, "--method", "wanda", "--sparsity", 0.5)[0] == 0
    code, _ = cli("eval", wd, "--dataset", tiny_root / "corpus.txt", "--backend", "llama.cpp", "--gguf", path)
    assert code == 1
    assert cli("eval", wd, "--dataset", tiny_root / "corpus.txt", "--backend", "llama.cpp", "--gguf",
               _export(wd, tmp_path / "after"), "--max-windows", 2)[0] == 0


def test_sparse_model_keeps_its_zeros_in_the_gguf(calibrated, tmp_path):
    import gguf

    wd = calibrated("llama")
    assert cli("prune", wd, "--method", "wanda", "--pattern", "2:4")[0] == 0
    path = _export(wd, tmp_path / "out", "--gguf-type", "f32")
    reader = gguf.GGUFReader(str(path))
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert (np.asarray(q.data).reshape(-1, 4) == 0).sum(axis=1).min() >= 2  # 2 of every 4 inputs, rows kept


def test_speed_against_a_baseline_is_paired(calibrated, tmp_path, tiny_root):
    dense = calibrated("llama")
    wd = tmp_path / "pruned"
    import shutil

    shutil.copytree(dense, wd)
    assert cli("prune", wd, "--method", "dress", "--structure", "layers", "--ratio", 0.5)[0] == 0
    code, res = cli("eval", wd, "--dataset", tiny_root / "corpus.txt", "--backend", "llama.cpp", "--max-windows", 2,
                    "--speed", "--speed-baseline", dense, "--prompt-len", 16, "--new-tokens", 4, "--reps", 3)
    assert code == 0
    sp = res["speed"]
    assert sp["reps"] == 3 and sp["prefill_speedup_verdict"] in ("faster", "slower", "within noise")
    assert sp["decode_speedup_range"][0] <= sp["decode_speedup"] <= sp["decode_speedup_range"][1]


def test_export_card_and_modelfile(calibrated, tmp_path):
    wd = calibrated("llama")
    out = tmp_path / "out"
    path = _export(wd, out, "--gguf-type", "q8_0")
    assert path.name == "out-Q8_0.gguf"
    assert (out / "Modelfile").read_text() == f"FROM ./{path.name}\n"
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and f"llama-cli -m {path.name}" in card
    from llmprune.provenance import gguf_metadata

    meta = gguf_metadata(path, "llmprune.")
    assert len(meta["llmprune.model_sha256"]) == 64


def test_options_that_need_the_gguf_format_or_backend_are_refused(calibrated, tmp_path, tiny_root):
    wd = calibrated("llama")
    assert cli("export", wd, "--out", tmp_path / "o", "--gguf-type", "q8_0")[0] == 1
    assert cli("eval", wd, "--dataset", tiny_root / "corpus.txt", "--gguf-type", "q8_0")[0] == 1
    assert cli("eval", wd, "--dataset", tiny_root / "corpus.txt", "--backend", "llama.cpp", "--tasks", "x")[0] == 1
    code, res = cli("export", wd, "--out", tmp_path / "d", "--format", "gguf", "--dry-run")
    assert code == 0 and [f["path"] for f in res["files"]] == ["Modelfile", "README.md", "d-F16.gguf"]
    assert not (tmp_path / "d").exists()


def test_rope_pairs_turns_half_rotation_into_pair_rotation():
    """q rotated by halves (transformers) then reordered == q reordered then rotated by adjacent pairs (llama.cpp's
    llama graph): the reorder commutes the two conventions, so attention scores agree."""
    torch.manual_seed(0)
    heads, d, pos = 3, 8, 5
    w = torch.randn(heads * d, 4)
    x = torch.randn(4)
    theta = pos / 10000 ** (torch.arange(0, d, 2).float() / d)
    cos, sin = torch.cos(theta), torch.sin(theta)

    def halves(v):  # per head: (x1, x2) halves, x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin
        v = v.reshape(heads, d)
        a, b = v[:, : d // 2], v[:, d // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], 1).reshape(-1)

    def pairs(v):
        v = v.reshape(heads, d // 2, 2)
        a, b = v[..., 0], v[..., 1]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(-1)

    hf = halves(w @ x)
    cpp = pairs(gguf_write.rope_pairs(w, heads) @ x)
    assert torch.allclose(gguf_write.rope_pairs(hf[:, None], heads)[:, 0], cpp, atol=1e-6)


def test_pre_tokenizer_table():
    assert gguf_vocab.splitters({"type": "ByteLevel", "use_regex": True}) == ("gpt2",)
    seq = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                 {"type": "ByteLevel", "use_regex": True}]}
    assert gguf_vocab.PRE_TOKENIZERS[gguf_vocab.splitters(seq)] == "smollm"
    assert gguf_vocab.splitters({"type": "Metaspace"}) not in gguf_vocab.PRE_TOKENIZERS


def test_gguf_folder_is_pushed_with_a_card_that_runs_it_from_the_hub(calibrated, tmp_path, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            uploaded.update(kw, files=sorted(p.name for p in __import__("pathlib").Path(kw["folder_path"]).iterdir()))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    wd = calibrated("llama")
    out = tmp_path / "model-GGUF"
    code, res = cli("export", wd, "--out", out, "--format", "gguf", "--push-to-hub", "me/model-GGUF")
    assert code == 0 and uploaded["repo_id"] == "me/model-GGUF"
    assert uploaded["files"] == ["Modelfile", "README.md", "model-GGUF-F16.gguf"]
    assert "llama-cli -hf me/model-GGUF" in (out / "README.md").read_text()


def _judged(config, folder, gguf_type: str, seqlen: int):
    """A random-init model of ``config`` (weights at the tiny models' scale) saved in ``folder``, written as a GGUF
    at ``gguf_type``: (its config, transformers' logits, llama.cpp's logits) on one window of ``seqlen``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    tiny.tokenizer().save_pretrained(folder)
    path = gguf_write.write(model, folder.parent / f"{folder.name}.gguf", gguf_type, general={"general.name": "t"},
                            add_tokenizer=lambda w: gguf_vocab.add_tokenizer(w, folder))
    ids = torch.randint(0, tiny.VOCAB, (1, seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    llm = llamacpp.load(path, n_ctx=seqlen)
    try:
        got = llamacpp.window_logits(llm, ids[0].tolist())
    finally:
        llm.close()
    return ref, got


def test_smollm3_with_its_release_pattern_is_written(tmp_path):
    """SmolLM3 as released (every fourth block without rotary embeddings, llama.cpp's fixed period) in llama.cpp."""
    import transformers as tf

    config = tf.SmolLM3Config(**{**tiny.config("smollm3").to_dict(), "num_hidden_layers": 4,
                                 "no_rope_layers": [1, 1, 1, 0], "layer_types": None})
    ref, got = _judged(config, tmp_path / "smollm3", "f16", 24)
    assert np.abs(got - ref).max() < 0.02 * max(1.0, np.abs(ref).max())


def test_llama3_rope_scaling_is_written_as_llama_cpps_frequency_factors(tmp_path):
    """Llama 3.1-style rotary scaling (``rope_type: llama3``) as ``rope_freqs.weight``: llama.cpp's logits equal
    transformers' at positions past the original context, where the scaling changes the result."""
    import transformers as tf

    config = tf.LlamaConfig(**{**tiny.config("llama").to_dict(), "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    factors = gguf_write.llama3_rope_factors(16, 10000.0, config.rope_parameters)
    assert factors.min() == 1 and factors.max() == 8 and ((factors > 1) & (factors < 8)).any()  # all three regimes
    ref, got = _judged(config, tmp_path / "llama3", "f32", 96)
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
