"""Model builders."""

from gflows.models.image import g_residual_flow

__all__ = ["g_residual_flow"]
