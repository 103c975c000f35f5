import pytest
import torch

from llmprune.errors import UserError
from llmprune.masks import Pattern, layer_mask, nm_mask, nm_valid, parse_pattern, row_mask


def test_row_mask_removes_exactly_the_lowest_per_row():
    torch.manual_seed(0)
    score = torch.rand(8, 20)
    mask = row_mask(score, 0.3)
    assert (mask.sum(1) == 6).all()
    # every removed score is below every kept score of the same row
    for r in range(8):
        assert score[r][mask[r]].max() < score[r][~mask[r]].min()


def test_layer_mask_counts_over_the_whole_matrix():
    score = torch.arange(40.0).reshape(4, 10)
    mask = layer_mask(score, 0.5)
    assert mask.sum() == 20 and mask[:2].all() and not mask[2:].any()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_is_valid_and_keeps_the_largest(n, m):
    torch.manual_seed(1)
    score = torch.rand(6, 32)
    mask = nm_mask(score, n, m)
    assert (mask.reshape(6, -1, m).sum(-1) == m - n).all()
    w = torch.randn(6, 32)
    w[mask] = 0
    assert nm_valid(w, n, m)
    groups = score.reshape(6, -1, m)
    kept_min = groups.masked_fill(mask.reshape(6, -1, m), float("inf")).min(-1).values
    removed_max = groups.masked_fill(~mask.reshape(6, -1, m), float("-inf")).max(-1).values
    assert (removed_max < kept_min).all()


def test_nm_valid_detects_a_dense_group():
    w = torch.ones(2, 8)
    assert not nm_valid(w, 2, 4)


@pytest.mark.parametrize(
    "text,sparsity,expected",
    [("unstructured", None, (Pattern(), 0.5)), ("unstructured", 0.7, (Pattern(), 0.7)),
     ("2:4", None, (Pattern(2, 4), 0.5)), ("4:8", 0.5, (Pattern(4, 8), 0.5)), ("1:4", None, (Pattern(1, 4), 0.75))],
)
def test_parse_pattern(text, sparsity, expected):
    assert parse_pattern(text, sparsity) == expected


@pytest.mark.parametrize("text,sparsity", [("2:4", 0.6), ("4:4", None), ("5:4", None), ("x:y", None),
                                           ("unstructured", 1.0), ("unstructured", -0.1), ("blocky", None)])
def test_parse_pattern_rejects(text, sparsity):
    with pytest.raises(UserError):
        parse_pattern(text, sparsity)
