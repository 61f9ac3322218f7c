"""Data sets."""

from gflows.data.cifar10 import load_cifar10
from gflows.data.digits import load_digits

__all__ = ["load_cifar10", "load_digits"]
