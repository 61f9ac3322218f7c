"""Equivariant maps and Lipschitz constraints."""

from gflows.nn.equivariant import GConv2d, GConvNet, LipSwish
from gflows.nn.lipschitz import LipschitzGConv2d, LipschitzLinear, operator_norm, update_lipschitz
from gflows.nn.squeezed import AtFineGrid, squeezed_net

__all__ = [
    "AtFineGrid",
    "GConv2d",
    "GConvNet",
    "LipSwish",
    "LipschitzGConv2d",
    "LipschitzLinear",
    "operator_norm",
    "squeezed_net",
    "update_lipschitz",
]
