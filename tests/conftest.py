import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "disabled")

GROUPS = ["trivial", "c4", "d4"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
