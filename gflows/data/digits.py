"""scikit-learn's bundled 8x8 digits (1,797 images, 17 grey levels), made exactly D4-invariant.

Each image is moved once by a uniformly random element of ``group`` (seeded, so the split is the
same on every machine and run): the data distribution is then exactly invariant under the group,
a task whose symmetry is known, with no download. Split into the first ``n - test_size`` images for
training and the last ``test_size`` for testing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gflows.groups import Group, get_group

__all__ = ["LEVELS", "load_digits"]

LEVELS = 17  # grey levels 0..16


def load_digits(split: str = "train", group: str | Group | None = "d4", test_size: int = 297,
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """Images ``[N, 1, 8, 8]`` (integers ``0..16`` as uint8) and labels ``[N]`` of a split.

    Args:
        split: ``'train'`` or ``'test'``.
        group: every image moved by a random grid-exact element of this group (``None``: as they are).
        test_size: images in the test split (the last ones).
        seed: of the random elements.

    >>> x, y = load_digits("test")
    >>> tuple(x.shape), int(x.max())
    ((297, 1, 8, 8), 16)
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'test'")
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images).to(torch.uint8)[:, None]
    y = torch.from_numpy(d.target)
    if not 0 < test_size < len(x):
        raise ValueError(f"test_size must lie in (0, {len(x)}), got {test_size}")
    if group is not None:
        x = get_group(group).random_act(x, torch.Generator().manual_seed(seed))
    cut = len(x) - test_size
    return (x[:cut], y[:cut]) if split == "train" else (x[cut:], y[cut:])
