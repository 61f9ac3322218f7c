r"""Transfer a trained lattice sampler to another lattice size.

The couplings' conditioners are circular convolutions and the site splines act on every site alike,
so their parameters do not depend on ``L``: a flow trained on an ``L x L`` lattice defines a flow on
any even ``L' x L'`` lattice with the same weights (the same local map, applied on the larger
torus). What does depend on ``L``:

* :class:`~gflows.transforms.fourier.MomentumScale` has one scale per D4 orbit of the ``L x L``
  momenta :math:`p = 2\pi k / L`. The new lattice's orbit takes the scale of the source orbit
  nearest in physical momentum (folded to :math:`[0, \pi]` and sorted): exact on the momenta both
  lattices share (all of the source's when ``L'`` is a multiple of ``L``), nearest-neighbour
  between them;
* buffers that describe the grid (checkerboard masks, spectral-norm power-iteration vectors) are
  the new model's own; a Lipschitz layer's norm estimate is refreshed at its first call;
* a field-mean spline (``zero_mode_bins``) acts on the mean, whose spread shrinks like ``1 / L``: it
  is carried over as it is, as a starting point only.

A parameter whose shape differs for another reason (another architecture) is refused by name.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gflows.transforms.fourier import MomentumScale, momentum_orbits

__all__ = ["orbit_momenta", "transfer_lattice_state"]


def orbit_momenta(L: int) -> Tensor:
    """``[n_orbits, 2]``: the physical momenta ``(lo, hi)`` (folded to ``[0, pi]``, sorted) of each
    D4 orbit of :func:`~gflows.transforms.fourier.momentum_orbits` on an ``L x L`` lattice."""
    orbits = momentum_orbits(L)
    k = torch.arange(L)
    folded = torch.minimum(k, L - k).double() * 2 * math.pi / L
    a, b = torch.meshgrid(folded, folded, indexing="ij")
    pairs = torch.stack([torch.minimum(a, b), torch.maximum(a, b)], -1).view(-1, 2)
    out = torch.empty(int(orbits.max()) + 1, 2, dtype=torch.float64)
    out[orbits.view(-1)] = pairs
    return out


def _momentum_scales(source: Tensor, L_source: int, L: int) -> Tensor:
    """Scales on ``L``'s orbits from scales on ``L_source``'s, by the nearest physical momentum."""
    dist = torch.cdist(orbit_momenta(L), orbit_momenta(L_source))
    return source[dist.argmin(1)].to(source.dtype)


def transfer_lattice_state(model: nn.Module, state: dict[str, Tensor], L_source: int, L: int) -> list[str]:
    """Load the weights ``state`` of a sampler trained on ``L_source x L_source`` into ``model``, built
    for ``L x L`` (see the module docstring). Returns what was not copied as it is.

    Raises:
        ValueError: odd lattice sizes (the checkerboard's parity would not survive translations), or
            parameters of another architecture (missing, unexpected or of other shapes).
    """
    if L % 2 or L_source % 2:
        raise ValueError(f"transfer needs even lattices (checkerboard parity), got L={L_source} -> {L}")
    own = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    scales = {f"{name}.log_scale" for name, m in model.named_modules() if isinstance(m, MomentumScale)}
    missing = sorted((params & set(own)) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in params - scales if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"the source checkpoint holds another architecture: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, other shapes {shapes[:4]}")
    # a module with a buffer of the grid (mask, power-iteration vectors) keeps all its buffers, so
    # that a spectral-norm estimate starts afresh with its new vectors
    fresh = {k.rsplit(".", 1)[0] for k in set(state) - params - scales if own[k].shape != state[k].shape}
    new, notes = dict(own), []
    for k, v in state.items():
        if k in scales:
            new[k] = _momentum_scales(v, L_source, L)
            notes.append(f"{k}: {len(v)} momentum-orbit scales of L={L_source} -> {len(new[k])} of L={L}")
        elif k in params or k.rsplit(".", 1)[0] not in fresh:
            new[k] = v
        elif own[k].shape != v.shape:
            notes.append(f"{k}: {tuple(v.shape)} -> {tuple(own[k].shape)} (the new lattice's)")
    model.load_state_dict(new)
    return notes
