"""Measured equivariance of a layer, a network or a flow (as escnn's modules offer
``check_equivariance``).

For a transform ``T`` (``forward(x) -> (z, log|det J|)``) and the group's action ``g .`` on inputs
and outputs, the error of each grid-exact element is ``max |T(g . x) - g . T(x)|`` (outputs) and
``max |ladj(g . x) - ladj(x)|`` (the log-det of an equivariant layer is invariant, the action being a
permutation); for a module returning one tensor, only the first. On grid-exact elements both
vanish up to round-off (about 1e-6 relative in float32, 1e-15 in float64); C8's and D8's extra
elements rotate by interpolation, so they are left out (see :attr:`~gflows.groups.Group.grid_elements`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from gflows.groups import Group, GroupElement, get_group

__all__ = ["check_equivariance", "density_gaps"]

Action = Callable[[GroupElement, Tensor], Tensor]


def _outputs(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    out = module(x)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


@torch.no_grad()
def check_equivariance(module: nn.Module, group: str | Group, x: Tensor, act: Action | None = None,
                       act_out: Action | None = None, logdet: bool = True, atol: float | None = None,
                       rtol: float = 0.0) -> list[tuple[GroupElement, float]]:
    """The equivariance error of ``module`` at ``x`` for every grid-exact element of ``group``.

    Args:
        module: a :class:`~gflows.flow.Transform` (its log-det is checked too) or any module
            mapping a tensor to a tensor.
        group: the symmetry group.
        x: inputs ``[B, ...]``.
        act: the action on inputs (default: :meth:`Group.act`, scalar fields; for squeezed tensors
            :func:`~gflows.representations.squeezed_action`).
        act_out: the action on outputs (default: ``act``).
        logdet: also compare a transform's log-dets. Stochastic log-det estimates (residual blocks in
            training mode) differ from call to call: check those in eval mode, or with ``logdet=False``.
        atol, rtol: with ``atol``, raise ``AssertionError`` naming the first element whose error
            exceeds ``atol + rtol * max |T(x)|``.

    Returns:
        ``(element, error)`` for each grid-exact element: the largest absolute difference of the
        outputs (and of the log-dets).

    >>> from gflows import GCoupling
    >>> layer = GCoupling("d4", (2, 6, 6), hidden_fields=2)
    >>> errors = check_equivariance(layer, "d4", torch.randn(3, 2, 6, 6), atol=1e-5)
    >>> len(errors)
    8
    """
    group = get_group(group)
    act = act or group.act
    act_out = act_out or act
    y, ladj = _outputs(module, x)
    scale = float(y.abs().max())
    errors = []
    for g in group.grid_elements:
        yg, ladj_g = _outputs(module, act(g, x))
        err = float((yg - act_out(g, y)).abs().max())
        if logdet and ladj is not None:
            err = max(err, float((ladj_g - ladj).abs().max()))
        errors.append((g, err))
        if atol is not None and err > atol + rtol * scale:
            raise AssertionError(f"{type(module).__name__} is not {group.name}-equivariant at {g}: "
                                 f"error {err:.3g} > {atol:g} + {rtol:g} * {scale:.3g}")
    return errors


def _mean_and_error(values: Tensor) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (0 for a single value)."""
    return float(values.mean()), float(values.std() / len(values) ** 0.5) if len(values) > 1 else 0.0


@torch.no_grad()
def density_gaps(flow: nn.Module, group: str | Group, x: Tensor, act: Action | None = None,
                 batch_size: int = 256) -> dict[str, tuple[float, float]]:
    r"""For each grid-exact element ``g``: the mean over ``x`` of :math:`\log p(x) - \log p(g x)` under
    ``flow``, with its standard error; (key ``"|gap|"``) the mean of its absolute value over the
    data and the elements; and (key ``"mean"``) the mean gap over the data and the elements, with
    its standard error over the data.

    Under an exactly ``G``-invariant model every gap is zero up to round-off: the mean absolute gap
    is the model's *invariance error*. Under a model trained without symmetry on data ``p_data``,
    :math:`E_x[\log p(x) - \log p(g x)]` estimates :math:`KL(p_{data} \| g_* p_{data})` (up to the
    model's error): the data's *asymmetry* under ``g``, near zero for a symmetry of the data.
    Put a stochastic flow in ``eval`` mode first (and an exact log-det where it has one). Both
    densities of a pair are evaluated from the same random state, so a flow whose randomness is
    dequantisation noise ``u`` compares ``x + u`` with ``g x + u``: its gaps then hold that noise
    (zero in expectation for an invariant model, exactly zero for the identity).

    The mean gap bounds what exact invariance can cost. The grid elements form a group ``H``, and
    the best ``H``-invariant model of ``p`` is its symmetrisation :math:`\bar p = |H|^{-1} \sum_h
    h_* p`` (for invariant ``q``, :math:`KL(p \| q) = KL(p \| \bar p) + KL(\bar p \| q)`). By
    Jensen's inequality, :math:`\log \bar p(x) \ge |H|^{-1} \sum_h \log p(h^{-1} x)` at every
    ``x``, so :math:`KL(p \| \bar p) \le |H|^{-1} \sum_h KL(p \| h_* p)`: with the model
    standing in for ``p``, no ``H``-invariant model can be more than the ``"mean"`` gap behind it.
    """
    group = get_group(group)
    act = act or group.act
    out, absolute, total = {}, [], 0.0

    def log_p(b: Tensor, seed: int) -> Tensor:
        with torch.random.fork_rng(devices=[b.device] if b.is_cuda else []):
            torch.manual_seed(seed)
            return flow.log_prob(b)

    for g in group.grid_elements:
        gaps = torch.cat([log_p(b, i) - log_p(act(g, b), i) for i, b in enumerate(x.split(batch_size))])
        out[str(g)] = _mean_and_error(gaps)
        absolute.append(gaps.abs().mean())
        total = total + gaps
    out["|gap|"] = (float(torch.stack(absolute).mean()), 0.0)
    # averaged per entry first, so that its error counts the elements' correlation
    out["mean"] = _mean_and_error(total / len(group.grid_elements))
    return out
