"""CIFAR-10 as uint8 image tensors.

With ``verify=True`` the official archive is read (and downloaded if allowed) through torchvision,
whose md5 integrity check must pass. With ``verify=False`` the official python layout
(``cifar-10-batches-py/data_batch_1..5``, ``test_batch``) is read directly from ``root`` without
that check, for example a subset of the official files.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_cifar10"]

FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _folder(root: Path) -> Path:
    return root if root.name == FOLDER else root / FOLDER


def load_cifar10(root: str | Path, split: str = "train", verify: bool = True,
                 download: bool = False) -> tuple[Tensor, Tensor]:
    """Images ``[N, 3, 32, 32]`` (uint8) and labels ``[N]`` of a CIFAR-10 split.

    Args:
        root: folder holding (or to receive) ``cifar-10-batches-py``, or that folder itself.
        split: ``'train'`` or ``'test'``.
        verify: read through torchvision with its md5 check (``False``: read the layout directly).
        download: with ``verify``, download the official archive when it is missing.

    Raises:
        ValueError: unknown split.
        FileNotFoundError: the files are missing (the message says where to put them).
    """
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'test'")
    root = Path(root).expanduser()
    if verify:
        from torchvision.datasets import CIFAR10

        base = root.parent if root.name == FOLDER else root
        try:
            ds = CIFAR10(str(base), train=split == "train", download=download)
        except (RuntimeError, OSError) as e:  # missing or corrupt files; a failed download (no internet)
            what = (f"the download failed ({type(e).__name__}: {e})" if download
                    else "the files are missing or corrupt (data.download=false)")
            raise FileNotFoundError(
                f"CIFAR-10 is not under data.root={base}: {what}. Put the official archive "
                f"'{ARCHIVE}' (or its extracted '{FOLDER}' folder with data_batch_1..5 and test_batch) "
                f"in that folder, or point data.root at a copy; a copy whose md5 check cannot pass "
                f"(a subset) reads with data.verify=false"
            ) from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets)
    folder = _folder(root)
    missing = [f for f in FILES[split] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 files {missing} missing in {folder}: put the official python-layout "
            f"'{FOLDER}' folder there (or set data.verify=true data.download=true to download it)"
        )
    data, labels = [], []
    for f in FILES[split]:
        with open(folder / f, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        data.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(d["labels"])
    return torch.from_numpy(np.concatenate(data)), torch.tensor(labels)
