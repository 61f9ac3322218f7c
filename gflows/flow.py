r"""The transform contract, compositions and flows.

Every gflows layer is a :class:`Transform`: an ``nn.Module`` mapping data to noise (the nflows
convention) with

* ``forward(x, context=None) -> (z, logabsdet)``, ``logabsdet = log|det dz/dx|`` of shape ``[batch]``;
* ``inverse(z, context=None) -> (x, logabsdet)``, ``logabsdet = log|det dx/dz|`` of shape ``[batch]``;
* ``inverse_and_score(z, score) -> (x, logabsdet, score_x)``: the inverse, and the score of the
  pushed-forward density, ``score_x = grad_x log q_x(x)`` from ``score = grad_z log q_z(z)`` with the
  parameters held fixed (for path gradients; see :meth:`Transform.inverse_and_score`).

A :class:`Flow` pairs a transform with a base distribution on the noise side:
:math:`\log p(x) = \log p_Z(f(x)) + \log|\det J_f(x)|`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from gflows._checks import check_event, is_count

__all__ = ["Compiled", "Compose", "Flow", "Inverse", "StandardNormal", "Transform"]


class Transform(nn.Module):
    """Base class of invertible layers (data -> noise).

    Subclasses set ``event_shape`` (the shape of one sample) and implement :meth:`forward` and
    :meth:`inverse`, each returning the output and ``log|det J|`` of shape ``[batch]``.
    """

    event_shape: tuple[int, ...]
    #: validate inputs (off in :func:`gflows.export.export`'s copies, for ``torch.export``)
    checks: bool = True

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Event shape of the output (the noise side); the input's unless the layer reshapes."""
        return tuple(self.event_shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def check(self, x: Tensor, what: str = "input") -> None:
        """Validate ``x`` against this layer's event shape (see :func:`gflows._checks.check_event`)."""
        if self.checks:
            check_event(x, self.event_shape, f"{type(self).__name__} {what}")

    def inverse_and_score(self, z: Tensor, score: Tensor,
                          context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        r"""The inverse ``x = f^{-1}(z)`` with its log-det, and the score of the density of ``x``.

        If ``z`` has density :math:`q_z` with score ``score`` :math:`= \nabla_z \log q_z(z)`, then
        :math:`\log q_x(x) = \log q_z(f(x)) + \log|\det J_f(x)|`, so

        .. math:: \nabla_x \log q_x(x) = J_f(x)^T \nabla_z \log q_z(z) + \nabla_x \log|\det J_f(x)|,

        one vector-Jacobian product of ``f`` at ``x`` with the parameters held fixed (the score is
        detached). Chained through a flow from the base to the samples this is the forward recursion
        of Vaitl et al. 2024 ("Fast and unified path gradient estimators for normalizing flows",
        arXiv 2403.15881): the path gradient's :math:`\nabla_x \log q(x)` without a second pass
        through the whole flow. This generic version evaluates ``f`` at ``x`` once more; layers
        whose inverse already computed what the product needs (couplings) override it.
        """
        x, ladj = self.inverse(z, context)
        return x, ladj, self.pullback_score(x, score, context)

    def pullback_score(self, x: Tensor, score: Tensor, context: Tensor | None = None) -> Tensor:
        r""":math:`J_f(x)^T s + \nabla_x \log|\det J_f(x)|` for a detached ``s = score``, by autograd
        with the parameters held fixed (``autograd.grad`` leaves their ``.grad`` untouched)."""
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            z, ladj = self(xd, context)
            (g,) = torch.autograd.grad((z * score.detach()).sum() + ladj.sum(), xd)
        return g


class Compose(Transform):
    """Chain of transforms applied left to right; log-dets add up.

    Args:
        transforms: the layers, first applied first in the data -> noise direction. Each layer's
            output event shape must be the next layer's input event shape.
    """

    def __init__(self, *transforms: Transform | Iterable[Transform]):
        super().__init__()
        flat: list[Transform] = []
        for t in transforms:
            flat.extend(t if not isinstance(t, nn.Module) else [t])
        if not flat:
            raise ValueError("Compose needs at least one transform")
        self.transforms = nn.ModuleList(flat)
        self.event_shape = tuple(flat[0].event_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.transforms[-1].out_shape

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ladj = t(x, context)
            total = total + ladj
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ladj = t.inverse(z, context)
            total = total + ladj
        return z, total

    def inverse_and_score(self, z: Tensor, score: Tensor,
                          context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        total = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ladj, score = t.inverse_and_score(z, score, context)
            total = total + ladj
        return z, total, score


class Inverse(Transform):
    """The inverse of a transform: swaps ``forward`` and ``inverse``."""

    def __init__(self, transform: Transform, event_shape: Sequence[int] | None = None):
        super().__init__()
        self.transform = transform
        self.event_shape = tuple(event_shape if event_shape is not None else transform.out_shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.transform.event_shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.transform(z, context)


class Compiled(Transform):
    """A transform whose ``forward`` and ``inverse`` run through ``torch.compile``.

    Same map, inverse and log-det as ``transform`` (whose parameters it shares, so train the
    wrapped module and checkpoint the original). Flows of many small layers (lattice samplers) are
    bound by Python and dispatch overhead, which compilation removes; the first call of each
    direction compiles (minutes when the inductor cache is cold). Inputs are checked here (shape,
    dtype, finiteness); the inner layers skip their finiteness checks when compiled.
    ``Flow(Compiled(flow.transform), flow.base)`` keeps the base distribution, and so the random
    stream of sampling, in eager mode.
    """

    def __init__(self, transform: Transform, **compile_kwargs):
        super().__init__()
        self.transform = transform
        self.event_shape = tuple(transform.event_shape)
        self.compile_kwargs = dict(compile_kwargs)
        self._compile()

    def _compile(self) -> None:
        self._forward = torch.compile(self.transform.forward, **self.compile_kwargs)
        self._inverse = torch.compile(self.transform.inverse, **self.compile_kwargs)

    # Compiled callables do not pickle: a copy compiles again (lazily, at its first call).
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        del state["_forward"], state["_inverse"]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._compile()

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.transform.out_shape

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check(x)
        return self._forward(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.checks:
            check_event(z, self.out_shape, f"{type(self).__name__} inverse input")
        return self._inverse(z, context)


class StandardNormal(nn.Module):
    """Standard normal distribution on an event of any shape.

    It is invariant under every orthogonal action, in particular every permutation of pixels
    and the sign flip, so a flow with an equivariant transform has an invariant density.
    """

    checks: bool = True

    def __init__(self, event_shape: Sequence[int]):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        self.register_buffer("_dummy", torch.zeros(()), persistent=False)
        self._dim = math.prod(self.event_shape)

    def log_prob(self, z: Tensor) -> Tensor:
        if self.checks:
            check_event(z, self.event_shape, "StandardNormal input")
        sq = z.reshape(z.shape[0], -1).pow(2).sum(1)
        return -0.5 * sq - 0.5 * self._dim * math.log(2 * math.pi)

    def score(self, z: Tensor) -> Tensor:
        r""":math:`\nabla_z \log p(z) = -z`."""
        return -z.detach()

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        return temperature * torch.randn(
            n, *self.event_shape, device=self._dummy.device, dtype=self._dummy.dtype
        )


def _check_count(n: object) -> None:
    if not is_count(n, 1):
        raise ValueError(f"the number of samples must be a whole number >= 1, got {n!r}")


def _check_dtype(flow: nn.Module, x: Tensor) -> None:
    # torch would name only the first layer's mismatch ("Input type (double) and bias type (float)")
    p = next(flow.parameters(), None)
    if p is not None and p.is_floating_point() and x.is_floating_point() and x.dtype != p.dtype:
        raise TypeError(f"the input is {x.dtype} but the flow's parameters are {p.dtype}: convert one "
                        f"(x.to({p.dtype}) or flow.to({x.dtype}))")


class Flow(nn.Module):
    r"""A normalizing flow :math:`x = f^{-1}(z)`, :math:`z \sim` base.

    Args:
        transform: data -> noise transform.
        base: distribution of the noise, with ``log_prob(z)`` and ``sample(n)``; defaults to
            :class:`StandardNormal` on ``transform.out_shape``.
    """

    def __init__(self, transform: Transform, base: nn.Module | None = None):
        super().__init__()
        self.transform = transform
        self.base = base if base is not None else StandardNormal(transform.out_shape)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density of ``x``, shape ``[batch]``."""
        _check_dtype(self, x)
        z, ladj = self.transform(x, context)
        return self.base.log_prob(z) + ladj

    @property
    def device(self) -> torch.device:
        """Where the flow's parameters (and its base's buffers) live."""
        return next(t for t in (*self.base.buffers(), *self.parameters())).device

    @property
    def dtype(self) -> torch.dtype:
        """The flow's floating-point type (that of its first floating parameter or base buffer)."""
        tensors = [*self.parameters(), *self.base.buffers()]
        return next(t.dtype for t in tensors if t.is_floating_point())

    def push(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map base noise ``z`` to samples ``x = f^{-1}(z)``, with their log-densities."""
        x, ladj = self.transform.inverse(z, context)
        # log q(x) = log p(z) + log|det dz/dx| = log p(z) - log|det dx/dz|.
        return x, self.base.log_prob(z) - ladj

    def push_and_score(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        r"""Samples ``x = f^{-1}(z)``, their log-densities and scores :math:`\nabla_x \log q(x)`
        (detached: the parameters held fixed), in one pass through the inverse
        (:meth:`Transform.inverse_and_score`): what path gradients need."""
        if hasattr(self.base, "score"):
            score = self.base.score(z)
        else:
            with torch.enable_grad():
                zd = z.detach().requires_grad_(True)
                (score,) = torch.autograd.grad(self.base.log_prob(zd).sum(), zd)
        x, ladj, score = self.transform.inverse_and_score(z, score, context)
        return x, self.base.log_prob(z) - ladj, score.detach()

    def sample(self, n: int, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """Draw ``n`` samples; ``temperature`` scales the base noise (below 1: typical samples, as
        Glow shows them)."""
        _check_count(n)
        x, _ = self.transform.inverse(self.base.sample(n, temperature), context)
        return x

    def sample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples and their log-densities in one pass through the inverse."""
        _check_count(n)
        return self.push(self.base.sample(n), context)
