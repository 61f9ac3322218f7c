"""Equivariant maps and Lipschitz constraints."""

from gflows.nn.equivariant import GConv2d, GConvNet, LipSwish, field_type
from gflows.nn.lipschitz import LipschitzGConv2d, LipschitzLinear, operator_norm, update_lipschitz

__all__ = [
    "GConv2d",
    "GConvNet",
    "LipSwish",
    "LipschitzGConv2d",
    "LipschitzLinear",
    "field_type",
    "operator_norm",
    "update_lipschitz",
]
