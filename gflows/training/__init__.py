"""Training: loop, checkpoints, logging."""

from gflows.training.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["load_checkpoint", "save_checkpoint"]
