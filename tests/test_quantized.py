"""Quantized releases at ``calibrate``: gpt-oss's MXFP4 experts and block-wise FP8 weights come in as the floats they
encode -- checked against this file's own decoding of each format, not transformers' -- with the release's
quantization recorded; any other quantization is refused in one line, leaving nothing behind."""

import json

import tiny
import torch
from conftest import cli
from safetensors.torch import load_file, save_file

# MXFP4 (OCP Microscaling): 4-bit E2M1 values, two per byte (the low nibble first), 32 per block sharing one E8M0
# scale 2^(s - 127).
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``blocks [E, out, G, 16]`` and ``scales [E, out, G]`` -> the ``[E, in, out]`` parameter gpt-oss multiplies."""
    values = torch.stack([E2M1[(blocks & 0xF).long()], E2M1[(blocks >> 4).long()]], dim=-1).flatten(-2)  # [E,out,G,32]
    w = values * torch.pow(2.0, scales.float() - 127)[..., None]
    return w.flatten(-2).transpose(1, 2)


def _requantize(folder, quant: dict, pack) -> dict:
    """Rewrite the tiny checkpoint in ``folder`` with ``pack(name, tensor) -> {name: tensor}`` applied to every
    tensor, and ``quant`` as its quantization_config; returns what was written."""
    sd = load_file(folder / "model.safetensors")
    out = {k: v for name, t in sd.items() for k, v in pack(name, t).items()}
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    return out


def _calibrate(folder, corpus, wd):
    return cli("calibrate", wd, "--model", folder, "--dataset", corpus, "--samples", 4, "--seqlen", 16)


def test_mxfp4_experts_come_in_as_the_floats_they_encode(tiny_root, tmp_path):
    folder = tiny.build("gpt_oss", tmp_path / "gpt-oss-mxfp4")
    g = torch.Generator().manual_seed(0)

    def pack(name, t):
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {name: t}
        e, i, o = t.shape  # stored [E, in, out]; packed along the input, 32 values per scale
        return {f"{name}_blocks": torch.randint(0, 256, (e, o, i // 32, 16), dtype=torch.uint8, generator=g),
                f"{name}_scales": torch.randint(119, 128, (e, o, i // 32), dtype=torch.uint8, generator=g)}

    packed = _requantize(folder, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}, pack)
    wd = tmp_path / "wd"
    code, res = _calibrate(folder, tiny_root / "corpus.txt", wd)
    assert code == 0
    got = {k: v for f in (wd / "model").glob("*.safetensors") for k, v in load_file(f).items()}
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        want = _decode_mxfp4(packed[f"{name}_blocks"], packed[f"{name}_scales"])
        assert got[name].is_floating_point() and torch.equal(got[name].float(), want), name
    assert not any(k.endswith(("_blocks", "_scales")) for k in got)
    manifest = json.loads((wd / "manifest.json").read_text())
    assert manifest["base_model"]["quantization"]["quant_method"] == "mxfp4"
    assert manifest["base_model"]["quantization"]["dequantized"] is True
    assert "quantization_config" not in json.loads((wd / "model" / "config.json").read_text())
    code, res = cli("prune", wd, "--method", "wanda", "--pattern", "2:4")  # and it is an ordinary workdir
    assert code == 0 and res["sparsity"]["all"] >= 0.5  # above: some FP4 values were zeros already


def test_block_fp8_weights_come_in_as_the_floats_they_encode(tiny_root, tmp_path):
    folder = tiny.build("qwen3", tmp_path / "qwen3-fp8")
    g = torch.Generator().manual_seed(0)

    def pack(name, t):
        if not name.endswith("proj.weight"):
            return {name: t}
        scale = torch.rand(t.shape[0] // 32, t.shape[1] // 32, generator=g) + 0.5  # one per 32 x 32 block
        return {name: t.to(torch.float8_e4m3fn), name.removesuffix("weight") + "weight_scale_inv": scale}

    packed = _requantize(folder, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [32, 32]}, pack)
    wd = tmp_path / "wd"
    code, _ = _calibrate(folder, tiny_root / "corpus.txt", wd)
    assert code == 0
    got = {k: v for f in (wd / "model").glob("*.safetensors") for k, v in load_file(f).items()}
    name = "model.layers.1.mlp.down_proj.weight"
    scale = packed[name.removesuffix("weight") + "weight_scale_inv"]
    want = packed[name].float() * scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
    assert got[name].dtype != torch.float8_e4m3fn and torch.equal(got[name].float(), want)
    assert not any(k.endswith("weight_scale_inv") for k in got)
    manifest = json.loads((wd / "manifest.json").read_text())
    assert manifest["base_model"]["quantization"]["weight_block_size"] == [32, 32]


def test_another_quantization_is_refused_in_one_line(tiny_root, tmp_path, capsys):
    folder = tiny.build("llama", tmp_path / "llama-awq")
    _requantize(folder, {"quant_method": "awq", "bits": 4}, lambda name, t: {name: t})
    wd = tmp_path / "wd"
    code, _ = _calibrate(folder, tiny_root / "corpus.txt", wd)
    err = capsys.readouterr().err
    assert code != 0 and "is quantized (awq)" in err and "Traceback" not in err
    assert not wd.exists()
