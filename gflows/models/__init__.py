"""Model builders."""

from gflows.models.image import FLOW_KINDS, g_residual_flow, image_flow, image_model

__all__ = ["FLOW_KINDS", "g_residual_flow", "image_flow", "image_model"]
