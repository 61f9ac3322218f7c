"""CIFAR-10 loading: the official layout read directly or through torchvision, and the message
that says where the files go."""

from pathlib import Path

import pytest
import torch

from gflows.data.cifar10 import load_cifar10

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
needs_data = pytest.mark.skipif(
    not (SUBSET / "cifar-10-batches-py" / "data_batch_1").exists(),
    reason=f"CIFAR-10 subset not found at {SUBSET} (../shared beside the repository)",
)


@pytest.mark.parametrize("verify", [True, False])
def test_missing_files_say_where_to_put_them(tmp_path, verify):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path / "nothing", "train", verify=verify, download=False)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_cifar10(tmp_path, "valid")


@needs_data
def test_subset_reads_in_the_official_layout():
    x, y = load_cifar10(SUBSET, "test", verify=False)
    assert x.shape == (1017, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (1017,)
    assert set(y.tolist()) == set(range(10))  # every class
    x2, _ = load_cifar10(SUBSET / "cifar-10-batches-py", "test", verify=False)  # the folder itself
    assert torch.equal(x, x2)
