import os
import sys

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per test worker (and per process a test starts): `make test` runs one worker per
    # core, and two multi-threaded processes on the same cores slow each other far more than 2x
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "disabled")

GROUPS = ["trivial", "c4", "d4"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
