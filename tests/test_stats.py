"""The activation statistics, against the formulas they implement."""

import pytest
import torch
from torch import nn

from llmprune.stats import Hessian, add_xtx_upper, symmetric_from_upper


@pytest.mark.parametrize("n,block", [(7, 384), (576, 384), (1000, 384), (1536, 384), (300, 64), (257, 100)])
def test_upper_block_triangle_rebuilds_the_whole_product(n, block):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(130, n, generator=g, dtype=torch.float64)
    H = torch.zeros(n, n, dtype=torch.float64)
    add_xtx_upper(H, x, block)
    add_xtx_upper(H, 2 * x, block)  # accumulates: 5 x^T x
    full = symmetric_from_upper(H)
    torch.testing.assert_close(full, 5 * x.T @ x)
    assert torch.equal(full, full.T)


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
