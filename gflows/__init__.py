"""gflows: G-equivariant normalizing flows with exact likelihoods."""

from gflows.equivariance import check_equivariance, density_gaps
from gflows.export import export
from gflows.flow import Compiled, Compose, Flow, Inverse, StandardNormal, Transform
from gflows.groups import Group, GroupElement, get_group
from gflows.models import g_residual_flow
from gflows.nn import update_lipschitz
from gflows.transforms import (
    GIAF,
    ActNorm,
    Butterfly,
    ConvergenceError,
    Dequantize,
    FactorOut,
    GCoupling,
    GInvConv1x1,
    GResidualBlock,
    HalvingSqueeze,
    Logit,
    ResidualTransform,
    Squeeze,
    VariationalDequantize,
    logdet_mode,
)

__all__ = [
    "ActNorm",
    "Butterfly",
    "Compiled",
    "Compose",
    "ConvergenceError",
    "Dequantize",
    "FactorOut",
    "Flow",
    "GCoupling",
    "GIAF",
    "GInvConv1x1",
    "GResidualBlock",
    "Group",
    "GroupElement",
    "HalvingSqueeze",
    "Inverse",
    "Logit",
    "ResidualTransform",
    "Squeeze",
    "StandardNormal",
    "Transform",
    "VariationalDequantize",
    "check_equivariance",
    "density_gaps",
    "export",
    "g_residual_flow",
    "get_group",
    "logdet_mode",
    "update_lipschitz",
]

__version__ = "0.1.0"
