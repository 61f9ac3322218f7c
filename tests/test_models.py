import torch

import gflows
from gflows.models import g_residual_flow


def test_d4_residual_flow_on_rgb_images_is_invariant_and_samples():
    flow = g_residual_flow("d4", (3, 8, 8), n_blocks=2, hidden_fields=2)
    x = torch.randn(4, 3, 8, 8)
    flow.train()
    flow.log_prob(x)  # ActNorm data-dependent initialisation
    flow.eval()
    G = gflows.Group("d4")
    with torch.no_grad():
        lp = flow.log_prob(x)  # estimated (stochastic) in eval mode: just finite and batched
        assert lp.shape == (4,) and bool(torch.isfinite(lp).all())
    with gflows.logdet_mode(flow, "exact"):
        lp = flow.log_prob(x[:1])
        for g in G.grid_elements:
            assert torch.allclose(flow.log_prob(G.act(g, x[:1])), lp, atol=1e-4)
        s = flow.sample(2)
    assert s.shape == (2, 3, 8, 8)
    z, _ = flow.transform(s)
    assert torch.isfinite(z).all()
