"""Conditioners: zero at initialisation, even scales and odd shifts when sign-symmetric, bounded."""

import pytest
import torch
from helpers import perturb

from gflows.groups import Group
from gflows.transforms.conditioner import ACTIVATIONS, Conditioner, conditioner_net


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("group", "mode"),
                         [("d4", True), ("d4", "odd"), ("trivial", "odd"), ("c4", "average")])
def test_zero_init_then_even_scales_and_odd_shifts(dtype, group, mode):
    kw = {"activation": "tanh"} if mode == "odd" else {}
    cond = Conditioner(group, 2, 3, hidden_fields=2, sign_symmetric=mode, **kw).to(dtype)
    x = torch.randn(4, 2, 6, 6, dtype=dtype)
    s, t = cond(x)
    assert s.shape == t.shape == (4, 3, 6, 6) and not s.any() and not t.any()  # the identity at first
    perturb(cond)
    s, t = cond(x)
    s_neg, t_neg = cond(-x)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert torch.allclose(s_neg, s, atol=tol) and torch.allclose(t_neg, -t, atol=tol)
    assert s.abs().max() > 1e-3 and t.abs().max() > 1e-3


def test_soft_bounds_and_settings():
    cond = perturb(Conditioner("trivial", 1, 1, hidden_fields=2, scale_bound=0.5, shift_bound=2.0), 10.0)
    s, t = cond(100 * torch.randn(2, 1, 4, 4))
    assert s.abs().max() <= 0.5 and t.abs().max() <= 2.0  # tanh saturates to 1 in float32
    additive = perturb(Conditioner("trivial", 1, 1, hidden_fields=2, affine=False))
    assert not additive(torch.randn(2, 1, 4, 4))[0].any()
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        conditioner_net("trivial", 1, 1, activation="relu6")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_odd_conditioner_is_group_equivariant_in_one_pass(dtype):
    """The odd trunk's conditioner commutes with D4 (float64 round-off on the orbit basis) and runs
    its network once, on the batch itself."""
    from gflows.groups import get_group

    cond = perturb(Conditioner("d4", 1, 1, hidden_fields=1, sign_symmetric="odd", activation="tanh",
                               padding_mode="circular", basis="orbit")).to(dtype)
    x = torch.randn(3, 1, 6, 6, dtype=dtype)
    g = get_group("d4")
    s, t = cond(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for e in g.elements:
        s_g, t_g = cond(g.act(e, x))
        torch.testing.assert_close(s_g, g.act(e, s), atol=tol, rtol=0)
        torch.testing.assert_close(t_g, g.act(e, t), atol=tol, rtol=0)
    batches = []
    cond.net.layers[0].register_forward_hook(lambda m, i, o: batches.append(len(i[0])))
    cond(x)
    assert batches == [3]


def test_sign_modes_are_checked():
    with pytest.raises(ValueError, match="unknown sign_symmetric 'even'"):
        Conditioner("d4", 1, 1, sign_symmetric="even")
    with pytest.raises(ValueError, match=r"needs an odd activation \('tanh'\), got 'lipswish'"):
        Conditioner("d4", 1, 1, sign_symmetric="odd")
    additive = perturb(Conditioner("trivial", 1, 1, hidden_fields=2, affine=False, sign_symmetric="odd",
                                   activation="tanh"))
    x = torch.randn(2, 1, 4, 4)
    s, t = additive(x)
    assert not s.any() and torch.allclose(additive(-x)[1], -t) and t.abs().max() > 1e-3


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_keeps_the_net_equivariant(activation):
    """Pointwise activations commute with the permutations of scalar and regular fields: the net is
    D4-equivariant to float64 round-off whatever the activation."""
    torch.manual_seed(0)
    net = perturb(conditioner_net("d4", 2, 3, hidden_fields=2, activation=activation).double())
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    G = Group("d4")
    with torch.no_grad():
        y = net(x)
        assert y.abs().max() > 1e-3
        for g in G.grid_elements:
            assert float((net(G.act(g, x)) - G.act(g, y)).abs().max()) <= 1e-12
