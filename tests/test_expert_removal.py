"""Removing whole experts (`prune --method dress --structure experts`): exact where the router renormalises over its
top-k, a plain `from_pretrained` afterwards, the analytic parameter count, REAP and frequency against an independent
computation, DReSS for experts, and the refusals."""

import json
import math

import pytest
import tiny
import torch
from conftest import cli
from transformers import AutoModelForCausalLM

from llmprune import arch as _arch
from llmprune import surgery
from llmprune import budget, reap, structured
from llmprune.errors import UserError
from llmprune.selection import select
from llmprune.structured import Plan


def _renormalising(folder, on: bool = True):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if hasattr(model.config, "norm_topk_prob"):  # Qwen-MoE: a config switch (Mixtral always renormalises)
        model.config.norm_topk_prob = on
        for block in _arch.blocks(model):
            gate = getattr(block.mlp, "gate", None)
            if gate is not None and hasattr(gate, "norm_topk_prob"):
                gate.norm_topk_prob = on
    return model


def _unchosen(model, ids) -> tuple[list[list[int]], list[list[int]]]:
    """Per block: one expert no token of ``ids`` chose, and one that some token chose ([] for a dense block)."""
    st = reap.expert_stats(model, ids, batch_size=1)
    idle = [[] if t is None else [int((t == 0).nonzero()[0])] for t in st.tokens]
    busy = [[] if t is None else [int(t.argmax())] for t in st.tokens]
    return idle, busy


def _one_group(model):
    """DeepSeek-V3 with its two expert groups made one (GLM-4.5's routing): expert removal is then allowed."""
    model.config.n_group = model.config.topk_group = 1
    for block in _arch.blocks(model):
        gate = getattr(block.mlp, "gate", None)
        if gate is not None and hasattr(gate, "num_group"):  # the router's own copy of the config's n_group
            gate.num_group = gate.topk_group = 1
    return model


@pytest.mark.parametrize("arch", tiny.MOE_TYPES)
def test_removing_an_expert_no_token_chose_leaves_the_logits_unchanged(tiny_root, arch):
    model = _renormalising(tiny_root / arch)
    if arch == "deepseek_v3":
        model = _one_group(model)
    ids = torch.tensor([[7]])  # one token chooses 2 of the 4 experts: two per block are idle
    idle, busy = _unchosen(model, ids)
    with torch.no_grad():
        dense = model(ids).logits
        torch.testing.assert_close(surgery.remove(model, Plan("experts", idle))(ids).logits, dense,
                                   atol=1e-5, rtol=0)
        # the control: removing an expert the token did choose changes them
        assert (surgery.remove(model, Plan("experts", busy))(ids).logits - dense).abs().max() > 1e-3


def test_without_top_k_renormalisation_removal_moves_the_weights_of_the_experts_that_stay(tiny_root):
    model = _renormalising(tiny_root / "qwen3_moe", on=False)  # the softmax runs over all experts
    ids = torch.tensor([[7]])
    idle, _ = _unchosen(model, ids)
    with torch.no_grad():
        diff = (surgery.remove(model, Plan("experts", idle))(ids).logits - model(ids).logits).abs().max()
    assert diff > 1e-4


def test_reap_and_frequency_match_an_independent_computation(tiny_root):
    """Router weights and expert outputs recomputed from the block's own router and its 3-D parameters."""
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "mixtral").eval()
    ids = torch.randint(0, tiny.VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    inputs = {}
    hooks = [b.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, b in enumerate(_arch.blocks(model))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    st = reap.expert_stats(model, ids, batch_size=2)
    k = model.config.num_experts_per_tok
    for i, block in enumerate(_arch.blocks(model)):
        x = inputs[i].reshape(-1, inputs[i].shape[-1])
        with torch.no_grad():
            _, weights, chosen = block.mlp.gate(x)
        ex = block.mlp.experts
        want_n, want_s = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.float64)
        for e in range(4):
            tok, pos = torch.where(chosen == e)
            gate, up = (x[tok] @ ex.gate_up_proj[e].T).chunk(2, -1)
            y = (ex.act_fn(gate) * up) @ ex.down_proj[e].T
            want_n[e] = tok.numel()
            want_s[e] = (weights[tok, pos].double() * y.double().norm(dim=-1)).sum()
        assert torch.equal(st.tokens[i], want_n) and int(want_n.sum()) == ids.numel() * k
        torch.testing.assert_close(st.weighted_norm[i], want_s, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.reap()[i], want_s / want_n.clamp(min=1), rtol=1e-4, atol=1e-6)


def test_group_limited_routing_removes_experts_evenly_from_every_group(tiny_root):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "deepseek_v3")  # 2 groups of 4 experts
    with pytest.raises(UserError, match=r"the same number must go from every group \(asked: \[1, 0\]\)"):
        surgery.remove(model, Plan("experts", [[], [0]]))
    with pytest.raises(UserError, match="leaves 1 in each of its 2 expert groups"):  # two score a group
        surgery.remove(model, Plan("experts", [[], [0, 1, 2, 4, 5, 6]]))
    for how in ("random", "tail"):  # every selection takes as many from each group
        plan = select(model, "experts", 0.5, how, None, seed=1)
        assert sorted(e // 4 for e in plan.removed[1]) == [0, 0, 1, 1]
    small = surgery.remove(model, Plan("experts", [[], [1, 6]]))
    assert small.config.n_routed_experts == 6 and small.config.n_group == 2
    ids = torch.randint(0, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(small(ids).logits).all()  # three experts per group: the router runs


@pytest.mark.parametrize("arch", tiny.EXPERT_REMOVAL_TYPES)
@pytest.mark.parametrize("select", ["reap", "frequency", "random"])
def test_pruned_experts_load_plainly_with_the_analytic_count(calibrated, tiny_root, arch, select):
    wd = calibrated(arch, samples=12, seqlen=32)
    dense = AutoModelForCausalLM.from_pretrained(wd / "model")
    spec = _arch.arch_for(dense.config.model_type).experts
    key = spec.count
    code, res = cli("prune", wd, "--method", "dress", "--structure", "experts", "--ratio", 0.5, "--select", select)
    assert code == 0 and res["select"] == select
    small = AutoModelForCausalLM.from_pretrained(wd / "model")  # plain transformers, no llmprune code
    total = getattr(dense.config, key)  # 4 (DeepSeek-V3: 8, in two groups)
    assert getattr(small.config, key) == total // 2
    assert getattr(small.config, spec.top_k) == getattr(dense.config, spec.top_k)
    moe = [b for b in _arch.blocks(dense) if _arch.get_module(b, spec.path) is not None]
    h, i = dense.config.hidden_size, getattr(dense.config, "moe_intermediate_size", None) or dense.config.intermediate_size
    per_expert = 3 * h * i + h  # gate, up and down, and its router row
    if spec.biases:  # gpt-oss: the biases of gate, up and down, and of its router row
        per_expert += 2 * i + h + 1
    if "per_expert_scale" in spec.router_cuts:  # Gemma 4: the router's scale of the expert's weight
        per_expert += 1
    assert res["parameters_before"] - res["parameters"] == len(moe) * (total // 2) * per_expert
    assert sum(p.numel() for p in small.parameters()) == res["parameters"]
    # The streamed removal wrote exactly what removing the plan in memory gives.
    plan = Plan.from_json(res["plan"])
    want = surgery.remove(dense, plan).state_dict()
    got = small.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    for block, removed in zip(_arch.blocks(dense), plan.removed):
        if _arch.get_module(block, spec.path) is None:
            assert removed == []  # a dense block of an MoE model has none to remove
    if select != "random":
        assert res["plan"]["tokens"] and res["plan"]["scores"]
    code, ev = cli("eval", wd, "--dataset", tiny_root / "heldout.txt", "--seqlen", 32, "--max-windows", 2)
    assert code == 0 and ev["perplexity"] > 0


@pytest.mark.parametrize("select", ["frequency", "reap"])
def test_the_lowest_scoring_experts_go(calibrated, select):
    """The expert of each block with the lowest score goes: the token count for ``frequency``, the REAP score (not
    the count: the two rank differently somewhere) for ``reap``."""
    wd = calibrated("mixtral", samples=12, seqlen=32)
    code, res = cli("prune", wd, "--method", "dress", "--structure", "experts", "--ratio", 0.25, "--select",
                    select)
    assert code == 0
    plan = res["plan"]
    key = plan["tokens"] if select == "frequency" else plan["scores"]
    for scores, removed in zip(key, plan["removed"]):
        assert removed == [min(range(4), key=lambda e: (scores[e], e))]
    if select == "reap":
        assert any(sorted(range(4), key=lambda e: s[e]) != sorted(range(4), key=lambda e: t[e])
                   or s != t for s, t in zip(plan["scores"], plan["tokens"]))
    assert res["geometry"]["experts"] == 3 and res["geometry_before"]["experts"] == 4
    assert res["routing_renormalised"] is True


def test_dress_for_experts_shrinks_them_and_measures_the_gap_by_removal(calibrated):
    wd = calibrated("qwen3_moe", samples=16, seqlen=32)
    code, reg = cli("regularize", wd, "--structure", "experts", "--ratio", 0.5, "--select", "reap", "--steps", 12,
                    "--eval-every", 6, "--batch-size", 4, "--holdout", 4, "--lambda", 0.1, "--calibration-windows")
    assert code == 0 and reg["relative_norm"] == 0  # lambda 0.1: zero within 10 steps
    code, res = cli("prune", wd, "--method", "dress")
    assert code == 0 and res["regularized"] and res["structure"] == "experts"
    assert res["plan"]["removed"] == reg["plan"]["removed"]
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["metrics"]["geometry"]["experts"] == 2
    # The gap was measured with the experts removed: the pruned model scores exactly the last measurement's
    # "zeroed" perplexity on the same held-out windows (zeroing a router row would not: logit 0 can win the top-k).
    from safetensors.torch import load_file

    from llmprune.modeling import load_model
    from llmprune.train import heldout_nll

    small, _ = load_model(wd / "model")
    held = load_file(wd / "calib" / "windows.safetensors")["input_ids"][-4:]
    assert math.exp(heldout_nll(small.float(), held)) == pytest.approx(reg["ppl_zeroed"], rel=1e-3)


def test_expert_removal_refusals(calibrated, capsys):
    dense = calibrated("llama", samples=12, seqlen=32)
    moe = calibrated("mixtral", samples=12, seqlen=32)
    manifest = (moe / "manifest.json").read_text()
    for wd, args, words in [
        (dense, ["--structure", "experts", "--ratio", 0.5], "no mixture-of-experts"),
        (dense, ["--structure", "mlp", "--ratio", 0.5, "--select", "reap"], "scores experts"),
        (moe, ["--structure", "experts", "--ratio", 0.75], "fewer than the 2"),
        (moe, ["--structure", "mlp", "--ratio", 0.5], "--structure experts removes whole experts"),
    ]:
        capsys.readouterr()
        assert cli("prune", wd, "--method", "dress", *args)[0] == 1
        err = capsys.readouterr().err
        assert words in " ".join(err.split()) and "Traceback" not in err, err
    assert (moe / "manifest.json").read_text() == manifest


# --- a parameter budget (issue #20, item 2) ----------------------------------------------------------------------
@pytest.mark.parametrize("arch,structure", [("llama", "hidden"), ("llama", "mlp"), ("gemma3_text", "heads"),
                                            ("qwen2", "layers"), ("mixtral", "experts"), ("qwen3_moe", "experts")])
def test_params_after_is_what_removal_builds(tiny_root, arch, structure):
    from llmprune import selection
    from llmprune.modeling import param_count

    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch)
    for ratio in (0.25, 0.5):
        plan = selection.select(model, structure, ratio, "tail", None)
        assert budget.params_after(model, plan) == param_count(surgery.remove(model, plan))


@pytest.mark.parametrize("arch,structure", [("llama", "mlp"), ("llama", "hidden"), ("mixtral", "experts")])
def test_a_budget_is_the_smallest_ratio_that_reaches_it(tiny_root, arch, structure):
    from llmprune import selection
    from llmprune.modeling import param_count

    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch)
    total = param_count(model)
    if structure == "experts":  # at most 2 of 4 experts can go (each token needs 2): 0.7 is out of reach
        with pytest.raises(UserError, match="cannot reach"):
            budget.ratio_for_budget(model, structure, budget.parse_budget("0.7", total))
    for text in ("0.8", f"{int(total * 0.7)}") if structure != "experts" else ("0.8", "0.9"):
        target = budget.parse_budget(text, total)
        ratio, params = budget.ratio_for_budget(model, structure, target)
        assert params <= target
        plan = selection.select(model, structure, ratio, "tail", None)
        assert budget.params_after(model, plan) == params
        units = structured.count_removed(structured.geometry(model), structure, ratio)
        fewer = [n for n in range(units) if structured.count_removed_or_none(
            structured.geometry(model), structure, n / structured.units_per_group(structured.geometry(model), structure)) == n]
        if fewer:  # one unit fewer (of those a ratio can give) would miss the budget
            smaller = selection.select(model, structure, fewer[-1] / structured.units_per_group(
                structured.geometry(model), structure), "tail", None)
            assert budget.params_after(model, smaller) > target


def test_target_params_through_the_commands(calibrated, capsys):
    wd = calibrated("llama", samples=12, seqlen=32)
    code, res = cli("prune", wd, "--method", "dress", "--structure", "mlp", "--target-params", "0.8", "--select",
                    "tail")
    assert code == 0 and res["parameters"] <= res["budget"]["target"] == round(0.8 * res["parameters_before"])
    assert res["parameters"] == res["budget"]["params"] and res["ratio"] == res["budget"]["ratio"]
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["params"]["target_params"] == "0.8" and step["params"]["ratio"] == res["ratio"]
    wd2 = calibrated("qwen2", samples=16, seqlen=32)
    code, reg = cli("regularize", wd2, "--structure", "layers", "--target-params", "0.7", "--steps", 2,
                    "--batch-size", 4, "--holdout", 4, "--select", "tail")
    assert code == 0 and reg["budget"]["params"] <= reg["budget"]["target"]
    code, res = cli("prune", wd2, "--method", "dress")
    assert code == 0 and res["parameters"] == reg["budget"]["params"]
    fresh = calibrated("mistral", samples=12, seqlen=32)
    for args in (["--target-params", "2.0"], ["--target-params", "lots"], ["--target-params", "0.5", "--ratio", 0.3],
                 ["--target-params", "10"]):
        capsys.readouterr()
        assert cli("prune", fresh, "--method", "dress", "--structure", "mlp", *args)[0] == 1
        err = capsys.readouterr().err
        assert err.strip() and "Traceback" not in err


# --- combinations: one budget split between structures ------------------------------------------------------------
@pytest.mark.parametrize("arch,structure", [("llama", "hidden+mlp"), ("gemma3_text", "heads+mlp"),
                                            ("qwen2", "mlp+layers"), ("mixtral", "experts+heads")])
def test_a_combination_removes_its_parts_in_turn(tiny_root, arch, structure):
    from llmprune import selection
    from llmprune.modeling import param_count

    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch).eval()
    a, b = structure.split("+")
    pa = selection.select(model, a, 0.5, "tail", None)
    pb = selection.select(model, b, 0.5, "tail", None)
    combined = budget.combine(structure, [pb, pa])  # given in any order, removed in structured.ORDER
    ids = torch.randint(0, tiny.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    want = surgery.remove(surgery.remove(model, combined.parts[0]), combined.parts[1])
    got = surgery.remove(model, combined)
    assert got.state_dict().keys() == want.state_dict().keys()
    assert all(torch.equal(got.state_dict()[k], want.state_dict()[k]) for k in want.state_dict())
    assert budget.params_after(model, combined) == param_count(got) < param_count(model)
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits)
    assert combined.n_units == pa.n_units + pb.n_units
    # the slices of a combination are its parts', with distinct unit ids (the DReSS group norms need them)
    sl = structured.slices(model, combined)
    units = [set(x.unit.tolist()) for x in sl]
    assert len(sl) == len(structured.slices(model, pa)) + len(structured.slices(model, pb))
    assert max(max(u) for u in units) + 1 == len(set().union(*units))


def test_the_budget_split_is_searched_recorded_and_applied(calibrated, tiny_root, capsys):
    wd = calibrated("llama", samples=24, seqlen=32)
    assert cli("prune", wd, "--method", "dress", "--structure", "hidden+mlp", "--select", "tail")[0] == 1
    assert "--target-params" in capsys.readouterr().err
    code, res = cli("prune", wd, "--method", "dress", "--structure", "hidden+mlp", "--target-params", "0.8")
    assert code == 0
    b = res["budget"]
    assert len(b["alternatives"]) >= 3 and b["chosen"] in b["alternatives"]
    assert all(a["parameters"] <= b["target"] for a in b["alternatives"])
    assert b["chosen"]["heldout_ppl"] == min(a["heldout_ppl"] for a in b["alternatives"])
    assert res["parameters"] == b["chosen"]["parameters"] <= b["target"]
    small = AutoModelForCausalLM.from_pretrained(wd / "model")  # plain transformers
    from llmprune.modeling import param_count

    assert param_count(small) == res["parameters"]
    assert small.config.intermediate_size == 128 - round(b["chosen"]["ratios"]["mlp"] * 128)


def test_the_split_search_measures_each_structure_once(calibrated, monkeypatch):
    """A structure's activation scores do not depend on the ratio: the search measures them once per structure
    (not once per candidate ratio) and still scores the same splits as before."""
    from llmprune import selection
    from llmprune.methods import dress  # the budget search, which calls select

    wd = calibrated("llama", samples=24, seqlen=32)
    calls: list[str] = []
    real = selection.scores

    def counted(model, structure, *args, **kwargs):
        calls.append(structure)
        return real(model, structure, *args, **kwargs)

    import shutil

    again = wd.parent / "uncached"
    shutil.copytree(wd, again)
    monkeypatch.setattr(selection, "scores", counted)
    code, res = cli("prune", wd, "--method", "dress", "--structure", "hidden+mlp", "--target-params", "0.8")
    assert code == 0
    ratios = {s: {a["ratios"][s] for a in res["budget"]["alternatives"] if a["ratios"][s]} for s in ("hidden", "mlp")}
    assert len(ratios["hidden"]) >= 2 and len(ratios["mlp"]) >= 2  # several ratios of each were selected...
    assert sorted(calls) == ["hidden", "mlp"]  # ...from one measurement each
    # ...and the search is the one that measures for every candidate: the same scores, the same choice
    real_select = selection.select
    monkeypatch.setattr(dress, "select", lambda *a, measured=None, **kw: real_select(*a, **kw))
    calls.clear()
    code, fresh = cli("prune", again, "--method", "dress", "--structure", "hidden+mlp", "--target-params", "0.8")
    assert code == 0 and len(calls) > 2
    strip = lambda b: {k: v for k, v in b.items() if k != "search_s"}  # noqa: E731
    assert strip(fresh["budget"]) == strip(res["budget"])


@pytest.mark.parametrize("arch,structure,how", [("llama", "mlp", "activation"), ("llama", "hidden", "activation"),
                                                ("qwen3_moe", "experts", "reap"),
                                                ("qwen3_moe", "experts", "frequency")])
def test_a_selection_from_measured_scores_equals_a_fresh_one(tiny_root, arch, structure, how):
    from llmprune import selection

    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch).eval()
    windows = torch.randint(0, model.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(1))
    measured = selection.unit_scores(model, structure, how, windows)
    for ratio in (0.25, 0.5):
        fresh = selection.select(model, structure, ratio, how, windows)
        again = selection.select(model, structure, ratio, how, None, measured=measured)
        assert again.to_json() == fresh.to_json() and fresh.n_units
    other = "frequency" if how == "reap" else "reap" if structure == "experts" else None
    if other:  # scores measured for another selection are refused, not ranked by
        with pytest.raises(ValueError, match="given for"):
            selection.select(model, structure, 0.25, other, None, measured=measured)


def test_a_regularised_combination_is_the_plan_the_prune_applies(calibrated):
    wd = calibrated("qwen3", samples=24, seqlen=32)
    code, reg = cli("regularize", wd, "--structure", "heads+mlp", "--target-params", "0.85", "--steps", 4,
                    "--eval-every", 4, "--batch-size", 4, "--holdout", 4, "--lambda", 0.3)
    assert code == 0 and reg["relative_norm"] == 0 and reg["budget"]["chosen"]
    code, res = cli("prune", wd, "--method", "dress")
    assert code == 0 and res["regularized"] and res["structure"] == "heads+mlp"
    assert res["parameters"] == reg["budget"]["chosen"]["parameters"]


def test_a_search_scored_after_regularizing_each_split(calibrated, capsys):
    """``regularize --search-steps N``: every candidate split is regularised N steps on a copy before it is removed
    and scored -- other scores than direct removal's for the same splits, the best one chosen and recorded with how
    it was scored -- and the model the step then regularises is the untouched dense one."""
    wd = calibrated("llama", samples=24, seqlen=32)
    direct = wd.parent / "direct"
    import shutil

    shutil.copytree(wd, direct)
    common = ["--structure", "hidden+mlp", "--target-params", "0.8", "--steps", 2, "--eval-every", 2,
              "--batch-size", 4, "--holdout", 4, "--lambda", 0.3]
    code, plain = cli("regularize", direct, *common)
    assert code == 0 and plain["budget"]["scored_by"] == "removal"
    code, reg = cli("regularize", wd, *common, "--search-steps", 3)
    assert code == 0
    b = reg["budget"]
    assert b["scored_by"] == "regularize 3 steps"
    assert b["chosen"]["heldout_ppl"] == min(a["heldout_ppl"] for a in b["alternatives"])
    by_split = {json.dumps(a["ratios"], sort_keys=True): a["heldout_ppl"] for a in plain["budget"]["alternatives"]}
    assert {json.dumps(a["ratios"], sort_keys=True) for a in b["alternatives"]} == set(by_split)
    assert any(a["heldout_ppl"] != by_split[json.dumps(a["ratios"], sort_keys=True)] for a in b["alternatives"])
    assert reg["before"]["ppl"] == plain["before"]["ppl"]  # the candidates trained copies, not the model
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["params"]["search_steps"] == 3
    assert "search_steps" not in json.loads((direct / "manifest.json").read_text())["steps"][-1]["params"]
    code, res = cli("prune", wd, "--method", "dress")
    assert code == 0 and res["parameters"] == b["chosen"]["parameters"]


@pytest.mark.parametrize("args,says", [(["--structure", "mlp", "--ratio", 0.25], "--search-steps"),
                                       (["--structure", "hidden+mlp", "--target-params", 0.8, "--search-steps", -1],
                                        "--search-steps")])
def test_search_steps_refusals(calibrated, capsys, args, says):
    wd = calibrated("llama", samples=24, seqlen=32)
    extra = [] if "-1" in map(str, args) else ["--search-steps", 2]
    assert cli("regularize", wd, *args, *extra, "--steps", 1)[0] == 1
    assert says in capsys.readouterr().err


def test_prune_select_activation_after_an_experts_regularize(calibrated):
    """``activation`` means REAP for experts: naming it at the prune of a plan regularised as ``reap`` is the same
    selection, not a conflicting one."""
    wd = calibrated("qwen3_moe", samples=16, seqlen=32)
    assert cli("regularize", wd, "--structure", "experts", "--ratio", 0.5, "--steps", 2, "--eval-every", 2,
               "--batch-size", 4, "--holdout", 4, "--lambda", 0.5)[0] == 0
    code, res = cli("prune", wd, "--method", "dress", "--select", "activation")
    assert code == 0 and res["regularized"]
