"""Builders of image flows from a few settings."""

from __future__ import annotations

from collections.abc import Sequence

from gflows.flow import Compose, Flow, Transform
from gflows.groups import Group
from gflows.transforms.elementwise import ActNorm
from gflows.transforms.residual import GResidualBlock

__all__ = ["g_residual_flow"]


def g_residual_flow(
    group: str | Group,
    event_shape: Sequence[int],
    n_blocks: int = 4,
    hidden_fields: int = 8,
    actnorm: bool = True,
    **block_kwargs,
) -> Flow:
    """A single-scale G-residual flow: ``n_blocks`` x (G-residual block, ActNorm).

    Every layer commutes with the grid-exact elements of ``group`` acting on the pixels, and the
    standard-normal base is invariant, so ``log_prob`` is G-invariant.

    Args:
        group: symmetry group, e.g. ``'d4'``; ``'trivial'`` gives the ordinary residual flow.
        event_shape: ``(C, H, W)``.
        n_blocks: number of residual blocks.
        hidden_fields: regular fields per hidden layer of each block.
        actnorm: put an ActNorm after each block.
        **block_kwargs: options of :class:`~gflows.transforms.residual.GResidualBlock`.
    """
    layers: list[Transform] = []
    for _ in range(n_blocks):
        layers.append(GResidualBlock(group, event_shape, hidden_fields, **block_kwargs))
        if actnorm:
            layers.append(ActNorm(event_shape))
    return Flow(Compose(layers))
