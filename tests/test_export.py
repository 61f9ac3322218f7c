"""gflows.export: plain-PyTorch copies agree with the originals (residual blocks with the exact
log-det), carry no escnn objects, pass torch.export in both directions and load where gflows and
escnn cannot."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from families import FAMILIES, make

from gflows.export import Direction, PlainConv2d, PlainLinear, export
from gflows.models.image import image_flow
from gflows.nn.equivariant import GConv2d
from gflows.transforms.residual import ResidualTransform

EXPORTABLE = sorted(FAMILIES)


def close(a, b, tol=1e-6):
    return torch.allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_copy_computes_what_the_original_does(name, dtype):
    t = make(name, dtype)
    e = export(t)  # before the original's first evaluation: export certifies the original's bounds
    assert not any(isinstance(m, GConv2d) for m in e.modules())
    assert not any(type(m).__module__.startswith("escnn") for m in e.modules())
    assert any(isinstance(m, PlainConv2d) for m in e.modules()) == any(
        isinstance(m, GConv2d) for m in t.modules())
    assert all(not p.requires_grad for p in e.buffers())
    x = torch.randn(4, *t.event_shape, dtype=dtype)
    with torch.no_grad():
        z, ladj = t(x)
        ze, ladje = e(x)
        xr, ladj_inv = t.inverse(z)
        xre, ladj_inve = e.inverse(z)
    # float32: the copies sum in another order (dense Jacobians, plain convolutions), a few ulp
    # of the largest value; float64: the same function to round-off
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for a, b in ((z, ze), (ladj, ladje), (xr, xre), (ladj_inv, ladj_inve)):
        scale = max(1.0, float(a.abs().max()))
        assert float((a - b).abs().max()) <= tol * scale


@pytest.mark.parametrize("name", EXPORTABLE)
def test_torch_export_takes_both_directions(name):
    e = export(make(name))
    x = torch.randn(4, *e.event_shape)
    with torch.no_grad():
        z, ladj = e(x)
        xr, ladj_inv = e.inverse(z)
    for inverse, arg, expected in ((False, x, (z, ladj)), (True, z, (xr, ladj_inv))):
        program = torch.export.export(Direction(e, inverse), (arg,))
        got = program.module()(arg)
        assert all(close(g, w) for g, w in zip(got, expected, strict=True))


def test_exported_programs_load_without_gflows_or_escnn(tmp_path):
    cases = []
    for name, inverse in (("image_coupling", False), ("lattice_coupling", False), ("image_residual", True),
                          ("lattice_residual", False)):
        e = export(make(name))
        x = torch.randn(4, *(e.out_shape if inverse else e.event_shape))
        with torch.no_grad():
            z, ladj = e.inverse(x) if inverse else e(x)
        torch.export.save(torch.export.export(Direction(e, inverse), (x,)), tmp_path / f"{name}.pt2")
        torch.save({"x": x, "z": z, "ladj": ladj}, tmp_path / f"{name}.io.pt")
        cases.append(name)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["gflows"] = None  # importing either would fail
        sys.modules["escnn"] = None
        import torch
        for name in {cases!r}:
            program = torch.export.load(f"{tmp_path}/{{name}}.pt2")
            io = torch.load(f"{tmp_path}/{{name}}.io.pt")
            z, ladj = program.module()(io["x"])
            assert torch.allclose(z, io["z"], atol=1e-6) and torch.allclose(ladj, io["ladj"], atol=1e-5), name
        print("loaded", len({cases!r}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded 4" in r.stdout


def test_export_leaves_the_original_training():
    t = make("coupling").train()
    export(t)
    assert t.training


def test_fully_connected_residual_blocks_export_with_their_normalised_matrices():
    torch.manual_seed(0)
    t = image_flow("residual", "flip", (1, 4, 4), 1, 1, hidden_fields=1, kernel_sizes=(3,), fc_blocks=1,
                   fc_hidden=8, logdet="exact").eval()
    e = export(t)
    assert any(isinstance(m, PlainLinear) for m in e.modules())
    assert not any(isinstance(m, ResidualTransform) for m in e.modules())
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        expected = t(x)
    got = torch.export.export(Direction(e), (x,)).module()(x)
    assert all(close(g, w) for g, w in zip(got, expected, strict=True))


@pytest.mark.parametrize("name", ["residual", "lattice_residual"])
def test_exported_residual_blocks_hold_in_float64(name):
    e = export(make(name, torch.float64))
    x = torch.randn(3, *e.event_shape, dtype=torch.float64)
    with torch.no_grad():
        z, ladj = e(x)
        xr, ladj_inv = e.inverse(z)
    assert torch.allclose(xr, x, atol=1e-10, rtol=0)
    assert torch.allclose(ladj_inv, -ladj, atol=1e-10, rtol=0)


def test_exported_residual_log_det_is_the_exact_one_in_chunks():
    t = make("residual")
    with torch.no_grad():
        x = torch.randn(2, *t.event_shape)
        exact = t(x)[1]
        for chunk in (1, 5, 64):
            assert close(export(t, jacobian_chunk=chunk)(x)[1], exact)
