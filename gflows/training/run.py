"""``train.py``'s one entry point: the task of ``cfg.data``, then train, evaluate or sample."""

from __future__ import annotations

import random
from typing import Any

import torch

from gflows.training.engine import Engine, load_trained
from gflows.training.images import ImageTask
from gflows.training.lattice import LatticeTask

__all__ = ["TASKS", "run"]

#: data domain -> (task, modes it offers)
TASKS = {"image": (ImageTask, ("train", "eval", "sample", "symmetry")),
         "lattice": (LatticeTask, ("train", "eval"))}


#: the flow configs (``configs/flow``) of each domain, for the messages (tests check they exist)
FLOWS = {"image": ("g_residual", "residual", "g_coupling", "coupling", "g_iaf", "glow_butterfly"),
         "lattice": ("lattice_coupling", "lattice_g_coupling", "lattice_residual", "lattice_g_residual",
                     "realnvp")}
DATA = {"image": "data=cifar10", "lattice": "data=phi4"}


def _check(cfg) -> None:
    if cfg.data.domain not in TASKS:
        raise ValueError(f"unknown data domain {cfg.data.domain!r}: expected one of {sorted(TASKS)}")
    modes = TASKS[cfg.data.domain][1]
    if cfg.mode not in modes:
        raise ValueError(f"unknown mode {cfg.mode!r} for data={cfg.data.name}: expected one of {modes}")
    flow, data = cfg.flow.domain, cfg.data.domain
    if flow != data:
        choices = ", ".join(f"flow={f}" for f in FLOWS[data])
        raise ValueError(f"flow={cfg.flow.name} is a{'n' * (flow == 'image')} {flow} flow and "
                         f"data={cfg.data.name} needs a{'n' * (data == 'image')} {data} flow: use "
                         f"{DATA[flow]} with flow={cfg.flow.name}, or one of {choices} with "
                         f"data={cfg.data.name}")


def run(cfg) -> dict[str, Any]:
    """Train (``mode=train``), evaluate (``eval``), sample (``sample``, images) or measure symmetry
    (``symmetry``, images) as ``cfg`` says."""
    _check(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    task = TASKS[cfg.data.domain][0](cfg)  # builds the model: every flow and group setting checked
    if cfg.mode == "train":
        return Engine(task, cfg).fit()
    model = load_trained(task, cfg.run_dir)
    return getattr(task, {"eval": "evaluate"}.get(cfg.mode, cfg.mode))(model)
