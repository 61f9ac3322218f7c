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
TASKS = {"image": (ImageTask, ("train", "eval", "sample")), "lattice": (LatticeTask, ("train", "eval"))}


def _check(cfg) -> None:
    if cfg.data.domain not in TASKS:
        raise ValueError(f"unknown data domain {cfg.data.domain!r}: expected one of {sorted(TASKS)}")
    modes = TASKS[cfg.data.domain][1]
    if cfg.mode not in modes:
        raise ValueError(f"unknown mode {cfg.mode!r} for data={cfg.data.name}: expected one of {modes}")
    if cfg.flow.domain != cfg.data.domain:
        other = "data=phi4" if cfg.flow.domain == "lattice" else "data=cifar10"
        prefix = "lattice_" if cfg.data.domain == "lattice" else ""
        raise ValueError(
            f"flow={cfg.flow.name} is a{'n' if cfg.flow.domain == 'image' else ''} {cfg.flow.domain} flow and "
            f"data={cfg.data.name} needs a{'n' if cfg.data.domain == 'image' else ''} {cfg.data.domain} flow: "
            f"use {other} with it, or a {cfg.data.domain} flow with data={cfg.data.name} "
            f"(flow={prefix}coupling, {prefix}g_coupling, {prefix}residual, {prefix}g_residual"
            + (", realnvp)" if prefix else ", g_iaf, glow_butterfly)"))


def run(cfg) -> dict[str, Any]:
    """Train (``mode=train``), evaluate (``eval``) or sample (``sample``, images) as ``cfg`` says."""
    _check(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    task = TASKS[cfg.data.domain][0](cfg)  # builds the model: every flow and group setting checked
    if cfg.mode == "train":
        return Engine(task, cfg).fit()
    model = load_trained(task, cfg.run_dir)
    return task.evaluate(model) if cfg.mode == "eval" else task.sample(model)
