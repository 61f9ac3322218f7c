"""Invertible layers, one family a module."""

from gflows.transforms.autoregressive import GIAF
from gflows.transforms.butterfly import Butterfly
from gflows.transforms.coupling import GCoupling
from gflows.transforms.dequantization import VariationalDequantize
from gflows.transforms.elementwise import ActNorm, Dequantize, Logit
from gflows.transforms.fourier import MomentumScale
from gflows.transforms.invconv import GInvConv1x1
from gflows.transforms.reshape import FactorOut, HalvingSqueeze, Squeeze
from gflows.transforms.residual import (
    ConvergenceError,
    GResidualBlock,
    ResidualTransform,
    logdet_mode,
)

__all__ = [
    "ActNorm",
    "Butterfly",
    "GCoupling",
    "GIAF",
    "GInvConv1x1",
    "ConvergenceError",
    "Dequantize",
    "FactorOut",
    "HalvingSqueeze",
    "GResidualBlock",
    "Logit",
    "MomentumScale",
    "ResidualTransform",
    "Squeeze",
    "VariationalDequantize",
    "logdet_mode",
]
