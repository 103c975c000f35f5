"""Wanda++: the RGS score reduces to Wanda at alpha=0, and regional optimisation lowers the block's output error."""

import copy
import dataclasses

import pytest
import tiny
import torch
from conftest import cli
from safetensors.torch import load_file

from llmprune import arch as _arch
from llmprune import units
from llmprune import engine
from llmprune.errors import UserError
from llmprune.masks import Pattern
from llmprune.methods import wandapp
from llmprune.methods.base import BlockContext, PruneSpec


def _weights(wd):
    return {k: v for f in sorted((wd / "model").glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("act_norm", ["sum", "mean"])
def test_alpha_zero_without_ro_equals_wanda(calibrated, tmp_path, arch, pattern, act_norm):
    import shutil

    wd = calibrated(arch)
    other = tmp_path / "other"
    shutil.copytree(wd, other)
    assert cli("prune", wd, "--method", "wanda", "--pattern", pattern)[0] == 0
    assert cli("prune", other, "--method", "wandapp", "--pattern", pattern, "--alpha", 0, "--ro-iters", 0,
               "--act-norm", act_norm)[0] == 0
    a, b = _weights(wd), _weights(other)
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), k


def test_regional_gradients_are_the_rms_of_per_sample_gradients(tiny_root):
    model, _, acts = tiny.model_and_inputs(tiny_root, "llama", 3, 16, batch_size=1)
    block = _arch.blocks(model)[0]
    G = wandapp.regional_gradients(block, acts, "cpu")
    w = block.mlp.down_proj.weight
    per = []
    for h, kw in zip(acts.hidden, acts.kwargs):
        w.grad = None
        w.requires_grad_(True)
        engine.block_output(block, h, kw).norm().backward()
        per.append(w.grad.clone())
        w.requires_grad_(False)
    torch.testing.assert_close(G["mlp.down_proj"], torch.stack(per).pow(2).mean(0).sqrt())


def _block_error(block, dense, acts):
    with torch.no_grad():
        return sum(((engine.block_output(block, h, kw) - engine.block_output(dense, h, kw)) ** 2).sum().item()
                   for h, kw in zip(acts.hidden, acts.kwargs))


def _ro_variants(dense, acts, option: str, variants):
    """2:4 Wanda++ on copies of ``dense``, one per ``(value of option, RO rounds)``: the blocks and their errors
    against the dense block, by that pair."""
    blocks, errors = {}, {}
    for value, iters in variants:
        block = copy.deepcopy(dense)
        opts = wandapp.Options(alpha=0.0, ro_iters=iters, ro_samples=8, ro_lr=1e-2, **{option: value})
        wandapp.METHOD.prune_block(BlockContext(0, block, acts, "cpu", PruneSpec(Pattern(2, 4), 0.5, opts)))
        blocks[value, iters], errors[value, iters] = block, _block_error(block, dense, acts)
    return blocks, errors


def test_regional_optimisation_lowers_the_block_error_and_keeps_exact_sparsity(tiny_root):
    model, _, acts = tiny.model_and_inputs(tiny_root, "llama", 16, 32, batch_size=1)
    dense = _arch.blocks(model)[0]
    errors = {}
    for iters in (0, 5):
        block = copy.deepcopy(dense)
        # a learning rate that moves a tiny random model within 5 rounds (the default 3e-7 is for real LLMs)
        opts = {"alpha": 100.0, "act_norm": "sum", "ro_iters": iters, "ro_samples": 8, "ro_lr": 1e-3, "seed": 0}
        wandapp.METHOD.prune_block(BlockContext(0, block, acts, "cpu", PruneSpec(Pattern(2, 4), 0.5,
                                                                                 wandapp.Options(**opts))))
        for lin in units.block_linears(block).values():
            assert (lin.weight == 0).float().mean().item() == 0.5
            assert lin.weight.grad is None
        errors[iters] = _block_error(block, dense, acts)
    assert errors[5] < 0.9 * errors[0], errors


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_bf16_ro_lowers_the_block_error_like_fp32_and_keeps_dtype_and_sparsity(tiny_root, arch):
    """``ro_dtype='bf16'`` runs RO's products under autocast: the block error falls as with fp32 (within 10% of
    fp32's after the same steps), the mask stays exact, the block comes back in its own dtype, and the weights
    differ from fp32's (the autocast is really on)."""
    model, _, acts = tiny.model_and_inputs(tiny_root, arch, 16, 32, batch_size=1)
    dense = _arch.blocks(model)[0]
    blocks, errors = _ro_variants(dense, acts, "ro_dtype", (("fp32", 0), ("fp32", 4), ("bf16", 4)))
    for block in blocks.values():
        for lin in units.block_linears(block).values():
            assert (lin.weight == 0).float().mean().item() == 0.5
            assert lin.weight.dtype == dense.mlp.down_proj.weight.dtype and lin.weight.grad is None
    assert errors["fp32", 4] < 0.9 * errors["fp32", 0], errors
    assert errors["bf16", 4] < 0.9 * errors["fp32", 0], errors
    assert abs(errors["bf16", 4] - errors["fp32", 4]) < 0.1 * errors["fp32", 4], errors
    a, b = (units.block_linears(blocks[d, 4])["mlp.down_proj"].weight for d in ("fp32", "bf16"))
    assert not torch.equal(a, b)


def test_ro_warns_below_64_samples(calibrated, capsys):
    wd = calibrated("llama", samples=8)
    capsys.readouterr()
    assert cli("prune", wd, "--method", "wandapp", "--ro-iters", 1, "--ro-samples", 4)[0] == 0
    assert "instability below 64" in capsys.readouterr().err


def test_alpha_zero_skips_the_regional_gradients_exactly(tiny_root, monkeypatch):
    """alpha=0 makes the dense pass forward-only (G is unused); the pruned, optimised block is unchanged by it,
    and RO leaves no gradients and no changed requires_grad flags on any parameter of the block."""
    model, _, acts = tiny.model_and_inputs(tiny_root, "qwen2", 8, 16, batch_size=1)  # qwen2: Linear biases
    dense = _arch.blocks(model)[0]
    flags = {n: p.requires_grad for n, p in dense.named_parameters()}
    opts = {"alpha": 0.0, "act_norm": "sum", "ro_iters": 2, "ro_samples": 4, "ro_lr": 1e-3, "seed": 0}
    spec = lambda: PruneSpec(Pattern(2, 4), 0.5, wandapp.Options(**opts))  # noqa: E731
    fast = copy.deepcopy(dense)
    wandapp.METHOD.prune_block(BlockContext(0, fast, acts, "cpu", spec()))
    real_pass = wandapp.DensePass
    seen = []

    def with_grads(*a, **kw):
        seen.append(kw.pop("need_grads"))
        kw["only"] = None  # gradients are the RMS over every sample
        return real_pass(*a, **kw, need_grads=True)

    monkeypatch.setattr(wandapp, "DensePass", with_grads)
    slow = copy.deepcopy(dense)
    wandapp.METHOD.prune_block(BlockContext(0, slow, acts, "cpu", spec()))
    assert seen == [False]  # alpha=0 asked for no gradients
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert a.grad is None and a.requires_grad == flags[name], name


@pytest.mark.parametrize("arch,norms", [("llama", "fixed"), ("gemma3_text", "fixed"), ("qwen3_moe", "fixed"),
                                        ("llama", "mixed"), ("gemma3_text", "mixed"), ("llama", "steps"),
                                        ("llama", "pass"), ("qwen3_moe", "pass"), ("qwen3_moe", "mixed"),
                                        ("qwen3_moe", "steps")])
def test_the_dense_pass_runs_only_the_samples_ro_draws_and_changes_nothing(tiny_root, monkeypatch, arch, norms):
    """Without regional gradients the dense pass runs only the samples RO's rounds draw (their targets and first
    norms): the pruned, optimised block is the one a dense pass over every sample gives, bit for bit. Experts under
    the fixed mask, 'mixed' or 'steps' are the exception: one the draw's (or the later) norms never reached takes
    the dense norms over every sample, so that pass runs them all. ``norms``: the free mask's ro_norms, or the
    fixed mask (the default)."""
    model, _, acts = tiny.model_and_inputs(tiny_root, arch, 16, 32, batch_size=1)
    dense = _arch.blocks(model)[0]
    mask = {"ro_mask": "fixed"} if norms == "fixed" else {"ro_mask": "free", "ro_norms": norms}
    opts = wandapp.Options(alpha=0.0, ro_iters=2, ro_samples=4, ro_lr=1e-2, **mask)
    draws = wandapp.ro_draws(opts, acts.n_samples, 0)
    union = {i for d in draws for i in d}
    assert len(union) < acts.n_samples
    real_pass = wandapp.DensePass
    ran: list[int] = []

    def counted(*a, only=None, force_all=False, **kw):
        p = real_pass(*a, **kw, only=None if force_all else only)
        ran.append(sum(o is not None for o in p.outputs))
        return p

    blocks = []
    for force_all in (False, True):
        monkeypatch.setattr(wandapp, "DensePass", lambda *a, f=force_all, **kw: counted(*a, force_all=f, **kw))
        block = copy.deepcopy(dense)
        wandapp.METHOD.prune_block(BlockContext(0, block, acts, "cpu", PruneSpec(Pattern(2, 4), 0.5, opts)))
        blocks.append(block)
    restricted = norms == "pass" or arch != "qwen3_moe"
    assert ran == [len(union) if restricted else acts.n_samples, acts.n_samples]
    for (name, a), b in zip(blocks[0].named_parameters(), blocks[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_preset_paper_sets_the_papers_values_and_given_options_win():
    paper = wandapp.METHOD.options({"preset": "paper"})
    for k, v in wandapp.PAPER.items():
        assert getattr(paper, k) == v, k
    mixed = wandapp.METHOD.options({"preset": "paper", "ro_lr": 1e-4, "ro_step": None})
    assert mixed.ro_lr == 1e-4 and mixed.alpha == wandapp.PAPER["alpha"] and mixed.ro_step == "absolute"
    with pytest.raises(UserError, match="unknown --preset"):
        wandapp.METHOD.options({"preset": "fast"})


def test_relative_ro_step_scales_each_linears_rate_by_its_weight_rms():
    torch.manual_seed(0)
    ws = [torch.randn(8, 4) * 0.02, torch.randn(3, 5) * 3.0]
    assert wandapp.ro_rates(ws, 1e-3, "absolute") == [1e-3, 1e-3]
    rel = wandapp.ro_rates(ws, 1e-3, "relative")
    for w, r in zip(ws, rel):
        assert r == pytest.approx(1e-3 * float(w.pow(2).mean().sqrt()))
    # The first RMSprop step moves every weight by about its rate: a relative rate is the same fraction of any
    # weight's scale (``alpha`` = 0.99, so the first step is lr * g / sqrt(0.01 g^2) = 10 lr in magnitude).
    for w, r in zip(ws, rel):
        p = torch.nn.Parameter(w.clone())
        opt = torch.optim.RMSprop([{"params": [p], "lr": r}])
        p.grad = torch.randn_like(p)
        opt.step()
        moved = (p.detach() - w).abs().mean() / w.pow(2).mean().sqrt()
        assert moved == pytest.approx(10 * 1e-3, rel=1e-3)


def test_relative_ro_step_from_the_cli_changes_the_result(calibrated, tmp_path):
    import shutil

    wd = calibrated("llama")
    other = tmp_path / "other"
    shutil.copytree(wd, other)
    base = ["--method", "wandapp", "--pattern", "2:4", "--alpha", 0, "--ro-iters", 1, "--ro-samples", 4]
    assert cli("prune", wd, *base, "--ro-lr", 1e-3, "--ro-step", "absolute")[0] == 0
    assert cli("prune", other, *base, "--ro-lr", 1e-3)[0] == 0  # relative: the default
    a, b = _weights(wd), _weights(other)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    import json
    params = json.loads((other / "manifest.json").read_text())["steps"][-1]["params"]
    assert params["ro_step"] == "relative" and params["preset"] == "none"


def test_ro_batch_takes_the_same_step_merged_or_one_sample_at_a_time(tiny_root, monkeypatch):
    """``ro_batch`` sums the losses of several samples into one RMSprop step; the batch is only a speed-up:
    accumulating the samples' gradients one by one (what a block whose arguments do not merge gets) gives the
    same weights."""
    model, _, acts = tiny.model_and_inputs(tiny_root, "gemma3_text", 8, 32, batch_size=1)
    dense = _arch.blocks(model)[0]
    opts = wandapp.Options(alpha=0.0, ro_iters=2, ro_samples=8, ro_batch=4, ro_lr=1e-3, ro_step="relative")
    spec = PruneSpec(Pattern(2, 4), 0.5, opts)
    merged = copy.deepcopy(dense)
    wandapp.METHOD.prune_block(BlockContext(0, merged, acts, "cpu", spec))

    def refuse(self, idx=None):
        raise ValueError("not mergeable")

    monkeypatch.setattr(engine.Activations, "merged", refuse)
    single = copy.deepcopy(dense)
    wandapp.METHOD.prune_block(BlockContext(0, single, acts, "cpu", spec))
    one_step = copy.deepcopy(dense)  # ro_batch 1: other steps, another result (so the equality above has teeth)
    wandapp.METHOD.prune_block(BlockContext(0, one_step, acts, "cpu",
                                            PruneSpec(Pattern(2, 4), 0.5, dataclasses.replace(opts, ro_batch=1))))
    for name, lin in units.block_linears(merged).items():
        other = units.block_linears(single)[name].weight
        torch.testing.assert_close(lin.weight, other, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(lin.weight, units.block_linears(one_step)[n].weight, atol=1e-6)
               for n, lin in units.block_linears(merged).items())


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_true_sequential_rgs_at_alpha_zero_equals_true_sequential_wanda(calibrated, tmp_path, arch, pattern):
    """The one-pass final prune at ``alpha=0``, no RO, is Wanda's score on the true-sequential schedule: the same
    masks as ``wanda --true-sequential``, and the pass's outputs feed the next block as the engine's would."""
    import shutil

    wd = calibrated(arch)
    other = tmp_path / "other"
    shutil.copytree(wd, other)
    assert cli("prune", wd, "--method", "wanda", "--pattern", pattern, "--true-sequential")[0] == 0
    assert cli("prune", other, "--method", "wandapp", "--pattern", pattern, "--alpha", 0, "--ro-iters", 0,
               "--true-sequential")[0] == 0
    a, b = _weights(wd), _weights(other)
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), k


def test_true_sequential_wandapp_with_ro_keeps_exact_sparsity(calibrated):
    wd = calibrated("qwen3")
    code, out = cli("prune", wd, "--method", "wandapp", "--pattern", "2:4", "--true-sequential", "--ro-iters", 2,
                    "--ro-samples", 4, "--ro-batch", 2, "--ro-lr", 1e-3, "--ro-step", "relative", "--ro-mask", "free",
                    "--json")
    assert code == 0, out
    for k, w in _weights(wd).items():
        if k.endswith("proj.weight") and ".layers." in k:
            assert (w == 0).float().mean().item() == 0.5, k


def test_the_defaults_are_the_ablations_and_differ_from_the_paper():
    """What nobody types is what the calibration-slice ablation chose on both real models (benchmarks/README.md);
    the paper's settings are one option away."""
    d = wandapp.METHOD.options({})
    assert (d.alpha, d.ro_iters, d.ro_samples, d.ro_lr, d.ro_step, d.ro_batch, d.ro_mask, d.ro_norms) == (
        0.0, 2, 32, 1e-3, "relative", 1, "fixed", "mixed")
    paper = wandapp.METHOD.options({"preset": "paper"})
    assert all(getattr(paper, k) != getattr(d, k)
               for k in ("alpha", "ro_iters", "ro_lr", "ro_step", "ro_mask", "ro_norms"))


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_step_norms_equal_a_statistics_pass_over_the_same_inputs(tiny_root, arch):
    """What ``ro_norms='steps'`` reads: the norms the forward pre-hooks gather while the block runs are the norms a
    separate statistics pass (``engine.collect``) gives over the same samples and weights -- for the experts too,
    which see only the tokens routed to them."""
    from llmprune import experts
    from llmprune.stats import RowNorms

    model, _, acts = tiny.model_and_inputs(tiny_root, arch, 4, 16, batch_size=1)
    block = _arch.blocks(model)[0]
    want = {n: s.norms("sum") for n, s in engine.collect(block, acts, "cpu", RowNorms).items()}
    with experts.routed_block(block):
        seen = wandapp.StepNorms(units.block_linears(block))
        with torch.no_grad():
            for h, kw in zip(acts.hidden, acts.kwargs):
                engine.block_output(block, h, kw)
        seen.remove()
        got = seen.take("sum")
    assert got.keys() == want.keys() and len(got) >= 7
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_ro_norms_steps_and_pass_both_keep_exact_sparsity_and_differ(tiny_root, arch):
    """Every source of the re-prunes' norms leaves the block exactly 2:4 and lowers its error against no RO; they
    are different estimates (the steps see the weights while they move), so the blocks differ."""
    model, _, acts = tiny.model_and_inputs(tiny_root, arch, 16, 32, batch_size=1)
    dense = _arch.blocks(model)[0]
    blocks, errors = {}, {}
    for norms, iters in (("steps", 3), ("pass", 3), ("mixed", 3), ("steps", 0)):
        block = copy.deepcopy(dense)
        opts = wandapp.Options(alpha=0.0, ro_iters=iters, ro_samples=8, ro_lr=1e-2, ro_norms=norms, ro_mask="free")
        wandapp.METHOD.prune_block(BlockContext(0, block, acts, "cpu", PruneSpec(Pattern(2, 4), 0.5, opts)))
        for name, lin in units.block_linears(block).items():
            assert (lin.weight.reshape(-1, 4) == 0).sum(1).ge(2).all(), name
        blocks[norms, iters], errors[norms, iters] = block, _block_error(block, dense, acts)
    assert all(errors[k, 3] < errors["steps", 0] for k in ("steps", "pass", "mixed")), errors
    for a, b in (("steps", "pass"), ("steps", "mixed"), ("mixed", "pass")):
        assert any(not torch.equal(x, y) for x, y in zip(blocks[a, 3].parameters(), blocks[b, 3].parameters())), (a, b)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_a_fixed_ro_mask_keeps_the_first_rounds_zeros_and_still_lowers_the_error(tiny_root, monkeypatch, arch):
    """``ro_mask='fixed'``: the weights the first round prunes stay exactly zero through every step, so the saved mask
    is that round's; RO still lowers the block error against no RO. ``free`` (the paper's) moves the pruned
    weights too, so its final mask differs from its first round's."""
    model, _, acts = tiny.model_and_inputs(tiny_root, arch, 16, 32, batch_size=1)
    dense = _arch.blocks(model)[0]
    real = wandapp._apply_rgs
    errors, changed = {}, {}
    for mode, iters in (("fixed", 3), ("free", 3), ("free", 0)):
        first: dict[str, torch.Tensor] = {}

        def spy(ctx, *a, _first=first, **kw):
            masks = real(ctx, *a, **kw)
            if not _first:  # the first round's mask, just after its prune
                _first.update({n: lin.weight.detach() == 0 for n, lin in ctx.linears.items()})
            return masks

        monkeypatch.setattr(wandapp, "_apply_rgs", spy)
        block = copy.deepcopy(dense)
        opts = wandapp.Options(alpha=0.0, ro_iters=iters, ro_samples=8, ro_lr=1e-2, ro_mask=mode)
        wandapp.METHOD.prune_block(BlockContext(0, block, acts, "cpu", PruneSpec(Pattern(2, 4), 0.5, opts)))
        final = {n: lin.weight.detach() == 0 for n, lin in units.block_linears(block).items()}
        for n in final:
            assert (final[n].reshape(-1, 4).sum(1) >= 2).all(), n
        changed[mode, iters] = sum(int((final[n] != first[n]).sum()) for n in first)
        errors[mode, iters] = _block_error(block, dense, acts)
    assert changed["fixed", 3] == 0 and changed["free", 3] > 0, changed
    assert errors["fixed", 3] < 0.9 * errors["free", 0], errors


def test_adam_keeps_the_fixed_mask_and_lowers_the_error_its_own_way(tiny_root):
    """``ro_optim='adam'``: a pruned weight's gradient is always zero under the fixed mask, so its moments are zero
    and Adam leaves it at zero as RMSprop does; RO with Adam lowers the block error against no RO, by steps of its
    own (its weights are not RMSprop's)."""
    model, _, acts = tiny.model_and_inputs(tiny_root, "llama", 16, 32, batch_size=1)
    dense = _arch.blocks(model)[0]
    blocks, errors = _ro_variants(dense, acts, "ro_optim", (("rmsprop", 0), ("rmsprop", 3), ("adam", 3)))
    # Both start from the same first round (same draw, same dense norms); RMSprop keeps its mask (the test above)
    kept = {n: lin.weight.detach() == 0 for n, lin in units.block_linears(blocks["rmsprop", 3]).items()}
    for n, lin in units.block_linears(blocks["adam", 3]).items():
        assert torch.equal(lin.weight.detach() == 0, kept[n]), n
    assert errors["adam", 3] < 0.9 * errors["rmsprop", 0], errors
    assert any(not torch.equal(a, b) for a, b in zip(blocks["adam", 3].parameters(),
                                                      blocks["rmsprop", 3].parameters()))


def test_a_fixed_ro_mask_prunes_an_expert_the_first_draw_missed_from_every_sample(tiny_root, monkeypatch):
    """Under ``ro_mask='fixed'`` the first round's mask is final, so it must reach every Linear: an expert the first
    draw routed no token to is pruned there from the dense pass's norms over all samples (Wanda's mask on them) and
    keeps that mask to the end -- not left dense for RO to move and a later prune to cut. The tiny MoE's draws reach
    every expert, so the test hides one expert from the first draw's norms."""
    from llmprune.masks import select

    model, _, acts = tiny.model_and_inputs(tiny_root, "qwen3_moe", 16, 32, batch_size=1)
    block = _arch.blocks(model)[0]
    dense = {n: lin.weight.detach().clone() for n, lin in units.block_linears(block).items()}
    opts = wandapp.Options(alpha=0.0, ro_iters=3, ro_samples=8, ro_lr=1e-2, ro_mask="fixed")
    real_norms, real_apply = wandapp.DensePass.norms, wandapp._apply_rgs
    seen: dict = {}

    def norms(self, idx, convention, names=None):
        out = real_norms(self, idx, convention, names)
        if names is None and "missed" not in seen:  # the first round's draw: expert 1 received no token
            seen["pass"], seen["missed"] = self, [n for n in out if n.endswith("[1]")]
            for n in seen["missed"]:
                del out[n]
        return out

    def spy(ctx, *a, **kw):
        masks = real_apply(ctx, *a, **kw)
        seen.setdefault("first", {n: lin.weight.detach() == 0 for n, lin in ctx.linears.items()})
        return masks

    monkeypatch.setattr(wandapp.DensePass, "norms", norms)
    monkeypatch.setattr(wandapp, "_apply_rgs", spy)
    wandapp.METHOD.prune_block(BlockContext(0, block, acts, "cpu", PruneSpec(Pattern(2, 4), 0.5, opts)))
    final = {n: lin.weight.detach() == 0 for n, lin in units.block_linears(block).items()}
    assert len(seen["missed"]) == 2  # its gate_up and down projections
    everything = list(range(acts.n_samples))
    for name in seen["missed"]:
        norm = real_norms(seen["pass"], everything, opts.act_norm, [name])[name]
        wanda = select(wandapp.rgs_score(dense[name], None, norm, 0.0), Pattern(2, 4), 0.5)
        assert torch.equal(seen["first"][name], wanda), name
    assert all(torch.equal(final[n], seen["first"][n]) for n in final)


@pytest.mark.parametrize("args,says", [
    (["--true-sequential"], "--true-sequential orders Wanda++'s final prune"),
    (["--ro-norms", "pass"], "--ro-norms chooses the norms of RO's re-prunes"),
    (["--true-sequential", "--ro-mask", "fixed", "--ro-iters", 1], "add --ro-mask free, or --ro-iters 0")])
def test_options_the_fixed_mask_leaves_nothing_to_do_for_are_refused(calibrated, capsys, args, says):
    """Under the fixed mask (the default) nothing is pruned after the first round: a re-prune schedule or the norms of
    re-prunes would be silently ignored, so they are one line and exit 1, the workdir unchanged. With the free mask,
    with no RO, or with the paper's preset (its ro_norms are the preset's, not the user's) they run."""
    wd = calibrated("llama", samples=8, seqlen=32)
    manifest = (wd / "manifest.json").read_text()
    assert cli("prune", wd, "--method", "wandapp", "--pattern", "2:4", *args)[0] == 1
    assert says in " ".join(capsys.readouterr().err.split())
    assert (wd / "manifest.json").read_text() == manifest
    for given, true_sequential in (({"ro_norms": "pass", "ro_mask": "free"}, False), ({"ro_iters": 0}, True),
                                   ({"ro_mask": "free"}, True), ({"preset": "paper", "ro_mask": "fixed"}, False)):
        wandapp.METHOD.check_request(wandapp.METHOD.options(given), true_sequential)  # raises nothing


def test_a_fixed_ro_mask_trains_a_kept_weight_that_happens_to_be_zero(tiny_root):
    """The fixed mask is the first prune's selection, not "whatever is zero": a 2:4 group of three exact zeros (a
    dequantized checkpoint holds some) loses two to the prune, and RO trains the third like any kept weight, so the
    group ends with exactly two zeros."""
    model, _, acts = tiny.model_and_inputs(tiny_root, "llama", 16, 32, batch_size=1)
    block = _arch.blocks(model)[0]
    lin = units.block_linears(block)["mlp.down_proj"]
    with torch.no_grad():
        lin.weight[0, :3] = 0
    opts = wandapp.Options(alpha=0.0, ro_iters=2, ro_samples=8, ro_lr=1e-2, ro_mask="fixed")
    wandapp.METHOD.prune_block(BlockContext(0, block, acts, "cpu", PruneSpec(Pattern(2, 4), 0.5, opts)))
    group = lin.weight[0, :4].detach()
    assert int((group == 0).sum()) == 2, group
