"""The engine must be exact: streaming block by block reproduces the full model for every architecture."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import tiny
from llmprune import engine, evaluate
from llmprune.head import Head


@pytest.mark.parametrize("arch", tiny.ARCH_TYPES)
def test_streaming_equals_full_model(tiny_root, arch):
    # uneven chunks on purpose: 2 + 2 + 1
    model, windows, acts = tiny.model_and_inputs(tiny_root, arch, 5, 48, batch_size=2)
    with torch.no_grad():
        full = model(input_ids=windows, use_cache=False).logits
    assert [h.shape[0] for h in acts.hidden] == [2, 2, 1]
    out = engine.stream(model, acts, "cpu", "test")
    with Head(model, "cpu") as head:
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
    with Head(model, "cpu") as head:
        wrong = head(engine.stream(model, replayed, "cpu", "test").hidden[0])
    assert (wrong - full).abs().max() > 1e-2


@pytest.mark.parametrize("arch", tiny.ARCH_TYPES)
def test_merged_chunks_give_every_block_the_outputs_of_its_chunks(tiny_root, arch):
    """Windows captured one at a time, merged into one batch (Wanda++'s batched RO steps and one-pass prune): every
    block computes on the batch what it computes on each window, with its own layer type's arguments."""
    from llmprune import arch as _arch

    model, _, acts = tiny.model_and_inputs(tiny_root, arch, 4, 48, batch_size=1)
    with torch.no_grad():
        for i, block in enumerate(_arch.blocks(model)):
            mine = acts.feeding(i)
            for idx in (None, [2, 0]):
                one = mine.merged(idx)
                assert len(one.hidden) == 1
                want = torch.cat([engine.block_output(block, mine.hidden[j], mine.kwargs[j])
                                  for j in (idx or range(4))])
                torch.testing.assert_close(engine.block_output(block, one.hidden[0], one.kwargs[0]), want,
                                           rtol=1e-5, atol=1e-5)
            acts = engine.run_block(block, mine, "cpu")


def test_merge_arguments_keeps_shared_values_concatenates_per_window_ones_and_refuses_the_rest():
    shared = torch.ones(1, 1, 4, 4)
    assert engine.merge_arguments([shared, shared], [1, 1]) is shared
    a, b = torch.zeros(1, 3), torch.ones(2, 3)
    assert torch.equal(engine.merge_arguments([(a, None), (b, None)], [1, 2])[0], torch.cat([a, b]))
    assert engine.merge_arguments([torch.arange(4), torch.arange(4)], [1, 2]).shape == (4,)  # no batch dimension
    assert engine.merge_arguments([{"k": 3}, {"k": 3}], [1, 1]) == {"k": 3}
    for bad in ([torch.arange(4), torch.arange(1, 5)], [3, 4], [(a,), (a, a)], [a, None]):
        with pytest.raises(ValueError):
            engine.merge_arguments(bad, [1, 1])


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


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3_moe"])
def test_collect_and_run_is_collect_then_run_block(tiny_root, arch):
    """The one-pass walk of the dense model (OWL's) gives the same statistics as ``collect`` and the same outputs
    as ``run_block``: bit for bit for dense blocks (it only lets the chunks run to the block's end); an MoE block
    runs its experts one by one through their views, as ``collect`` does, where ``run_block`` runs the native
    batched experts -- the same sums in another order."""
    from llmprune.stats import RowNorms

    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch).eval()
    torch.manual_seed(0)
    acts = engine.capture(model, torch.randint(0, tiny.VOCAB, (3, 16)), 2, "cpu")
    from llmprune import arch as _arch

    block = _arch.blocks(model)[0]
    stats, outs = engine.collect_and_run(block, acts, "cpu", RowNorms)
    want = engine.collect(block, acts, "cpu", RowNorms)
    assert stats.keys() == want.keys()
    for n in want:
        assert torch.equal(stats[n].sumsq, want[n].sumsq), n
    with torch.no_grad():
        ran = engine.run_block(block, acts, "cpu")
    assert len(outs.hidden) == len(ran.hidden) == 2
    for a, b in zip(outs.hidden, ran.hidden):
        if arch in tiny.MOE_TYPES:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)
