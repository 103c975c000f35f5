"""OWL (outlier-weighted layer-wise sparsity): the outlier ratios equal an independent computation on the dense model,
the block sparsities keep the global sparsity and the spread asked for, every method prunes each block to its own
target, streaming gives the in-memory result bit for bit, and what OWL cannot do is refused in one line."""

import json

import pytest
import tiny
import torch
from conftest import cli
from transformers import AutoModelForCausalLM

from llmprune import arch as _arch
from llmprune import units
from llmprune import engine, owl, shards
from llmprune.errors import UserError
from llmprune.lazy import Lazy, Rewrite
from llmprune.masks import parse_pattern
from llmprune.methods import METHODS
from llmprune.methods.base import PruneSpec
from llmprune.pruning import prune_model
from llmprune.steps.sweep import grid


def test_outlier_ratio_counts_scores_above_m_times_the_mean_of_all_of_them():
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 13.0]])
    # mean of all eight scores = 20 / 8 = 2.5; above 5 x 2.5 = 12.5: only the 13
    assert owl.outlier_ratio([a, b], 5.0) == pytest.approx(1 / 8)
    assert owl.outlier_ratio([a, b], 6.0) == 0.0  # 15
    # the two-pass form equals the concatenation's
    torch.manual_seed(0)
    parts = [torch.rand(7, 5) ** 4, torch.rand(3, 11) ** 4]
    flat = torch.cat([p.flatten() for p in parts])
    assert owl.outlier_ratio(parts, 2.0) == pytest.approx(float((flat > 2.0 * flat.mean()).float().mean()))


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1], [5, 1, 2, 9]])
def test_block_sparsities_keep_the_weighted_mean_and_span_two_lambda(sizes):
    ratios = [0.02, 0.05, 0.01, 0.03]
    s, lam = 0.6, 0.08
    got = owl.block_sparsities(ratios, sizes, s, lam)
    assert sum(g * n for g, n in zip(got, sizes)) / sum(sizes) == pytest.approx(s, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam)
    # more outliers, fewer weights removed: the order of the sparsities is the reverse of the ratios'
    assert sorted(range(4), key=lambda i: got[i]) == sorted(range(4), key=lambda i: -ratios[i])
    assert all(abs(g - s) <= 2 * lam + 1e-12 for g in got)
    assert owl.block_sparsities([0.03] * 4, sizes, s, lam) == [s] * 4  # nothing to tell the blocks apart
    assert owl.block_sparsities([0.03], [7], s, lam) == [s]


def test_check_refuses_a_spread_that_could_leave_zero_to_one():
    owl.check(0.5, 0.08, 5.0)
    owl.check(0.1, 0.05, 5.0)  # at most min(s, 1 - s) / 2
    for s, lam, m, match in ((0.1, 0.06, 5.0, "at most 0.050"), (0.9, 0.08, 5.0, "at most 0.050"),
                             (0.5, 0.0, 5.0, "positive"), (0.5, 0.08, -1.0, "positive"),
                             (0.5, float("nan"), 5.0, "positive")):
        with pytest.raises(UserError, match=match):
            owl.check(s, lam, m)


def _reference_ratios(model, windows, m):
    """D of every block from a plain forward of the dense model, with hooks on every block Linear (no engine)."""
    sumsq: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(_arch.blocks(model)):
        for name, lin in units.block_linears(block).items():
            def hook(mod, args, key=(i, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sumsq[key] = sumsq.get(key, 0) + x.pow(2).sum(0)
            handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    out = []
    for i, block in enumerate(_arch.blocks(model)):
        scores = torch.cat([(lin.weight.double().abs() * sumsq[(i, n)].sqrt()).flatten()
                            for n, lin in units.block_linears(block).items()])
        out.append(float((scores > m * scores.mean()).double().mean()))
    return out, [sum(lin.weight.numel() for lin in units.block_linears(b).values()) for b in _arch.blocks(model)]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi", "opt"])
@pytest.mark.parametrize("m", [2.0, 5.0])
def test_outlier_ratios_equal_an_independent_computation(tiny_root, arch, m):
    model = AutoModelForCausalLM.from_pretrained(tiny_root / arch).eval()
    torch.manual_seed(0)
    windows = torch.randint(0, tiny.VOCAB, (6, 32))
    want, want_sizes = _reference_ratios(model, windows, m)
    acts = engine.capture(model, windows, 4, "cpu")
    got, sizes = owl.dense_ratios(model, acts, "cpu", m)
    assert sizes == want_sizes
    assert any(w > 0 for w in want)  # the comparison is about something
    n = min(want_sizes)
    for g, w in zip(got, want):
        assert abs(g - w) <= 2 / n  # a score exactly at the threshold may fall either side in another sum order


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "ria", "wandapp"])
def test_each_block_is_pruned_to_its_own_target(calibrated, method):
    wd = calibrated("llama")
    extra = ["--ro-iters", "1"] if method == "wandapp" else []
    code, res = cli("prune", wd, "--method", method, "--sparsity", 0.6, "--owl-lambda", 0.1, "--owl-m", 3, *extra)
    assert code == 0, res
    targets, achieved = res["target_block_sparsity"], res["block_sparsity"]
    assert len(targets) == len(achieved) == len(res["outlier_ratio"]) == tiny.config("llama").num_hidden_layers
    assert max(targets) - min(targets) == pytest.approx(0.2, abs=1e-5)  # tiny blocks do differ in outliers
    # Each row (or SparseGPT column block) rounds its count down: under one weight per row of 64 inputs.
    for t, a in zip(targets, achieved):
        assert t - 1 / 64 - 1e-9 <= a <= t + 1e-9
    assert res["sparsity"]["all"] == pytest.approx(0.6, abs=1 / 64)
    step = json.loads((wd / "manifest.json").read_text())["steps"][-1]
    assert step["params"]["owl_lambda"] == 0.1 and step["params"]["owl_m"] == 3
    assert step["metrics"]["target_block_sparsity"] == targets and step["metrics"]["owl_s"] > 0


def test_owl_on_moe_experts_runs_and_keeps_the_global_sparsity(calibrated):
    wd = calibrated("qwen3_moe")
    code, res = cli("prune", wd, "--method", "wanda", "--sparsity", 0.5, "--owl-lambda", 0.1)
    assert code == 0
    assert res["sparsity"]["all"] == pytest.approx(0.5, abs=1 / 32)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_streamed_owl_equals_in_memory_bit_for_bit(tiny_root, tmp_path, method):
    src = tiny_root / "llama"
    m = METHODS[method]
    pat, s = parse_pattern("unstructured", 0.6)
    spec, settings = PruneSpec(pat, s, m.options({})), owl.Settings(0.1, 3.0)
    torch.manual_seed(0)
    windows = torch.randint(0, tiny.VOCAB, (8, 32))
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ref = prune_model(model, m, spec, windows, batch_size=4, owl=settings)
    lazy = Lazy(src)
    rewrite = Rewrite(lazy, tmp_path / "out", lazy.stored(units.linear_weight_names(lazy.model)))
    got = prune_model(lazy.model, m, spec, windows, batch_size=4, weights=lazy, sink=rewrite.block, owl=settings)
    rewrite.close()
    assert got["owl"] == ref["owl"]
    out = shards.ShardSet(tmp_path / "out")
    state = model.state_dict()
    for name in units.linear_weight_names(model):
        assert torch.equal(out.get(name), state[name]), name


def test_what_owl_cannot_do_is_refused_in_one_line(calibrated, capsys):
    wd = calibrated("llama")
    for args, match in ((["--pattern", "2:4", "--owl-lambda", "0.05"], "unstructured sparsity"),
                        (["--sparsity", "0.5", "--owl-m", "3"], "give --owl-lambda too"),
                        (["--sparsity", "0.9", "--owl-lambda", "0.08"], "use at most 0.050"),
                        (["--method", "dress", "--structure", "mlp", "--ratio", "0.25", "--owl-lambda", "0.05"],
                         "removes whole units")):
        code, _ = cli("prune", wd, *args)
        err = capsys.readouterr().err
        assert code == 1 and match in err and "Traceback" not in err, err
    assert len(json.loads((wd / "manifest.json").read_text())["steps"]) == 1  # nothing was recorded


def test_sweep_grid_with_owl():
    names = [c.name for c in grid("wanda", "0.5,0.7", "2:4", None, owl="0.08")]
    assert names == ["dense", "wanda-0.5", "wanda-0.7", "wanda-0.5-owl0.08", "wanda-0.7-owl0.08", "wanda-2of4"]
    c = grid("wanda", "0.5", None, None, owl="0.08")[2]
    assert c.series == "wanda+owl0.08" and c.prune[-2:] == ["--owl-lambda", "0.08"]
    for kwargs, match in ((dict(methods="wanda", sparsities="0.1", owl="0.08"), "at sparsity 0.1"),
                          (dict(methods="wanda", sparsities=None, patterns="2:4", owl="0.08"), "--sparsities"),
                          (dict(methods="wanda", sparsities="0.5", prune_args="--owl-lambda 0.08"), "--owl LAMBDAS")):
        with pytest.raises(UserError, match=match):
            grid(kwargs.pop("methods"), kwargs.pop("sparsities"), kwargs.pop("patterns", None), None, **kwargs)
