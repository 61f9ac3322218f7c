"""The residual step's code before the changes of 2026-12-07 (afternoon), for A/B timing in one
process: ``bench_step_ab.py --a-before power,tanh,rows,adjoint`` runs model A's blocks with these
patched back in (``before(names)``), model B's with the library as it is.

* ``power``: quick Lipschitz refreshes ran a full iteration of ``W^T W`` from the stored ``u``
  (two applications of the map per layer, then the differentiable ``sigma``'s third);
* ``tanh``: ``torch.tanh`` for every tensor;
* ``rows``: the probed entries of a sparse Hutchinson probe as ``randperm`` (gathers);
* ``adjoint``: the adjoint filter as a flip of the transposed view, made contiguous.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import gflows.nn.equivariant as equivariant
import gflows.nn.lipschitz as lipschitz
import gflows.transforms.residual as residual

__all__ = ["CHANGES", "before"]


_library_update = lipschitz.SpectralNormalised.update


@torch.no_grad()
def _update(self, weight=None, certify=None, final=True) -> None:
    """The refresh before, in cost: a quick one ran a full iteration of ``W^T W`` from the stored
    ``u``. Here ``v = W u / |W u|`` first (the application of the map the new refresh saves), after
    which the library's half iteration ``u <- W^T v`` is that iteration's second half (its noise
    then comes after the iteration instead of before)."""
    w = (self._raw()[0] if weight is None else weight).detach()
    if bool(self.initialised):
        wu = self._linear_map(self.u.to(w.dtype), w)
        self.v.copy_(wu / wu.norm().clamp_min(1e-12))
    _library_update(self, weight, certify, final)


def _probed_rows(self, x, jac):
    if self.probe_fraction >= 1 or not self.training or jac is None or jac.rows is None:
        return None
    b = x.shape[0]
    m = max(1, round(self.probe_fraction * b))
    return None if m >= b else torch.randperm(b, device=x.device)[:m].sort().values


def _adjoint(self, weight):
    adjoint_filter = weight.transpose(0, 1).flip(2, 3).contiguous()
    return lambda v: self.conv(v, adjoint_filter)


#: name -> (owner, attribute, the code before)
CHANGES = {
    "power": (lipschitz.SpectralNormalised, "update", _update),
    "tanh": (equivariant, "tanh", torch.tanh),
    "rows": (residual.ResidualTransform, "_probed_rows", _probed_rows),
    "adjoint": (equivariant.GConv2d, "adjoint", _adjoint),
}


@contextlib.contextmanager
def before(names: list[str]) -> Iterator[None]:
    """The library with the changes ``names`` undone while the context is open."""
    unknown = sorted(set(names) - set(CHANGES))
    if unknown:
        raise SystemExit(f"unknown change(s) {unknown}: expected some of {sorted(CHANGES)}")
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in (CHANGES[n] for n in names)]
    try:
        for name in names:
            owner, attr, old = CHANGES[name]
            setattr(owner, attr, old)
        yield
    finally:
        for owner, attr, new in saved:
            setattr(owner, attr, new)
