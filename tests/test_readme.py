"""The README's Python examples run as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)
    assert ns["log_p"].shape == (8,) and torch.isfinite(ns["log_p"]).all()
    assert ns["samples"].shape == (4, 3, 32, 32)
    assert torch.isfinite(ns["log_p_exact"]).all()
