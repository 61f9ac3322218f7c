import torch
from helpers import perturb

from gflows.groups import Group
from gflows.models.lattice import lattice_flow
from gflows.physics.phi4 import Phi4
from gflows.training.lattice import log_weights, train_reverse_kl


def test_lattice_flow_symmetries_and_invariant_log_q():
    torch.manual_seed(0)
    flow = lattice_flow(6, n_layers=4, hidden_fields=2, kernel_sizes=(3, 3))
    perturb(flow, 0.1)
    x = torch.randn(3, 1, 6, 6)
    z = flow.transform(x)[0]
    lq = flow.log_prob(x)
    assert torch.allclose(flow.transform(-x)[0], -z, atol=1e-5)  # phi -> -phi
    assert torch.allclose(flow.log_prob(-x), lq, atol=1e-4)
    roll = torch.roll(x, (1, 1), (2, 3))  # translation keeping the checkerboard
    assert torch.allclose(flow.transform(roll)[0], torch.roll(z, (1, 1), (2, 3)), atol=1e-5)
    G = Group("d4")
    half_turn = next(g for g in G.grid_elements if g.quarter_turns == 2 and not g.flip)
    assert torch.allclose(flow.log_prob(G.act(half_turn, x)), lq, atol=1e-4)
    odd = torch.roll(x, (1, 0), (2, 3))  # swaps the sublattices: not a symmetry of the layers
    assert not torch.allclose(flow.transform(odd)[0], torch.roll(z, (1, 0), (2, 3)), atol=1e-3)


def test_reverse_kl_training_lowers_the_loss_and_reports_ess():
    torch.manual_seed(1)
    th = Phi4(4, -4.0, 6.0)
    flow = lattice_flow(4, n_layers=4, hidden_fields=1, kernel_sizes=(3, 3))
    history = train_reverse_kl(flow, th, steps=60, batch_size=64, lr=5e-3, log_every=20)
    _, lw = log_weights(flow, th, 512)
    loss_start = float(-lw.mean())  # after training; compare with the untrained flow below
    untrained = lattice_flow(4, n_layers=4, hidden_fields=1, kernel_sizes=(3, 3))
    _, lw0 = log_weights(untrained, th, 512)
    assert loss_start < float(-lw0.mean()) - 1.0
    assert len(history) == 3 and 0 < history[-1]["ess_batch"] <= 1
