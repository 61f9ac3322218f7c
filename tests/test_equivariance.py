"""gflows.check_equivariance: small errors for equivariant layers, and it can fail."""

import math

import pytest
import torch
from helpers import perturb

from gflows import Flow, GCoupling, GResidualBlock, check_equivariance, density_gaps
from gflows.groups import get_group
from gflows.representations import squeezed_action
from gflows.transforms.reshape import Squeeze


@pytest.mark.parametrize("group", ["flip", "c4", "d4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equivariant_layers_pass(group, dtype):
    layer = perturb(GCoupling(group, (2, 6, 6), hidden_fields=2, basis="orbit")).to(dtype)
    x = torch.randn(3, 2, 6, 6, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    errors = check_equivariance(layer, group, x, atol=tol, rtol=tol)
    assert len(errors) == {"flip": 2, "c4": 4, "d4": 8}[group]
    assert max(e for _, e in errors) > 0 or dtype == torch.float64  # float32 rounding is visible


def test_squeezed_layers_with_the_squeezed_action():
    layer = perturb(GCoupling("d4", (8, 4, 4), squeeze_levels=1, hidden_fields=2, basis="orbit")).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    check_equivariance(layer, "d4", x, act=squeezed_action("d4", 1), atol=1e-12, rtol=1e-12)
    sq = Squeeze((2, 8, 8))  # its input is plain, its output squeezed
    check_equivariance(sq, "d4", torch.randn(2, 2, 8, 8), act_out=squeezed_action("d4", 1), atol=0)
    with pytest.raises(AssertionError, match="not d4-equivariant"):  # squeezed channels are not scalars
        check_equivariance(layer, "d4", x, atol=1e-6)


def test_a_non_equivariant_map_fails_and_a_stochastic_logdet_is_skipped_on_request():
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    with pytest.raises(AssertionError, match="Conv2d is not c4-equivariant"):
        check_equivariance(conv, "c4", torch.randn(2, 1, 6, 6), atol=1e-4)
    block = GResidualBlock("c4", (1, 6, 6), 2).train()  # unbiased estimate: new noise every call
    x = torch.randn(2, 1, 6, 6)
    assert max(e for _, e in check_equivariance(block, "c4", x, logdet=False)) < 1e-5
    with pytest.raises(AssertionError, match="GResidualBlock"):
        check_equivariance(block, "c4", x, atol=1e-5)


def test_density_gaps_vanish_for_an_invariant_flow_and_not_otherwise():
    x = torch.randn(16, 2, 6, 6, dtype=torch.float64)
    invariant = Flow(perturb(GCoupling("d4", (2, 6, 6), hidden_fields=2, basis="orbit"))).double()
    gaps = density_gaps(invariant, "d4", x, batch_size=5)
    assert len(gaps) == 10 and gaps["|gap|"][0] < 1e-12 and abs(gaps["mean"][0]) < 1e-12
    plain = Flow(perturb(GCoupling("trivial", (2, 6, 6), hidden_fields=2))).double()
    gaps = density_gaps(plain, "d4", x)
    assert gaps["|gap|"][0] > 1e-3 and gaps["(rot 0 deg)"] == (0.0, 0.0)


@pytest.mark.parametrize("group", ["flip", "c4", "d4"])
def test_the_mean_gap_bounds_the_cost_of_symmetrising(group):
    """Jensen: the symmetrised density ``mean_h p(h^-1 x)`` is at most the mean gap below ``p`` on
    average, and the mean gap is the elements' gaps averaged."""
    torch.manual_seed(0)
    h = get_group(group)
    plain = Flow(perturb(GCoupling("trivial", (2, 6, 6), hidden_fields=2))).double()
    with torch.no_grad():
        x = plain.sample(64)
        log_p = plain.log_prob(x)
        moved = torch.stack([plain.log_prob(h.act(g, x)) for g in h.grid_elements])
    # the grid elements form a group, so {h^-1 x} = {g x}
    log_sym = torch.logsumexp(moved, 0) - math.log(len(h.grid_elements))
    gaps = density_gaps(plain, h, x)
    elements = [v for g, (v, _) in gaps.items() if g not in ("|gap|", "mean")]
    assert gaps["mean"][0] == pytest.approx(sum(elements) / len(elements), rel=1e-12)
    assert gaps["mean"][0] > 1e-3 and gaps["mean"][1] > 0
    cost = float((log_p - log_sym).mean())
    assert 0 < cost <= gaps["mean"][0]
