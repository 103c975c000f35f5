"""Vision-language releases (Qwen3.5, Llama 4, Gemma 4 as published): ``calibrate --text-only`` takes the language
model out of the checkpoint -- its tensors under the text model's own names, its own config, nothing of the vision
tower -- and it is the model transformers itself reads from that checkpoint; without the flag, one line says so."""

import json

import pytest
import tiny
import torch
import transformers as tf
from conftest import cli
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmprune.arch import MULTIMODAL


def _text_config(model_type: str) -> dict:
    cfg = tiny.config(model_type).to_dict()
    for key in ("model_type", "per_layer_config", "transformers_version", "architectures"):
        cfg.pop(key, None)
    return cfg


def _release(kind: str, out):
    """A tiny random-init vision-language model of the kind, saved as a release is."""
    torch.manual_seed(0)
    if kind.startswith("qwen3_5"):
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
        if kind == "qwen3_5":
            model = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=_text_config("qwen3_5_text"),
                                                                          vision_config=vision))
        else:  # its experts saved one tensor per expert, under the language model's prefix
            model = tf.Qwen3_5MoeForConditionalGeneration(tf.Qwen3_5MoeConfig(
                text_config=_text_config("qwen3_5_moe_text"), vision_config=vision))
    elif kind == "llama4":
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                      patch_size=8, vision_output_dim=32, projector_input_dim=32, projector_output_dim=64,
                      pixel_shuffle_ratio=0.5)
        model = tf.Llama4ForConditionalGeneration(tf.Llama4Config(text_config=_text_config("llama4_text"),
                                                                  vision_config=vision))
    else:
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        model = tf.Gemma4ForConditionalGeneration(tf.Gemma4Config(text_config=_text_config("gemma4_text"),
                                                                  vision_config=vision, audio_config=None))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    tiny.tokenizer().save_pretrained(out)
    return model


@pytest.mark.parametrize("kind", sorted(MULTIMODAL))
def test_text_only_takes_the_language_model_of_a_vision_language_release(tiny_root, tmp_path, capsys, kind):
    release = _release(kind, tmp_path / "release")
    wd = tmp_path / "wd"
    args = ("calibrate", wd, "--model", tmp_path / "release", "--dataset", tiny_root / "corpus.txt",
            "--samples", 4, "--seqlen", 16)
    code, _ = cli(*args)
    err = " ".join(capsys.readouterr().err.split())
    assert code != 0 and "vision-language release" in err and "--text-only" in err and not wd.exists()
    code, res = cli(*args, "--text-only")
    assert code == 0
    text = AutoModelForCausalLM.from_pretrained(wd / "model").eval()  # plain transformers, the text-only folder
    assert text.config.model_type == f"{kind}_text" and type(text).__name__.endswith("ForCausalLM")
    stored = {k for f in (wd / "model").glob("*.safetensors") for k in load_file(f)}
    assert not any(k.startswith(p) for p in MULTIMODAL[kind].others for k in stored)
    assert all(k.startswith(("model.", "lm_head.")) and "language_model" not in k for k in stored)
    # the release's language model, tensor for tensor...
    theirs = release.state_dict()
    for name, t in text.state_dict().items():
        ours, where = next(((o, w) for o, w in MULTIMODAL[kind].text if name.startswith(o)), ("", ""))
        mapped = where + name[len(ours):]
        assert torch.equal(t, theirs[mapped if mapped in theirs else name]), name
    # ...and the model transformers itself reads from the release as a causal LM, where it reads one (Gemma 4's
    # causal-LM class is the whole vision-language model)
    if kind != "gemma4":
        own = AutoModelForCausalLM.from_pretrained(tmp_path / "release").eval()
        ids = torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(text(input_ids=ids).logits, own(input_ids=ids).logits, atol=0, rtol=0)
    manifest = json.loads((wd / "manifest.json").read_text())
    assert manifest["base_model"]["multimodal"]["model_type"] == kind
    assert manifest["base_model"]["tensors_not_kept"] > 0
    assert cli("prune", wd, "--method", "wanda", "--pattern", "2:4")[0] == 0  # an ordinary workdir from here on


def test_tensors_the_model_class_ignores_are_not_kept(tiny_root, tmp_path):
    """Releases ship blocks their transformers class never loads (DeepSeek-V3's and GLM-4.5's multi-token-prediction
    block, Qwen3.5's ``mtp.*``): calibrate leaves them out, as transformers does, and counts them."""
    from safetensors.torch import save_file

    folder = tiny.build("qwen3_5_text", tmp_path / "qwen3.5")
    save_file({"mtp.fc.weight": torch.ones(64, 128), "mtp.layers.0.mlp.down_proj.weight": torch.ones(64, 32)},
              folder / "mtp.safetensors")
    index = {"metadata": {}, "weight_map": {**{k: "model.safetensors" for k in load_file(folder / "model.safetensors")},
                                          "mtp.fc.weight": "mtp.safetensors",
                                          "mtp.layers.0.mlp.down_proj.weight": "mtp.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    wd = tmp_path / "wd"
    code, _ = cli("calibrate", wd, "--model", folder, "--dataset", tiny_root / "corpus.txt", "--samples", 4,
                  "--seqlen", 16)
    assert code == 0
    assert json.loads((wd / "manifest.json").read_text())["base_model"]["tensors_not_kept"] == 2
    assert not any(k.startswith("mtp.") for f in (wd / "model").glob("*.safetensors") for k in load_file(f))
