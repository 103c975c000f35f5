"""The activation statistics, against the formulas they implement."""

import pytest
import torch
from torch import nn

from llmprune.stats import Hessian, add_xtx_upper, mirror_upper_


@pytest.mark.parametrize("n,block", [(7, 384), (576, 384), (1000, 384), (1536, 384), (300, 64), (257, 100)])
def test_upper_block_triangle_rebuilds_the_whole_product(n, block):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(130, n, generator=g, dtype=torch.float64)
    H = torch.zeros(n, n, dtype=torch.float64)
    add_xtx_upper(H, x, block)
    add_xtx_upper(H, 2 * x, block)  # accumulates: 5 x^T x
    full = mirror_upper_(H.clone(), block)
    torch.testing.assert_close(full, 5 * x.T @ x)
    assert torch.equal(full, full.T)


@pytest.mark.parametrize("n,block", [(7, 3), (384, 384), (1000, 384), (257, 100)])
def test_mirror_in_place_is_the_upper_triangle_mirrored(n, block):
    """The in-place mirror gives exactly the matrix built out of place from the upper triangle, whatever the lower
    triangle held before (add_xtx_upper leaves partial products in the diagonal blocks' lower halves)."""
    H = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    expected = torch.triu(H) + torch.triu(H, 1).T
    assert torch.equal(mirror_upper_(H.clone(), block), expected)


def test_hessian_mirrors_again_after_more_samples_and_hands_its_matrix_over():
    lin = nn.Linear(800, 4)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 16, 800, generator=g), torch.randn(3, 16, 800, generator=g)
    h, fresh = Hessian(lin), Hessian(lin)
    h.add(a)
    _ = h.H  # mirrored in place here...
    h.add(b)  # ...then accumulated into again: only the upper triangle counts
    fresh.add(a)
    fresh.add(b)
    assert torch.equal(h.H, fresh.H) and torch.equal(h.H, h.H.T)
    taken = h.take()
    assert torch.equal(taken, fresh.H)
    with pytest.raises(RuntimeError):
        _ = h.H


def test_hessian_is_the_running_average_of_2_xtx_over_samples():
    lin = nn.Linear(800, 4)  # wide enough for three column blocks on the CPU
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 16, 800, generator=g) for b in (3, 1, 4)]
    h = Hessian(lin)
    for b in batches:
        h.add(b)
    x = torch.cat([b.reshape(-1, 800) for b in batches]).double()
    expected = (2 * x.T @ x / 8).float()
    torch.testing.assert_close(h.H, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(h.H, h.H.T)
