"""Model builders: from plain arguments (:mod:`.image`, :mod:`.lattice`) or from a config (:mod:`.config`)."""

from gflows.models.config import DOMAINS, LATTICE_KINDS, image_model_from_config, lattice_model_from_config
from gflows.models.image import FLOW_KINDS, g_residual_flow, image_flow, image_model
from gflows.models.lattice import LatticeSymmetrised, lattice_flow, realnvp_baseline, residual_lattice_flow

__all__ = ["DOMAINS", "FLOW_KINDS", "LATTICE_KINDS", "LatticeSymmetrised", "g_residual_flow", "image_flow",
           "image_model", "image_model_from_config", "lattice_flow", "lattice_model_from_config",
           "realnvp_baseline", "residual_lattice_flow"]
