"""Mixture-of-experts: each expert's slice of a 3-D parameter is a prunable weight with the statistics of the tokens
routed to it; the routed stand-in computes what the model computes; experts without tokens fall back to magnitude;
routers are never pruned; a weight the table does not describe is refused."""

import contextlib
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import tiny
from conftest import cli
from llmprune import arch as _arch
from llmprune import units
from llmprune import engine, experts
from llmprune.errors import UserError
from llmprune.masks import parse_pattern, select
from llmprune.methods import METHODS
from llmprune.methods.base import PruneSpec
from llmprune.pruning import prune_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# Llama 4's experts have one implementation (transformers refuses to set another): its own, None.
IMPLS = [(a, i) for a in tiny.MOE_TYPES for i in (["grouped_mm", "eager"] if a != "llama4_text" else [None])]


@pytest.mark.parametrize("arch,impl", IMPLS)
def test_routed_experts_compute_what_the_model_computes(tiny_root, arch, impl):
    kw = {"experts_implementation": impl} if impl else {}
    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch, **kw).eval()
    ids = torch.randint(0, tiny.VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids)
    blocks = [b for b in _arch.blocks(model) if experts.views(b, _arch.arch_for(arch).experts)]
    assert blocks
    with contextlib.ExitStack() as stack, torch.no_grad():
        for b in blocks:
            stack.enter_context(experts.routed_block(b))
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and the stand-in is gone: the model's own forward again, the same parameters
    assert all("forward" not in vars(b.get_submodule(_arch.arch_for(arch).experts.path)) for b in blocks)
    torch.testing.assert_close(_logits(model, ids), ref, atol=0, rtol=0)


@pytest.mark.parametrize("arch", tiny.MOE_TYPES)
def test_views_are_the_parameters_and_routed_statistics_are_the_routed_tokens(tiny_root, arch):
    model, _, acts = tiny.model_and_inputs(tiny_root, arch, 4, 32, batch_size=4)
    spec = _arch.arch_for(arch).experts
    first = next(i for i, b in enumerate(_arch.blocks(model)) if experts.has_experts(b))  # GLM, DeepSeek: block 1
    for block in _arch.blocks(model)[:first]:
        acts = engine.run_block(block, acts, "cpu")
    block = _arch.blocks(model)[first]
    mod = block.get_submodule(spec.path)
    views = experts.views(block, spec)
    assert len(views) == 2 * mod.gate_up_proj.shape[0]
    views[f"{spec.path}.gate_up_proj[2]"].weight.data[0, 0] = 0.0  # a view: writes reach the 3-D parameter
    assert mod.gate_up_proj[2, 0, 0] == 0
    # expert e's statistic is over the tokens routed to it (the router's top-k over the normed hidden states)
    from llmprune.stats import RowNorms

    stats = engine.collect(block, acts, "cpu", RowNorms)
    seen = {}
    # what the router sees, and what the experts do (Gemma 4: another norm of the same residual stream)
    handles = [block.get_submodule(spec.router).register_forward_pre_hook(
        lambda m, a: seen.__setitem__("router", a[0].detach())),
        mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("experts", a[0].detach()))]
    with torch.no_grad():
        engine.block_output(block, acts.hidden[0], acts.kwargs[0])
    for handle in handles:
        handle.remove()
    h = seen["router"].reshape(-1, model.config.hidden_size)
    top, weights = _route(block, spec, h)
    for e in range(mod.gate_up_proj.shape[0]):
        routed = (top == e).any(-1)
        name = f"{spec.path}.gate_up_proj[{e}]"
        if spec.forward == "prescaled":  # Llama 4 multiplies the router's weight into the expert's input
            x = h[routed] * weights[routed][top[routed] == e][:, None]
        else:
            x = seen["experts"].reshape(-1, model.config.hidden_size)[routed]
        if routed.any():
            torch.testing.assert_close(stats[name].norms("sum"), x.norm(dim=0), rtol=1e-4, atol=1e-5)
        else:
            assert name not in stats


@torch.no_grad()
def _route(block, spec, h):
    """The top-k experts of each token and their router weights, from the block's own router: ``(logits, weights,
    index)`` from most families' routers, ``(scores over all experts, logits)`` from Llama 4's."""
    out = block.get_submodule(spec.router)(h)
    if spec.forward == "prescaled":
        scores, logits = out
        top = logits.topk(block.get_submodule(spec.router).top_k, dim=-1).indices
        return top, scores.gather(1, top)
    return out[2], out[1]


def _never_route(model, expert: int) -> None:
    """Make every router of ``model`` skip ``expert`` (its logit -inf), so it receives no calibration token."""
    spec = _arch.arch_for(model.config.model_type).experts
    for block in _arch.blocks(model):
        gate = _arch.get_module(block, spec.router)
        if gate is None or not experts.has_experts(block):  # a dense MLP layer (Qwen3-MoE's mlp_only_layers)
            continue
        if isinstance(getattr(gate, "proj", None), nn.Linear):  # Gemma 4: the router's logits are its Linear's
            gate.proj.register_forward_hook(lambda m, a, out: out.index_fill(-1, torch.tensor([expert]), -torch.inf))
            continue
        weight = gate.weight

        def forward(hidden_states, _gate=gate, _w=weight):
            hidden_states = hidden_states.reshape(-1, _w.shape[1])
            logits = nn.functional.linear(hidden_states, _w)
            logits[:, expert] = -torch.inf
            if spec.forward == "prescaled":  # Llama 4's router: the top-k logits' sigmoids, 0 elsewhere; the logits
                top, idx = torch.topk(logits, _gate.top_k, dim=-1)
                return torch.zeros_like(logits).scatter_(1, idx, torch.sigmoid(top)), logits
            probs = torch.softmax(logits.float(), dim=-1)
            top, idx = torch.topk(probs, _gate.top_k, dim=-1)
            top = top / top.sum(-1, keepdim=True)
            return logits, top.to(logits.dtype), idx

        gate.forward = forward


@pytest.mark.parametrize("arch", tiny.MOE_TYPES)
@pytest.mark.parametrize("method,true_sequential", [("wanda", False), ("sparsegpt", False), ("wandapp", False),
                                                     ("wanda", True), ("sparsegpt", True), ("wandapp", True)])
def test_an_expert_without_tokens_falls_back_to_magnitude(tiny_root, arch, method, true_sequential):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch).eval()
    _never_route(model, 3)
    spec_e = _arch.arch_for(arch).experts
    dense = {f"{i}.{n}": lin.weight.detach().clone() for i, b in enumerate(_arch.blocks(model))
             for n, lin in units.block_linears(b).items()}
    m = METHODS[method]
    pat, s = parse_pattern("2:4", None)
    spec = PruneSpec(pat, s, m.options(tiny.fast_options(method)), true_sequential)
    windows = torch.randint(0, tiny.VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    res = prune_model(model, m, spec, windows, batch_size=4)
    sparse_blocks = [i for i, b in enumerate(_arch.blocks(model)) if experts.views(b, spec_e)]
    expected = {f"{i}.{spec_e.path}.{p}[3]" for i in sparse_blocks for p, _ in spec_e.params}
    assert set(res["no_tokens"]) == expected
    for i, b in enumerate(_arch.blocks(model)):
        for n, lin in units.block_linears(b).items():
            name = f"{i}.{n}"
            if name in expected:  # magnitude over the whole weight: exactly its mask
                mask = select(dense[name].abs(), pat, s, per_row=False)
                assert torch.equal(lin.weight == 0, mask), name
                assert torch.equal(lin.weight[~mask], dense[name][~mask]), name
            else:
                assert (lin.weight == 0).sum() == lin.weight.numel() // 2, name


@pytest.mark.parametrize("arch", tiny.MOE_TYPES)
def test_routers_and_shared_expert_gates_are_never_pruned(calibrated, arch):
    wd = calibrated(arch)
    before = AutoModelForCausalLM.from_pretrained(wd / "model").state_dict()
    code, res = cli("prune", wd, "--method", "wanda", "--sparsity", 0.5)
    assert code == 0 and res["no_token_weights"] >= 0
    after = AutoModelForCausalLM.from_pretrained(wd / "model").state_dict()
    never = [k for k in after if any(f".{m}." in k for m in _arch.arch_for(arch).never_prune)]
    assert never and all(torch.equal(after[k], before[k]) for k in never)
    manifest = json.loads((wd / "manifest.json").read_text())
    assert "no_token_weights" in manifest["steps"][-1]["metrics"]
    # eval's sparsity table counts every expert: one row for each expert parameter, over all experts
    code, ev = cli("eval", wd, "--dataset", wd.parent / "corpus.txt" if (wd.parent / "corpus.txt").exists()
                   else _corpus(wd), "--seqlen", 32, "--max-windows", 2)
    assert code == 0
    path = _arch.arch_for(arch).experts.path
    assert ev["sparsity"][f"{path}.gate_up_proj"] == pytest.approx(0.5)
    assert ev["sparsity"][f"{path}.down_proj"] == pytest.approx(0.5)


def _corpus(wd):
    path = wd.parent / "eval-corpus.txt"
    path.write_text(tiny.corpus(4000, seed=3))
    return path


def test_a_weight_the_table_does_not_describe_is_refused(tiny_root):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "qwen3_moe").eval()
    mod = _arch.blocks(model)[0].mlp.experts
    mod.register_parameter("gate_bias_proj", nn.Parameter(torch.zeros(4, 8, 8)))  # a layout the table does not know
    pat, s = parse_pattern("unstructured", 0.5)
    with pytest.raises(UserError, match=r"block 0 holds mlp\.experts\.gate_bias_proj \[4, 8, 8\]"):
        prune_model(model, METHODS["wanda"], PruneSpec(pat, s), torch.zeros(2, 8, dtype=torch.long))
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing was touched


def test_two_four_on_an_expert_whose_input_width_is_not_divisible_names_it(tiny_root, tmp_path):
    from transformers import Qwen3MoeConfig

    cfg = tiny.config("qwen3_moe").to_dict()
    cfg.update(moe_intermediate_size=30)  # down_proj[e]'s input: 30 columns, not a multiple of 4
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    pat, s = parse_pattern("2:4", None)
    with pytest.raises(UserError, match=r"down_proj\[0\]"):
        prune_model(model, METHODS["magnitude"], PruneSpec(pat, s), None)
