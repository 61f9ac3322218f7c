"""The common test battery for gflows transforms."""

from __future__ import annotations

import torch

from gflows.equivariance import check_equivariance
from gflows.groups import Group
from gflows.representations import squeezed_action


def autograd_logdet(transform, x: torch.Tensor) -> torch.Tensor:
    """``log|det dT(x)/dx|`` for each sample, from a dense autograd Jacobian."""
    out = []
    for xi in x:
        def f(v, xi=xi):
            return transform(v.reshape(1, *xi.shape))[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, xi.reshape(-1))
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def max_reconstruction_error(transform, x: torch.Tensor) -> float:
    with torch.no_grad():
        z, _ = transform(x)
    xr, _ = transform.inverse(z)
    return float((xr - x).abs().max())


def max_equivariance_error(transform, group: Group, x: torch.Tensor, act=None) -> float:
    """``max_g |T(g.x) - g.T(x)|`` over the grid-exact elements of ``group``; ``act(g, x)``
    defaults to ``group.act`` (scalar fields)."""
    return max(e for _, e in check_equivariance(transform, group, x, act, logdet=False))


def output_scale(transform, x: torch.Tensor) -> float:
    """``max(1, max |T(x)|)``: float32 round-off grows with the outputs, so bounds scale by it."""
    with torch.no_grad():
        return max(1.0, float(transform(x)[0].abs().max()))


squeezed_act = squeezed_action


def bad_inputs(shape: tuple[int, ...]) -> list[tuple[object, type, str]]:
    """``(input, error type, word the message must contain)`` for malformed inputs."""
    c, *spatial = shape
    nan = torch.zeros(2, *shape)
    nan.view(-1)[0] = float("nan")
    inf = torch.zeros(2, *shape)
    inf.view(-1)[-1] = float("inf")
    cases = [
        (torch.zeros(*shape), ValueError, "rank"),
        (torch.zeros(2, 1, *shape), ValueError, "rank"),
        (torch.zeros(2, c + 1, *spatial), ValueError, "channels" if len(shape) == 3 else "shape"),
        (nan, ValueError, "NaN"),
        (inf, ValueError, "Inf"),
        (torch.zeros(2, *shape, dtype=torch.int64), TypeError, "dtype"),
        (torch.zeros(2, *shape).numpy(), TypeError, "Tensor"),
    ]
    if len(shape) == 3:
        cases.append((torch.zeros(2, c, spatial[0] + 2, spatial[1]), ValueError, "height"))
    return cases


def perturb(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Move every parameter off its (often identity) initialisation, so checks are not vacuous."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module
