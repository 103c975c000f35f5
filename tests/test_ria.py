"""RIA: the score is what the paper defines, its comparison groups are the authors', and it is a method like the
others (options, true-sequential, recipes) without a line of it outside its own file and the registry."""

import pytest
import tiny
import torch
from conftest import cli

from llmprune import arch as _arch
from llmprune import units
from llmprune import engine
from llmprune.masks import Pattern, nm_valid, select
from llmprune.methods import ria
from llmprune.methods.base import BlockContext, PruneSpec
from llmprune.stats import RowNorms


def test_score_is_relative_importance_times_the_damped_activation_norm():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=gen)
    x = torch.rand(7, generator=gen) * 10
    got = ria.score(w, x, 0.5)
    for i in range(5):
        for j in range(7):
            ri = w[i, j].abs() / w[i].abs().sum() + w[i, j].abs() / w[:, j].abs().sum()
            torch.testing.assert_close(got[i, j], ri * x[j] ** 0.5)


def test_masks_ignore_the_scale_of_weights_and_activations():
    """Relative importance is scale-free in W, and ||X||^a scales every score alike: the masks cannot change."""
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(16, 32, generator=gen), torch.rand(32, generator=gen)
    for pattern, s, per_row in ((Pattern(), 0.5, False), (Pattern(), 0.5, True), (Pattern(2, 4), 0.5, True)):
        a = select(ria.score(w, x), pattern, s, per_row)
        b = select(ria.score(w * 37.0, x * 1e-3), pattern, s, per_row)
        assert torch.equal(a, b)


def test_a_zero_row_or_column_scores_zero_not_nan():
    w = torch.randn(4, 6)
    w[1] = 0
    w[:, 2] = 0
    s = ria.score(w, torch.ones(6))
    assert torch.isfinite(s).all() and (s[1] == 0).all() and (s[:, 2] == 0).all()


@pytest.mark.parametrize("compare", ["layer", "row"])
def test_comparison_group(tiny_root, compare):
    model, _, acts = tiny.model_and_inputs(tiny_root, "llama", 8, 32, batch_size=4)
    block = _arch.blocks(model)[0]
    norms = {n: s.norms() for n, s in engine.collect(block, acts, "cpu", RowNorms).items()}
    dense = {n: lin.weight.detach().clone() for n, lin in units.block_linears(block).items()}
    ria.METHOD.prune_block(BlockContext(0, block, acts, "cpu", PruneSpec(Pattern(), 0.5, ria.Options(compare=compare))))
    for name, lin in units.block_linears(block).items():
        w = lin.weight
        expected = select(ria.score(dense[name], norms[name]), Pattern(), 0.5, per_row=compare == "row")
        assert torch.equal(w == 0, expected), name
        if compare == "row":
            assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
        else:  # one threshold for the whole layer: rows differ, the total is exact
            assert (w == 0).sum().item() == w.numel() // 2 and len(set((w == 0).sum(1).tolist())) > 1, name


@pytest.mark.parametrize("pattern", ["4:8", "2:4"])
def test_true_sequential_and_options_from_the_cli(calibrated, pattern):
    wd = calibrated("qwen3")
    code, res = cli("prune", wd, "--method", "ria", "--pattern", pattern, "--true-sequential", "--act-power", 1.0)
    assert code == 0 and res["sparsity"]["all"] == pytest.approx(0.5)
    from safetensors.torch import load_file

    n, m = map(int, pattern.split(":"))
    for name, w in ((k, v) for f in sorted((wd / "model").glob("*.safetensors")) for k, v in load_file(f).items()):
        if w.dim() == 2 and ".layers." in name and "norm" not in name:
            assert nm_valid(w, n, m), name
    code, st = cli("status", wd)
    params = st["steps"][-1]["params"]
    assert params["method"] == "ria" and params["act_power"] == 1.0 and params["compare"] == "layer"
    assert params["true_sequential"] is True


@pytest.mark.parametrize("args,expected", [
    (["--compare", "diagonal"], "unknown --compare 'diagonal'; use one of: layer, row"),
    (["--act-power", "-1"], "--act-power must be >= 0"),
    (["--blocksize", "64"], "--method ria takes no --blocksize: it belongs to --method sparsegpt"),
])
def test_bad_options_are_one_line(calibrated, capsys, args, expected):
    from llmprune.cli import run

    wd = calibrated("llama")
    capsys.readouterr()
    assert run(["prune", str(wd), "--method", "ria", *args]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    assert err.startswith("error:") and expected in err and "Traceback" not in err
