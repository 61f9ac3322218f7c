"""Transfer of a lattice sampler to a larger lattice: exact on fields of the smaller period."""

import pytest
import torch
from helpers import perturb

from gflows.models.lattice import lattice_flow, residual_lattice_flow
from gflows.models.transfer import orbit_momenta, transfer_lattice_state


def tile(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.repeat(1, 1, k, k)


@pytest.mark.parametrize("k", [2, 3])
def test_the_larger_flow_maps_periodic_fields_as_the_smaller_one(k):
    """On a field of period L (a k x k tiling), the transferred L' = kL flow is the tiling of the
    L flow: convolutions, site splines and the shared momenta's scales carry over exactly."""
    torch.manual_seed(0)
    small = perturb(lattice_flow(4, 4, 2, "d4", site_spline_bins=4, momentum_scale=True, basis="orbit"))
    small.double()
    large = lattice_flow(4 * k, 4, 2, "d4", site_spline_bins=4, momentum_scale=True, basis="orbit").double()
    notes = transfer_lattice_state(large, small.state_dict(), 4, 4 * k)
    assert any("momentum-orbit scales" in n for n in notes)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    z, _ = small.transform(x)
    zk, _ = large.transform(tile(x, k))
    assert torch.allclose(zk, tile(z, k), atol=1e-12)
    xk, _ = large.transform.inverse(tile(z, k))
    assert torch.allclose(xk, tile(x, k), atol=1e-10)


def test_orbit_momenta_and_refusals():
    p4, p8 = orbit_momenta(4), orbit_momenta(8)
    assert len(p4) == 6 and len(p8) == 15 and all(any(torch.equal(q, r) for r in p8) for q in p4)
    small, large = lattice_flow(4, 2, 2, "trivial"), lattice_flow(8, 2, 4, "trivial")
    with pytest.raises(ValueError, match="another architecture"):
        transfer_lattice_state(large, small.state_dict(), 4, 8)
    with pytest.raises(ValueError, match="even lattices"):
        transfer_lattice_state(lattice_flow(6, 2, 2, "trivial"), small.state_dict(), 3, 6)


def test_residual_samplers_transfer_with_fresh_norm_estimates():
    small = residual_lattice_flow(4, 2, 1, "d4", kernel_sizes=(3, 3))
    small.eval()
    small.log_prob(torch.randn(2, 1, 4, 4))  # power iterations on the 4 x 4 grid
    large = residual_lattice_flow(8, 2, 1, "d4", kernel_sizes=(3, 3))
    notes = transfer_lattice_state(large, small.state_dict(), 4, 8)
    assert any(".u: (1, 1, 4, 4) -> (1, 1, 8, 8)" in n for n in notes)
    large.eval()
    assert torch.isfinite(large.log_prob(torch.randn(2, 1, 8, 8))).all()
