"""Networks on squeezed tensors: the coarse grid for grid-exact groups, the fine grid otherwise."""

import pytest
import torch

from gflows.equivariance import check_equivariance
from gflows.nn.equivariant import GConvNet
from gflows.nn.squeezed import AtFineGrid, squeezed_net
from gflows.representations import squeeze, squeezed_action, unsqueeze


def make(group, basis="auto"):
    return lambda levels: GConvNet(group, 2 * 4**levels, 2 * 4**levels, 2, (3, 3), squeeze_levels=levels,
                                   conv_kwargs={"basis": basis})


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_grid_exact_groups_run_on_the_coarse_grid(group):
    net = squeezed_net(group, 1, make(group, "orbit")).double()  # exact in float64
    assert not isinstance(net, AtFineGrid)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    check_equivariance(net, group, x, act=squeezed_action(group, 1), atol=1e-12, rtol=1e-12)


def test_other_groups_unsqueeze_and_squeeze_back():
    net = squeezed_net("c8", 1, make("c8"))
    assert isinstance(net, AtFineGrid)
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(net(x), squeeze(net.net(unsqueeze(x, 1)), 1))
    pair = AtFineGrid(lambda v: (v, 2 * v), 1)  # a tuple output is squeezed entry by entry
    a, b = pair(x)
    assert torch.equal(a, x) and torch.equal(b, 2 * x)
