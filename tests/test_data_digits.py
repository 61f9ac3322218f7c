"""The bundled 8x8 digits, made exactly D4-invariant."""

import pytest
import torch

from gflows.data.digits import LEVELS, load_digits
from gflows.groups import Group


def test_splits_levels_and_the_random_elements():
    train, test = load_digits("train"), load_digits("test")
    assert train[0].shape == (1500, 1, 8, 8) and test[0].shape == (297, 1, 8, 8)
    assert train[0].dtype == torch.uint8 and int(train[0].max()) == LEVELS - 1
    plain, _ = load_digits("train", group=None)
    d4 = Group("d4")
    # every image is one of the eight images of its original, and not always the identity
    moved = [next(i for i, g in enumerate(d4.grid_elements) if torch.equal(d4.act(g, p), x))
             for p, x in zip(plain[:100], train[0][:100], strict=True)]
    assert len(set(moved)) == 8
    assert torch.equal(load_digits("train")[0], train[0])  # seeded: the same split every time
    with pytest.raises(ValueError, match="unknown split"):
        load_digits("valid")
    with pytest.raises(ValueError, match="test_size"):
        load_digits("test", test_size=0)
