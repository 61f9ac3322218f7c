r"""Scalar :math:`\phi^4` theory on a periodic two-dimensional lattice.

Action (Albergo, Kanwar and Shanahan 2019; the 2021 review, arXiv:2101.08176):

.. math:: S(\phi) = \sum_x \Big[\sum_{\mu} (\phi_{x+\mu} - \phi_x)^2 + m^2 \phi_x^2 + \lambda \phi_x^4\Big],

periodic boundaries, target :math:`p(\phi) \propto e^{-S(\phi)}`. With :math:`\phi = \sqrt{\kappa}\,\psi` it
is the hopping form
:math:`\sum_x [-2\kappa \sum_\mu \psi_x \psi_{x+\mu} + (1 - 2\lambda_h)\psi_x^2 + \lambda_h \psi_x^4]` with
:math:`\lambda_h = \lambda \kappa^2` and :math:`2\lambda\kappa^2 + (4 + m^2)\kappa - 1 = 0`.

Symmetries: lattice translations, the rotations and reflections of the square lattice (D4) and
:math:`\phi \to -\phi`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PRESETS", "Phi4", "from_hopping", "to_hopping"]


def to_hopping(m2: float, lam: float) -> tuple[float, float]:
    """``(kappa, lambda_h)`` of the hopping form for ``(m2, lam)``."""
    if lam <= 0:
        raise ValueError(f"lam must be > 0 for an action bounded below, got {lam}")
    b = 4 + m2
    kappa = (-b + math.sqrt(b * b + 8 * lam)) / (4 * lam)
    return kappa, lam * kappa**2


def from_hopping(kappa: float, lam_h: float) -> tuple[float, float]:
    """``(m2, lam)`` for the hopping parameters ``(kappa, lambda_h)``."""
    if kappa <= 0 or lam_h <= 0:
        raise ValueError(f"kappa and lambda_h must be > 0, got {kappa}, {lam_h}")
    return (1 - 2 * lam_h) / kappa - 4, lam_h / kappa**2


def _setting(name: str, value: object, kind: type = float) -> int | float:
    """``value`` as a number of ``kind`` (``int``: a whole one), or a ``ValueError`` naming the setting."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (kind is int and number != int(number)):
        raise ValueError(f"{name}={value!r}: expected a {'whole ' if kind is int else ''}number")
    return kind(number)


@dataclass(frozen=True)
class Phi4:
    """The lattice theory: size ``L`` (``L x L`` sites), ``m2`` and ``lam``."""

    L: int
    m2: float
    lam: float

    def __post_init__(self) -> None:
        if int(self.L) != self.L or self.L < 2:
            raise ValueError(f"the lattice size L must be an integer >= 2, got {self.L}")
        if not (self.lam > 0 or (self.lam == 0 and self.m2 > 0)):
            raise ValueError(f"lam must be > 0 (or 0 with m2 > 0, the free field), else the action is "
                             f"unbounded below; got lam={self.lam}, m2={self.m2}")

    @classmethod
    def preset(cls, name: str) -> Phi4:
        if name not in PRESETS:
            raise ValueError(f"unknown phi4 preset {name!r}: expected one of {sorted(PRESETS)}")
        return cls(*PRESETS[name])

    @classmethod
    def hopping(cls, L: int, kappa: float, lam_h: float) -> Phi4:
        return cls(L, *from_hopping(kappa, lam_h))

    @classmethod
    def from_settings(cls, preset: str | None = None, L: int | None = None, m2: float | None = None,
                      lam: float | None = None, kappa: float | None = None,
                      lambda_h: float | None = None) -> Phi4:
        """A ``preset`` (or none), with ``L`` and either ``(m2, lam)`` or the hopping parameters
        ``(kappa, lambda_h)`` overriding it where they are given.

        >>> Phi4.from_settings("E2", L=6)
        Phi4(L=6, m2=-4.0, lam=6.008)
        """
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown phi4 preset {preset!r}: expected one of {sorted(PRESETS)}")
        base = PRESETS[preset] if preset is not None else (None, None, None)
        L = L if L is not None else base[0]
        if kappa is not None or lambda_h is not None:
            if m2 is not None or lam is not None:
                raise ValueError("give either m2/lam or kappa/lambda_h, not both")
            if kappa is None or lambda_h is None or L is None:
                raise ValueError("the hopping form needs kappa, lambda_h and L (or a preset)")
            return cls.hopping(_setting("L", L, int), _setting("kappa", kappa),
                               _setting("lambda_h", lambda_h))
        m2 = m2 if m2 is not None else base[1]
        lam = lam if lam is not None else base[2]
        if L is None or m2 is None or lam is None:
            raise ValueError("no preset: give L with m2 and lam (or kappa and lambda_h)")
        return cls(_setting("L", L, int), _setting("m2", m2), _setting("lam", lam))

    @property
    def hopping_parameters(self) -> tuple[float, float]:
        """``(kappa, lambda_h)`` of the hopping form."""
        return to_hopping(self.m2, self.lam)

    @property
    def volume(self) -> int:
        return self.L * self.L

    def gaussian_log_z(self) -> float:
        r"""Exact :math:`\log Z` of the free theory (``lam = 0``, ``m2 > 0``): ``S = phi^T A phi`` with
        eigenvalues :math:`m^2 + 4\sin^2(\pi k_1/L) + 4\sin^2(\pi k_2/L)`, so
        :math:`\log Z = \frac{V}{2}\log\pi - \frac12\sum_k \log \lambda_k`.

        >>> round(Phi4(4, 1.0, 0.0).gaussian_log_z(), 6)
        -2.858132
        """
        if self.lam != 0 or not self.m2 > 0:
            raise ValueError(f"log Z is known in closed form only for lam = 0 and m2 > 0 (a bounded "
                             f"Gaussian action), not lam={self.lam}, m2={self.m2}")
        s = torch.sin(math.pi * torch.arange(self.L, dtype=torch.float64) / self.L).pow(2)
        eig = self.m2 + 4 * (s[:, None] + s[None, :])
        return 0.5 * self.volume * math.log(math.pi) - 0.5 * float(eig.log().sum())

    @staticmethod
    def random_symmetry(phi: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Each configuration of ``phi [B, ..., L, L]`` moved by its own uniformly random symmetry
        of the action: a translation, a rotation or reflection of the lattice (D4) and a sign."""
        from gflows.groups import Group

        n, L = len(phi), phi.shape[-1]
        shifts = torch.randint(L, (n, 2), generator=generator)
        signs = torch.randint(2, (n,), generator=generator) * 2 - 1
        out = Group("d4").random_act(phi, generator)
        out = torch.stack([torch.roll(o, (int(a), int(b)), (-2, -1))
                           for o, (a, b) in zip(out, shifts, strict=True)])
        return out * signs.to(phi.dtype).view(-1, *([1] * (phi.dim() - 1)))

    def _check(self, phi: Tensor) -> Tensor:
        if phi.dim() == 4 and phi.shape[1] == 1:
            phi = phi[:, 0]
        if phi.dim() != 3 or tuple(phi.shape[1:]) != (self.L, self.L):
            raise ValueError(f"fields must have shape [batch, {self.L}, {self.L}] (or with a channel of 1), "
                             f"got {tuple(phi.shape)}")
        return phi

    def action(self, phi: Tensor) -> Tensor:
        """``S(phi)`` per configuration, shape ``[batch]``."""
        phi = self._check(phi)
        kinetic = sum((torch.roll(phi, -1, d) - phi).pow(2) for d in (1, 2))
        density = kinetic + self.m2 * phi.pow(2) + self.lam * phi.pow(4)
        return density.flatten(1).sum(1)

    def force(self, phi: Tensor) -> Tensor:
        """``dS/dphi``, for HMC."""
        phi = self._check(phi)
        lap = sum(2 * phi - torch.roll(phi, 1, d) - torch.roll(phi, -1, d) for d in (1, 2))
        return 2 * lap + 2 * self.m2 * phi + 4 * self.lam * phi.pow(3)


# name: (L, m2, lam); m2 = -4 throughout, correlation length near L / 4.
PRESETS: dict[str, tuple[int, float, float]] = {
    "review": (8, -4.0, 8.0),
    "E1": (6, -4.0, 6.975),
    "E2": (8, -4.0, 6.008),
    "E3": (10, -4.0, 5.550),
    "E4": (12, -4.0, 5.276),
    "E5": (14, -4.0, 5.113),
    "L20": (20, -4.0, 4.807),
    "L32": (32, -4.0, 4.572),
    "L64": (64, -4.0, 4.398),
}
