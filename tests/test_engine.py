"""The engine must be exact: streaming block by block reproduces the full model for every architecture."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import tiny
from llmprune import engine, evaluate


@pytest.mark.parametrize("arch", tiny.ARCH_TYPES)
def test_streaming_equals_full_model(tiny_root, arch):
    # uneven chunks on purpose: 2 + 2 + 1
    model, windows, acts = tiny.model_and_inputs(tiny_root, arch, 5, 48, batch_size=2)
    with torch.no_grad():
        full = model(input_ids=windows, use_cache=False).logits
    assert [h.shape[0] for h in acts.hidden] == [2, 2, 1]
    out = engine.stream(model, acts, "cpu", "test")
    with engine.Head(model, "cpu") as head:
        streamed = torch.cat([head(h) for h in out.hidden])
    torch.testing.assert_close(streamed, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_each_layer_type_gets_its_own_arguments(tiny_root, arch):
    """Sliding-window and full-attention blocks receive other masks (and, in Gemma 3, other rotary tables): the
    capture keeps each block's; replaying block 0's for both -- what a capture of block 0 alone does -- computes
    another model (so the equality above has teeth)."""
    model, windows, acts = tiny.model_and_inputs(tiny_root, arch, 2, 48, batch_size=2)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] and model.config.sliding_window < 48
    assert acts.by_block is not None and len(acts.by_block) == 2
    with torch.no_grad():
        full = model(input_ids=windows, use_cache=False).logits
    replayed = engine.Activations(acts.hidden, acts.kwargs)  # block 0's arguments for every block
    with engine.Head(model, "cpu") as head:
        wrong = head(engine.stream(model, replayed, "cpu", "test").hidden[0])
    assert (wrong - full).abs().max() > 1e-2


def test_blocks_given_the_same_arguments_share_one_record(tiny_root):
    _, _, acts = tiny.model_and_inputs(tiny_root, "llama", 2, 16, batch_size=1)
    assert acts.by_block is None and len(acts.kwargs) == 2


@pytest.mark.parametrize("arch", tiny.ARCH_TYPES)
def test_perplexity_matches_the_model_loss(tiny_root, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch).eval()
    torch.manual_seed(1)
    windows = torch.randint(0, tiny.VOCAB, (3, 32))
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    got = evaluate.perplexity(model, windows, batch_size=2)
    assert got["tokens"] == 3 * 31
    assert math.isclose(got["perplexity"], math.exp(ref.item()), rel_tol=1e-5)
