import copy

import pytest
import torch
from conftest import GROUPS

from gflows.groups import Group
from gflows.nn.equivariant import GConv2d, GConvNet, LipSwish, symmetry_breaking_sq_norm


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("group", GROUPS)
def test_convnet_is_equivariant(group, padding_mode):
    net = GConvNet(group, 2, 3, hidden_fields=2, kernel_sizes=(3, 3), padding_mode=padding_mode)
    G = Group(group)
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        y = net(x)
        assert y.shape == (2, 3, 6, 6)
        for g in G.grid_elements:
            assert float((net(G.act(g, x)) - G.act(g, y)).abs().max()) <= 1e-5


def test_trivial_group_is_an_unconstrained_convolution():
    """Same code path, but no symmetry is imposed: the trivial net is not rotation equivariant."""
    torch.manual_seed(3)
    net = GConvNet("trivial", 1, 1, hidden_fields=4, kernel_sizes=(3, 3))
    G = Group("c4")
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        err = (net(G.act(G.elements[1], x)) - G.act(G.elements[1], net(x))).abs().max()
    assert float(err) > 1e-2
    conv = GConv2d("trivial", (1, "scalar"), (4, "scalar"), 3)
    assert conv.in_channels == 1 and conv.out_channels == 4


@pytest.mark.parametrize("group, dim", [("trivial", 9), ("c4", 9 * 4), ("d4", 9 * 8)])
def test_filter_basis_spans_every_equivariant_3x3_kernel(group, dim):
    """One regular field to one: G acts freely on the 8 x 8 (or |G|^2) channel pairs, so the space of
    equivariant 3x3 kernels has dimension 9 |G|; the trivial group gets every 3x3 kernel."""
    conv = GConv2d(group, (1, "regular"), (1, "regular"), 3)
    n = conv.r2conv.weights.numel()
    basis = torch.stack([conv.r2conv.basisexpansion(w) for w in torch.eye(n)]).reshape(n, -1)
    assert n == dim and int(torch.linalg.matrix_rank(basis)) == dim


@pytest.mark.parametrize("group, size", [("trivial", 1), ("c4", 4), ("d4", 8)])
def test_hidden_width_is_fields_times_group_order(group, size):
    conv = GConv2d(group, (1, "scalar"), (3, "regular"), 1)
    assert conv.out_channels == 3 * size


def test_lipswish_is_1_lipschitz():
    act = LipSwish(2, 3)
    with torch.no_grad():
        act.rho.copy_(torch.tensor([-2.0, 3.0]))
    x = torch.linspace(-8, 8, 4001).repeat(6, 1).T.reshape(4001, 6, 1, 1).requires_grad_(True)
    (d,) = torch.autograd.grad(act(x).sum(), x)
    assert float(d.abs().max()) <= 1.0
    # unscaled, it is 1.0998-Lipschitz whatever beta: the 1 / 1.1 a following layer takes is tight
    raw = LipSwish(2, 3, scaled=False)
    raw.load_state_dict(act.state_dict())
    (d,) = torch.autograd.grad(raw(x).sum(), x)
    assert 1.099 <= float(d.abs().max()) <= LipSwish.LIPSCHITZ
    assert torch.allclose(raw(x) / LipSwish.LIPSCHITZ, act(x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("lipschitz", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group", GROUPS)
def test_stack_folds_lipswish_scale_into_the_next_filter(group, dtype, lipschitz):
    """Each LipSwish between convolutions leaves out its 1 / 1.1 and the next filter takes it (after
    the spectral normalisation for Lipschitz convolutions): the same map as the stack that divides,
    to round-off, as are its gradients; other activations are left alone."""
    from gflows.nn.lipschitz import LipschitzGConv2d

    torch.manual_seed(0)
    conv, kw = (LipschitzGConv2d, {"input_hw": (4, 4), "coeff": 0.9}) if lipschitz else (GConv2d, {})
    net = GConvNet(group, 2, 2, 2, (3, 1, 3), conv=conv, conv_kwargs=kw).to(dtype)
    convs = [m for m in net.layers if isinstance(m, GConv2d)]
    acts = [m for m in net.layers if isinstance(m, LipSwish)]
    assert [c.input_scale for c in convs] == [1.0, 1 / 1.1, 1 / 1.1]
    assert not any(a.scaled for a in acts)
    unfolded = copy.deepcopy(net)
    for m in unfolded.modules():  # back to the class defaults: divide in the activation
        m.__dict__.pop("input_scale", None)
        m.__dict__.pop("scaled", None)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    unfolded.load_state_dict(net.state_dict())
    x = torch.randn(3, 2, 4, 4, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.manual_seed(1)  # the same refresh noise in both power iterations
    y = net(x)
    torch.manual_seed(1)
    y_ref = unfolded(x)
    assert torch.allclose(y, y_ref, rtol=tol, atol=tol)
    grads = torch.autograd.grad(y.square().sum(), list(net.parameters()))
    grads_ref = torch.autograd.grad(y_ref.square().sum(), list(unfolded.parameters()))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        # relative to each gradient's largest entry (up to ~1e4 with these weights): entries that
        # cancel to near zero carry the round-off of the large ones
        assert (g - g_ref).abs().max() <= 10 * tol * max(1.0, float(g_ref.abs().max()))
    plain = GConvNet(group, 2, 2, 2, (3, 1, 3), activation=lambda n, f: torch.nn.Tanh())
    assert all(c.input_scale == 1.0 for c in plain.layers if isinstance(c, GConv2d))


def test_bad_settings():
    with pytest.raises(ValueError, match="odd"):
        GConv2d("c4", (1, "scalar"), (1, "scalar"), 2)
    with pytest.raises(ValueError, match="padding_mode"):
        GConv2d("c4", (1, "scalar"), (1, "scalar"), 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="field kind"):
        GConv2d("c4", (1, "vector"), (1, "scalar"), 3)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("fields", [((1, "scalar"), (2, "regular")), ((2, "regular"), (1, "scalar"))])
def test_dense_basis_expansion_equals_escnn(group, fields, monkeypatch):
    """Small layers expand their filter with one dense product: the same filter as escnn's, and the
    same gradients; above the size limit escnn's own expansion is used."""
    conv = GConv2d(group, fields[0], fields[1], 3)
    assert conv.dense_basis is not None
    with torch.no_grad():
        conv.r2conv.weights.normal_()
        if conv.r2conv.bias is not None:
            conv.r2conv.bias.normal_()
    w, b = conv.expanded()
    w0, b0 = conv.r2conv.expand_parameters()
    assert torch.allclose(w, w0, atol=1e-6) and (b is None or torch.allclose(b, b0, atol=1e-6))
    g1 = torch.autograd.grad((w * w0.detach()).sum(), conv.r2conv.weights)[0]
    g0 = torch.autograd.grad((w0 * w0.detach()).sum(), conv.r2conv.weights)[0]
    assert torch.allclose(g1, g0, atol=1e-5)
    assert "dense_basis" not in conv.state_dict()
    import gflows.nn.equivariant as eq

    monkeypatch.setattr(eq, "DENSE_BASIS_LIMIT", 0)
    assert GConv2d(group, fields[0], fields[1], 3).dense_basis is None


def test_moving_one_layer_leaves_other_layers_alone():
    """escnn shares cached basis expansions between layers of equal types; ours own a copy."""
    a = GConv2d("c4", (1, "scalar"), (1, "regular"), 3)
    b = GConv2d("c4", (1, "scalar"), (1, "regular"), 3)
    a.to(torch.float64)
    assert all(t.dtype == torch.float32 for t in b.r2conv.buffers())
    assert b(torch.randn(1, 1, 5, 5)).dtype == torch.float32
    assert a(torch.randn(1, 1, 5, 5, dtype=torch.float64)).dtype == torch.float64
    assert GConv2d("c4", (1, "scalar"), (1, "regular"), 3)(torch.randn(1, 1, 5, 5)).dtype == torch.float32


def test_owned_basis_expansion_hashes_by_identity():
    """escnn hashes a basis expansion by its sampled basis; a layer's own copy hashes by identity so
    that module-tree walks stay cheap, and the copy still deep-copies, pickles and computes."""
    import pickle

    a = GConv2d("d4", (1, "scalar"), (1, "regular"), 3)
    b = GConv2d("d4", (1, "scalar"), (1, "regular"), 3)
    ea, eb = a.r2conv.basisexpansion, b.r2conv.basisexpansion
    for m in ea.modules():
        assert hash(m) == object.__hash__(m)
    assert ea != eb and len({ea, eb}) == 2
    x = torch.randn(2, 1, 5, 5)
    c = copy.deepcopy(a)
    d = pickle.loads(pickle.dumps(a))
    assert torch.equal(c(x), a(x)) and torch.equal(d(x), a(x))
    assert torch.allclose(a.expanded()[0], a.r2conv.expand_parameters()[0], atol=1e-6)


def test_state_dict_is_the_same_in_train_and_eval_mode():
    """escnn's R2Conv.eval() would add cached filter buffers: a checkpoint written in one mode must
    load in the other."""
    conv = GConv2d("d4", (1, "scalar"), (1, "regular"), 3)
    keys = set(conv.state_dict())
    conv.eval()
    conv(torch.randn(1, 1, 5, 5))
    assert set(conv.state_dict()) == keys and not conv.training and not conv.r2conv.training
    conv.train()
    assert set(conv.state_dict()) == keys and conv.r2conv.training


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_loaded_checkpoint_brings_its_own_basis(group):
    """escnn saves its sampled basis; a layer that loads a checkpoint written with another basis
    (another machine or library version) must compute the filter from the loaded one."""
    src = GConv2d(group, (1, "scalar", 1), (2, "regular"), 3)
    with torch.no_grad():
        src.r2conv.weights.normal_()
    state = src.state_dict()
    key = next(k for k in state if k.endswith("sampled_basis"))
    state[key] = -state[key]  # another valid basis of the same space
    dst = GConv2d(group, (1, "scalar", 1), (2, "regular"), 3)
    assert dst.dense_basis is not None
    dst.load_state_dict(state)
    w, _ = dst.expanded()
    assert torch.allclose(w, dst.r2conv.expand_parameters()[0], atol=1e-6)
    assert torch.allclose(w, -src.expanded()[0], atol=1e-6)


def test_squeezed_basis_is_the_same_in_every_process():
    """escnn decomposes the squeezed representation from random starts; ours are seeded, so DDP
    ranks and resumed runs agree on the basis their weights are coefficients of."""
    import subprocess
    import sys

    code = ("from gflows.representations import squeezed_representation as s; "
            "print([s(g, n).change_of_basis.round(8).tolist() for g, n in (('c4', 1), ('flip', 2))])")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert outs[0] == outs[1] and outs[0]


ORBIT_LAYERS = [((2, "scalar"), (3, "regular"), 3), ((3, "regular"), (2, "regular"), 1),
                ((2, "regular"), (1, "scalar", 1), 3), ((1, "scalar", 2), (2, "regular"), 3)]


@pytest.mark.parametrize("fields", ORBIT_LAYERS)
@pytest.mark.parametrize("group", ["trivial", "flip", "c4", "d4"])
def test_orbit_basis_spans_escnns_space_and_starts_from_its_filter(group, fields):
    """One weight per orbit of filter entries: as many as escnn's basis has (the same space, since
    escnn's filters are equivariant, hence constant on the orbits), and the same initial filter."""
    torch.manual_seed(5)
    ref = GConv2d(group, *fields)
    torch.manual_seed(5)
    conv = GConv2d(group, *fields, basis="orbit")
    assert conv.orbit_weights.numel() == ref.r2conv.weights.numel()
    w, b = conv.expanded()
    w0, b0 = ref.expanded()
    assert float(w0.abs().max()) > 0 and torch.allclose(w, w0, atol=1e-6)
    assert (b is None) == (b0 is None) and (b is None or torch.allclose(b, b0, atol=1e-6))
    assert set(conv.state_dict()) == {"orbit_weights", "orbit_bias"}


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("fields", ORBIT_LAYERS)
@pytest.mark.parametrize("group", ["flip", "c4", "d4"])
def test_orbit_basis_is_exactly_equivariant(group, fields, padding_mode):
    """With arbitrary orbit weights, in float64: equivariant to rounding (escnn's float32 basis is
    only equivariant to ~1e-6 relative)."""
    from helpers import squeezed_act

    conv = GConv2d(group, *fields, padding_mode=padding_mode, basis="orbit").double()
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_()
    G = Group(group)
    levels_in, levels_out = (f[2] if len(f) == 3 else 0 for f in fields[:2])
    x = torch.randn(2, conv.in_channels, 4, 4, dtype=torch.float64)
    y = conv(x)
    for g in G.elements:
        # regular fields: the escnn representation of g permutes each field's |G| channels
        gx = squeezed_act(G, levels_in)(g, x) if fields[0][1] == "scalar" else _act_regular(G, g, x)
        gy = squeezed_act(G, levels_out)(g, y) if fields[1][1] == "scalar" else _act_regular(G, g, y)
        assert float((conv(gx) - gy).abs().max()) <= 1e-12 * float(y.abs().max())


def _act_regular(G: Group, g, x: torch.Tensor) -> torch.Tensor:
    from gflows.representations import field_type

    rep = torch.as_tensor(field_type(G, x.shape[1] // G.order, "regular").representation(G.escnn_element(g)))
    return G.act(g, torch.einsum("ij,bjhw->bihw", rep.to(x.dtype), x))


def test_orbit_basis_trains_and_zeroes():
    conv = GConv2d("d4", (1, "scalar"), (2, "regular"), 3, basis="orbit")
    conv(torch.randn(2, 1, 5, 5)).square().sum().backward()
    assert conv.orbit_weights.grad.abs().sum() > 0 and conv.orbit_bias.grad.abs().sum() > 0
    conv.zero_()
    assert float(conv(torch.randn(2, 1, 5, 5)).abs().max()) == 0.0
    escnn_conv = GConv2d("d4", (1, "scalar"), (2, "regular"), 3).zero_()
    assert float(escnn_conv(torch.randn(2, 1, 5, 5)).abs().max()) == 0.0


def test_orbit_basis_settings():
    with pytest.raises(ValueError, match="basis"):
        GConv2d("c4", (1, "scalar"), (1, "regular"), 3, basis="dense")
    with pytest.raises(ValueError, match="map the grid onto itself"):
        GConv2d("c8", (1, "scalar"), (1, "regular"), 3, basis="orbit")
    assert GConv2d("c8", (1, "scalar"), (1, "regular"), 3, basis="auto").basis == "escnn"
    assert GConv2d("c4", (1, "scalar"), (1, "regular"), 3, basis="auto").basis == "orbit"


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_relax_zero_is_the_strict_layer_and_the_error_grows_with_relax(group):
    """relax=0 has the strict layer's parameters and outputs bit for bit; with a fixed free part the
    equivariance error is round-off at relax -> 0 and grows in proportion to relax."""
    from gflows.equivariance import check_equivariance

    torch.manual_seed(1)
    strict = GConv2d(group, (2, "scalar"), (3, "scalar"), 3, basis="orbit").double()
    torch.manual_seed(1)
    zero = GConv2d(group, (2, "scalar"), (3, "scalar"), 3, basis="orbit", relax=0.0).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    assert strict.state_dict().keys() == zero.state_dict().keys() and torch.equal(strict(x), zero(x))
    errors = []
    for relax in (1e-8, 1e-4, 1e-2, 1.0):
        torch.manual_seed(1)
        layer = GConv2d(group, (2, "scalar"), (3, "scalar"), 3, basis="orbit", relax=relax).double()
        with torch.no_grad():
            g = torch.Generator().manual_seed(2)
            layer.free_weight.copy_(torch.randn(layer.free_weight.shape, generator=g))
        errors.append(max(e for _, e in check_equivariance(layer, group, x)))
    assert max(e for _, e in check_equivariance(zero, group, x)) < 1e-13
    assert errors == sorted(errors) and errors[-1] / errors[1] == pytest.approx(1e4, rel=1e-3)
    with pytest.raises(ValueError, match="relax must be >= 0"):
        GConv2d(group, (1, "scalar"), (1, "scalar"), 3, relax=-0.1)


@pytest.mark.parametrize("group, sub",
                         [("d4", "flip"), ("d4", "c4"), ("d4", "c2"), ("c4", "c2"), ("d4", "d2")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relax_to_a_subgroup_keeps_it_exactly(group, sub, dtype):
    """With ``relax_to=H`` the free part is H-equivariant: the relaxed layer (through a regular
    hidden layer) commutes with H's elements to round-off, and with no other element of G."""
    from gflows.equivariance import check_equivariance

    torch.manual_seed(3)
    net = GConvNet(group, 2, 3, 1, (3, 3), conv_kwargs={"basis": "orbit", "relax": 1.0, "relax_to": sub})
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    net = net.to(dtype)
    x = torch.randn(2, 2, 7, 7, dtype=dtype)
    keeps = {str(g) for g in Group(group).subgroup_elements(sub)}
    scale = float(net(x).abs().max())
    tol = (1e-5 if dtype == torch.float32 else 1e-13) * scale
    for g, error in check_equivariance(net, group, x):
        assert (error <= tol) == (str(g) in keeps), (str(g), error, scale)
    convs = [m for m in net.modules() if isinstance(m, GConv2d)]
    # a free orbit per H-orbit of entries: each entry's orbit has |H| of them (H acts freely on the
    # regular side of every layer)
    assert [m.free_weight.numel() for m in convs] == [m.out_channels * m.in_channels * 9 // Group(sub).order
                                                       for m in convs]


def test_relax_to_trivial_is_the_free_filter_and_bad_subgroups_are_named():
    torch.manual_seed(0)
    plain = GConv2d("d4", (1, "scalar"), (1, "regular"), 3, basis="orbit", relax=0.1)
    torch.manual_seed(0)
    trivial = GConv2d("d4", (1, "scalar"), (1, "regular"), 3, basis="orbit", relax=0.1, relax_to="trivial")
    assert trivial.relax_to is None and trivial.free_weight.shape == plain.free_weight.shape == (8, 1, 3, 3)
    for kw, match in [({"relax": 0.0, "relax_to": "flip"}, "set relax > 0"),
                      ({"relax": 0.1, "relax_to": "d4"}, "own group"),
                      ({"relax": 0.1, "relax_to": "c8"}, "not a subgroup of d4"),
                      ({"relax": 0.1, "relax_to": "c3"}, "not a subgroup of d4"),
                      ({"relax": 0.1, "relax_to": "pentagon"}, "unknown group")]:
        with pytest.raises(ValueError, match=match):
            GConv2d("d4", (1, "scalar"), (1, "regular"), 3, basis="orbit", **kw)
    with pytest.raises(ValueError, match="not a subgroup of c4"):
        GConv2d("c4", (1, "scalar"), (1, "regular"), 3, basis="orbit", relax=0.1, relax_to="flip")
    with pytest.raises(ValueError, match="map the grid onto itself"):
        GConv2d("c8", (1, "scalar"), (1, "regular"), 3, relax=0.1, relax_to="c2")


def test_symmetry_breaking_norm_is_that_of_the_non_equivariant_part():
    torch.manual_seed(0)
    net = torch.nn.Sequential(GConv2d("d4", (2, "scalar"), (1, "regular"), 3, basis="orbit", relax=0.3),
                              GConv2d("d4", (1, "regular"), (2, "scalar"), 3, basis="orbit"))
    assert symmetry_breaking_sq_norm(net[1]) is None
    with torch.no_grad():
        net[0].free_weight.normal_()
        net[0].free_bias.normal_()
    (w, b), (w_g, b_g) = net[0].expanded(), net[0]._equivariant_filter()
    expected = (w - w_g).square().sum() + (b - b_g).square().sum()
    assert torch.allclose(symmetry_breaking_sq_norm(net), expected)
    # relaxed to a subgroup: still the norm of the whole filter's non-equivariant part
    layer = GConv2d("d4", (2, "scalar"), (1, "regular"), 3, basis="orbit", relax=0.3, relax_to="flip")
    with torch.no_grad():
        layer.free_weight.normal_()
        layer.free_bias.normal_()
    (w, b), (w_g, b_g) = layer.expanded(), layer._equivariant_filter()
    expected = (w - w_g).square().sum() + (b - b_g).square().sum()
    assert torch.allclose(symmetry_breaking_sq_norm(layer), expected)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_circular_conv2d_is_the_padded_convolution_with_its_derivatives(kernel_size):
    """Values of ``F.pad(circular)`` + ``F.conv2d``; reverse- and forward-mode derivatives (also
    batched, for the residual blocks' exact log-dets) and second derivatives by finite differences."""
    from torch.autograd import gradcheck, gradgradcheck

    from gflows.nn.equivariant import circular_conv2d, circular_pad

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, kernel_size, kernel_size, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    p = kernel_size // 2
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (p,) * 4, mode="circular"), w, b)
    assert torch.equal(circular_conv2d(x, w, b), ref)
    assert gradcheck(circular_conv2d, (x, w, b), check_forward_ad=True, check_batched_grad=True,
                     check_batched_forward_grad=True)
    assert gradcheck(lambda v, k: circular_conv2d(v, k), (x, w), check_forward_ad=True)
    assert gradgradcheck(circular_conv2d, (x, w, b))
    if p:
        assert gradcheck(lambda v: circular_pad(v, p), (x,), check_forward_ad=True, check_batched_grad=True)
    # input gradients alone (autograd.grad with respect to x, a non-leaf filter): the same numbers
    wn = w * 1.0
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad(circular_conv2d(x, wn, b), x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gx, gx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group", GROUPS + ["flip", "c8"])
@pytest.mark.parametrize("fields", [((1, "scalar"), (3, "regular")), ((2, "regular"), (2, "regular")),
                                    ((3, "regular"), (2, "scalar"))])
def test_block_basis_is_the_dense_basis(group, fields):
    """escnn's dense basis is one block per (out field, in field) pair: the filter from that block
    equals the one from the whole dense basis (float64 to round-off), and its gradient too."""
    conv = GConv2d(group, *fields, kernel_size=3, padding_mode="circular").double()
    assert conv.block_basis is not None
    torch.manual_seed(0)
    with torch.no_grad():
        conv.r2conv.weights.normal_()
    w, _ = conv.expanded()
    ref = conv.dense_basis @ conv.r2conv.weights
    assert torch.allclose(w, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(w)
    (grad,) = torch.autograd.grad(w, conv.r2conv.weights, g)
    (grad_ref,) = torch.autograd.grad(ref, conv.r2conv.weights, g)
    assert torch.allclose(grad, grad_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pointwise_convolution_is_the_convolution_with_its_derivatives(bias, dtype, layout):
    """1x1 convolutions run as a (batched) matrix product on the CPU: the same values, first and
    second derivatives as ``F.conv2d`` (the residual flows' series needs the second), whatever the
    input's strides; channels-last inputs give channels-last outputs."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    conv = GConv2d("d4", (2, "regular"), (3, "regular"), 1, bias=bias).to(dtype)
    w, b = conv.expanded()
    x = torch.randn(5, 16, 6, 4, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":  # neither layout: H and W swapped in memory
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    x.requires_grad_(True)
    y, y_ref = conv.conv(x, w, b), F.conv2d(x, w, b)
    assert (layout == "channels_last") == (y.is_contiguous(memory_format=torch.channels_last)
                                           and not y.is_contiguous())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(y, y_ref, rtol=tol, atol=tol)
    v = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, v, create_graph=True)
    (g_ref,) = torch.autograd.grad(y_ref, x, v, create_graph=True)
    assert torch.allclose(g, g_ref, rtol=tol, atol=tol)
    params = [p for p in conv.parameters() if p.requires_grad]
    second = torch.autograd.grad((g * x).sum(), params, retain_graph=True, allow_unused=True)
    second_ref = torch.autograd.grad((g_ref * x).sum(), params, allow_unused=True)
    assert any(a is not None for a in second)  # the filter's weights
    for a, r in zip(second, second_ref, strict=True):
        assert (a is None and r is None) or torch.allclose(a, r, rtol=10 * tol, atol=10 * tol)
