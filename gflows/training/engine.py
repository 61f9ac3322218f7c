"""The one training loop: every objective (maximum likelihood on images, reverse KL on a lattice
action) runs through :class:`Engine`.

The engine owns what does not depend on the objective: the optimiser (Adam), the learning-rate
schedule, gradient clipping, EMA weights, skipping non-finite steps and restoring the last
checkpoint when they persist, atomic checkpoints and exact resume, the time budget, logging (tqdm,
``metrics.jsonl``, wandb) and data parallelism under ``torchrun`` (gradients averaged over the
ranks). An objective says what one step's loss is and what to report at the end (:class:`Objective`).

Settings (``cfg.trainer``; every key is in ``configs/trainer/*.yaml``): ``steps``, ``max_minutes``,
``lr``, ``warmup_steps``, ``schedule``, ``schedule_clock``, ``weight_decay``, ``grad_clip``,
``ema_decay`` (null: no EMA), ``log_every``, ``ckpt_every``, ``max_bad_steps``, ``max_restores``,
``eval_at_end``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from gflows._checks import is_count, is_number
from gflows.nn.equivariant import symmetry_breaking_sq_norm
from gflows.nn.lipschitz import lipschitz_layers
from gflows.training.checkpoint import (
    exists,
    load_latest,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gflows.training.distributed import Dist, setup
from gflows.training.ema import ema_update
from gflows.training.optim import param_groups
from gflows.training.records import log_metrics, open_wandb, truncate_metrics
from gflows.training.schedule import check_schedule, learning_rate

__all__ = ["COUNTS", "DTYPES", "Engine", "Objective", "StepLoss", "check_counts",
           "check_resume_settings", "data_dtype", "load_trained", "out_of_time", "settings_of"]


@dataclass
class StepLoss:
    """One step of an objective.

    Attributes:
        surrogate: this rank's scalar to differentiate (its gradient, averaged over the ranks, is
            the step's gradient).
        loss: the step's loss over the whole global batch, watched for finiteness and logged.
        metrics: further numbers to log (``metrics.jsonl``, wandb as ``train/<key>``).
    """

    surrogate: Tensor
    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Objective(Protocol):
    """What the engine trains. ``model`` is the flow whose weights are checkpointed."""

    model: nn.Module
    #: the loss's name in the logs and progress bar (``loss_bpd``, ``loss``)
    loss_name: str
    #: the progress bar's label
    label: str
    #: the dotted config keys that define the training data (``data.augment``, ``seed``, ...): a
    #: resumed run must share their values with its checkpoint's run, else it would continue that
    #: run on other data without a word
    resume_keys: tuple[str, ...]

    def prepare(self, dd: Dist) -> None:
        """Once before the first step of a fresh run (for example ActNorm's data initialisation)."""

    def loss(self, step: int, dd: Dist) -> StepLoss:
        """The loss of training step ``step`` (0-based); the same ``step`` gives the same batch."""

    def checkpoint_info(self) -> dict[str, Any]:
        """Plain data stored in the checkpoint beside the weights (what the model was trained for)."""

    def check_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        """Raise ``ValueError`` if ``state`` (from ``path``) was trained for something else."""

    def finish(self, model: nn.Module, run_dir: Path, wb) -> dict[str, Any]:
        """Evaluate and report on the trained ``model`` (EMA weights where kept); ``wb`` may log."""


def out_of_time(minutes: float | None, seconds: float) -> bool:
    """Whether a budget of ``minutes`` of wall clock (``None``: no budget) is spent after ``seconds``.
    Under ``trainer.schedule_clock=steps`` the seconds count from the start of this process's loop,
    so a resumed run gets a new budget; under ``time`` they count the whole run's training, resumes
    included, as the schedule anneals over the budget."""
    return minutes is not None and seconds >= 60 * float(minutes)


def settings_of(cfg, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of the dotted ``keys`` of ``cfg`` as plain data (absent keys: ``None``)."""
    values = {k: OmegaConf.select(cfg, k, default=None) for k in keys}
    return {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in values.items()}


def check_resume_settings(saved: dict[str, Any] | None, now: dict[str, Any], path: Path) -> None:
    """Refuse to resume the run of the checkpoint at ``path`` with other training data settings.

    Raises:
        ValueError: naming each setting whose value differs from the checkpoint's run.
    """
    if saved is None:  # checkpoints written before 2026-12-07 kept no settings
        return
    differ = [k for k in now if k in saved and saved[k] != now[k]]
    if differ:
        pairs = ", ".join(f"{k}={_show(saved[k])} (now {_show(now[k])})" for k in differ)
        raise ValueError(f"{path} belongs to a run trained with {pairs}: resume with its settings, or set "
                         "another run_dir (or resume=false to start over there)")


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _with_ema(model: nn.Module, ema: dict[str, Tensor] | None) -> nn.Module:
    if not ema:
        return model
    m = copy.deepcopy(model)
    m.load_state_dict(m.state_dict() | ema)
    return m


def _restore(objective: Objective, path: Path,
             found: tuple[dict[str, Any], Path] | None = None) -> dict[str, Any]:
    """The newest readable checkpoint of ``path`` (``found``: as :func:`load_latest` already read it),
    checked by the objective and loaded into its model."""
    state, used = found if found is not None else load_latest(path)
    objective.check_checkpoint(state, used)
    load_model_state(objective.model, state["model"], used)
    return state


def load_trained(objective: Objective, run_dir: str | Path) -> nn.Module:
    """The objective's model with the weights of ``run_dir``'s newest readable checkpoint (its EMA
    weights where it kept them), for evaluation."""
    path = Path(run_dir) / "checkpoint.pt"
    if not exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train first (mode=train)")
    state = _restore(objective, path)
    return _with_ema(objective.model, state.get("ema"))


#: the dtypes of a run's model and data (``data.dtype``): float16 breaks the exact log-dets and the
#: residual blocks' fixed-point inverse
DTYPES = ("float32", "float64")


def data_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` of ``data.dtype``; raise ``ValueError`` naming one not in :data:`DTYPES`."""
    if name not in DTYPES:
        raise ValueError(f"unknown data.dtype {name!r}: expected one of {list(DTYPES)}")
    return getattr(torch, name)


#: the trainer's whole-number settings and their least values (where a config has them)
COUNTS = {"steps": 1, "batch_size": 1, "eval_batch_size": 1, "log_every": 1, "ckpt_every": 1,
          "max_bad_steps": 1, "warmup_steps": 0, "max_restores": 0}


_ABSENT = object()


def check_counts(section, counts: dict[str, int], prefix: str) -> None:
    """Raise ``ValueError`` naming a setting of ``counts`` (dotted keys of the config ``section``, named
    ``prefix.key``) that is not a whole number at least its least value; keys it lacks are skipped."""
    for key, least in counts.items():
        value = OmegaConf.select(section, key, default=_ABSENT)
        if value is not _ABSENT and not is_count(value, least):
            raise ValueError(f"{prefix}.{key} must be a whole number >= {least}, got {value!r}")


def _check_trainer(trainer) -> None:
    """The trainer's :data:`COUNTS`, and its ``max_minutes`` budget: not negative (0 stops at once,
    with a checkpoint)."""
    check_counts(trainer, COUNTS, "trainer")
    budget = getattr(trainer, "max_minutes", None)
    if budget is not None and not (is_number(budget, 0) or budget == 0):
        raise ValueError(f"trainer.max_minutes must be a number >= 0 (or null: no budget), got {budget!r}")


class Engine:
    """Trains ``objective.model`` with the settings of ``cfg.trainer`` into ``cfg.run_dir``.

    Args:
        objective: what to train (see :class:`Objective`).
        cfg: the run's config: ``trainer``, ``run_dir``, ``resume``, ``seed``, ``device``, ``wandb``.
        dd: the process group (default: what ``torchrun`` describes, else one process).
    """

    def __init__(self, objective: Objective, cfg, dd: Dist | None = None):
        self.obj, self.cfg, self.t = objective, cfg, cfg.trainer
        self.dd = dd if dd is not None else setup(cfg.device)
        self.model = objective.model
        self.run_dir = Path(cfg.run_dir)
        self.ckpt, self.metrics = self.run_dir / "checkpoint.pt", self.run_dir / "metrics.jsonl"
        groups = param_groups(self.model, bool(getattr(self.t, "equalise_filter_lr", False)))
        # fused: one kernel for all parameters instead of a dozen per tensor (a lattice sampler has
        # ~140 small ones: 2.7 ms -> 0.5 ms per step on 2 cores)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                    for g in groups for p in g["params"])
        self.opt = torch.optim.Adam(groups, lr=self.t.lr, weight_decay=self.t.weight_decay, fused=fused)
        # the model's structure is fixed: walk its module tree once, not several times per step
        # (escnn modules make walks slow; see gflows.nn.equivariant._hash_by_identity)
        self.named_params = list(self.model.named_parameters())
        self.params = [p for _, p in self.named_params]
        self.lipschitz = lipschitz_layers(self.model)
        # After each step the Lipschitz layers are marked stale and refresh their spectral-norm
        # estimate in the next forward pass, sharing its filter and its tracked operator application
        # (fused Adam leaves no trace on the parameters for them to notice); compiled passes
        # refresh eagerly instead, so that the compiled forward's branch stays fixed and refresh-free
        self.refresh_eagerly = bool(getattr(self.t, "compile", False))
        self.step, self.restores, self.lr_scale = 0, 0, 1.0
        check_schedule(self.t)
        _check_trainer(self.t)
        self.time_clock = getattr(self.t, "schedule_clock", "steps") == "time"
        self.seconds_before, self._t0 = 0.0, time.time()  # training seconds of earlier invocations
        self.ema: dict[str, Tensor] | None = None
        if self.t.ema_decay is not None and not 0.0 <= self.t.ema_decay <= 1.0:
            raise ValueError(f"trainer.ema_decay must lie in [0, 1] (or be null: no EMA), "
                             f"got {self.t.ema_decay}")
        if not self.t.relax_penalty >= 0:
            raise ValueError(f"trainer.relax_penalty must be >= 0, got {self.t.relax_penalty}")
        self.relaxed = symmetry_breaking_sq_norm(self.model) is not None  # fixed by the architecture
        if self.t.relax_penalty and not self.relaxed:
            raise ValueError("trainer.relax_penalty penalises the free part of relaxed layers, but the model "
                             "has none: set the flow's relax (flow.block.relax or flow.relax) > 0")

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        if not self.dd.main:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                 "restores": self.restores, "lr_scale": self.lr_scale, "rng": rng_state(),
                 "seconds": self.seconds_before + time.time() - self._t0,
                 # refreshed right after each step: the estimates saved belong to the weights saved
                 "lipschitz_fresh": self.refresh_eagerly,
                 "settings": settings_of(self.cfg, self.obj.resume_keys),
                 **self.obj.checkpoint_info()}
        if self.ema is not None:
            state["ema"] = self.ema
        save_checkpoint(state, self.ckpt)

    def load(self, found: tuple[dict[str, Any], Path] | None = None) -> dict[str, Any]:
        """Weights, optimiser and EMA from the newest readable checkpoint (``found``: as already read);
        the logged curve is cut back to its step."""
        state = _restore(self.obj, self.ckpt, found)
        saved, now = len(state["optimizer"]["param_groups"]), len(self.opt.param_groups)
        if saved != now:
            raise ValueError(f"{self.ckpt}: its optimiser has {saved} parameter groups, this run's {now}: "
                             "trainer.equalise_filter_lr differs from the checkpoint's run; resume with its "
                             "setting or start a new run_dir")
        self.opt.load_state_dict(state["optimizer"])
        if self.refresh_eagerly and state.get("lipschitz_fresh", False):
            for m in self.lipschitz:  # loading marks them stale; refreshing again would change them
                m.mark_fresh()
        if self.ema is not None:
            self.ema.update({k: v.to(self.ema[k].device) for k, v in state["ema"].items()})
        if self.dd.main:
            truncate_metrics(self.metrics, state["step"])
        self.step = state["step"]
        return state

    def _to_resume(self) -> tuple[dict[str, Any], Path] | None:
        """The checkpoint this run resumes from (None: a fresh run), refused by name when it was
        trained for something else or on other data; read once, before ``prepare()``, which may make
        data for minutes."""
        if not (self.cfg.resume and exists(self.ckpt)):
            return None
        state, used = found = load_latest(self.ckpt)
        self.obj.check_checkpoint(state, used)
        check_resume_settings(state.get("settings"), settings_of(self.cfg, self.obj.resume_keys), used)
        return found

    def _resume(self, found: tuple[dict[str, Any], Path] | None) -> None:
        if found is None:
            return
        state = self.load(found)
        self.restores, self.lr_scale = state["restores"], state["lr_scale"]
        self.seconds_before = float(state.get("seconds", 0.0))  # absent from older checkpoints
        set_rng_state(state["rng"])
        print(f"resume: continuing from step {self.step} of {self.ckpt}")

    # -- one step ------------------------------------------------------------------------------
    def _non_finite(self, bad: int, wb) -> int:
        """After a non-finite loss (the ``bad``-th in a row): skip it, or restore the last checkpoint
        with half the learning rate; raise once ``max_restores`` restores have not helped."""
        wb.log({"skipped_step": self.step}, step=self.step)
        self.opt.zero_grad(set_to_none=True)
        print(f"step {self.step}: non-finite loss skipped ({bad} in a row)")
        if bad < self.t.max_bad_steps:
            return bad
        if self.restores >= self.t.max_restores or not exists(self.ckpt):
            raise RuntimeError(f"training diverged: {bad} non-finite losses in a row at step {self.step}"
                               f" after {self.restores} restores; lower trainer.lr")
        self.load()
        self.restores, self.lr_scale = self.restores + 1, self.lr_scale * 0.5
        print(f"restored step {self.step} from {self.ckpt}; learning rate scaled by {self.lr_scale}")
        return 0

    def _update(self, out: StepLoss, lr: float) -> float:
        """Backward, gradients averaged over the ranks, clipping, the optimiser step, the Lipschitz
        layers' refresh (with compiled passes; else the next forward pass's) and the EMA; returns the
        gradient norm."""
        self.opt.zero_grad(set_to_none=True)
        surrogate = out.surrogate
        if self.t.relax_penalty:  # the same term on every rank, so averaging keeps it whole
            surrogate = surrogate + self.t.relax_penalty * symmetry_breaking_sq_norm(self.model)
        surrogate.backward()
        self.dd.average_gradients(self.params)
        for pg in self.opt.param_groups:
            pg["lr"] = lr * pg.get("lr_multiple", 1.0)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.t.grad_clip)
        self.opt.step()
        for m in self.lipschitz:
            if self.refresh_eagerly:
                m.update()
            else:
                m.mark_stale()
        if self.ema is not None:
            ema_update([self.ema[k] for k, _ in self.named_params], self.params, self.t.ema_decay)
        return float(gnorm)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.steps`` (or the time budget), checkpointing, then report."""
        self.model.train()
        found = self._to_resume()
        self.obj.prepare(self.dd)
        self.dd.broadcast(self.model)
        if self.t.ema_decay is not None:
            self.ema = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        self._resume(found)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        wb = open_wandb(self.cfg, self.run_dir, enabled=self.dd.main)
        from tqdm import tqdm

        bar = tqdm(total=self.t.steps, initial=self.step, desc=self.obj.label,
                   disable=os.environ.get("CI") == "true" or not self.dd.main)
        bad, last, recent = 0, {}, []
        t0 = self._t0 = time.time()
        while self.step < self.t.steps:
            # one clock for all ranks, so that they stop together and step with one learning rate
            trained = self.seconds_before + self.dd.max(time.time() - t0)
            if out_of_time(self.t.max_minutes, trained if self.time_clock else trained - self.seconds_before):
                break
            if not self.model.training:  # after an evaluation; a walk over every module costs 0.5 ms
                self.model.train()
            lr = learning_rate(self.t, self.step, trained) * self.lr_scale
            out = self.obj.loss(self.step, self.dd)
            if not self.dd.all_finite(torch.stack([out.loss.detach(), out.surrogate.detach()])):
                bad = self._non_finite(bad + 1, wb)
                continue
            bad, gnorm = 0, self._update(out, lr)
            self.step += 1
            last = {"step": self.step, self.obj.loss_name: float(out.loss), **out.metrics, "lr": lr,
                    "grad_norm": gnorm, "seconds": time.time() - t0}
            if self.relaxed:  # how far the relaxed layers have left the symmetry
                with torch.no_grad():
                    last["symmetry_breaking_norm"] = float(symmetry_breaking_sq_norm(self.model).sqrt())
            recent = (recent + [last[self.obj.loss_name]])[-50:]
            bar.update(1)
            bar.set_postfix({self.obj.loss_name: f"{sum(recent) / len(recent):.3f}"})
            self._record(last, wb)
        bar.close()
        return self._end(wb, last)

    def _record(self, last: dict[str, Any], wb) -> None:
        """The step's record to ``metrics.jsonl`` (every step), wandb (every ``log_every``) and a
        checkpoint (every ``ckpt_every`` and at the last step)."""
        if self.dd.main:
            log_metrics(self.metrics, last)
        if self.step % self.t.log_every == 0:
            wb.log({f"train/{k}": v for k, v in last.items() if k not in ("step", "seconds")}, step=self.step)
        if self.step % self.t.ckpt_every == 0 or self.step == self.t.steps:
            self.save()

    def _end(self, wb, last: dict[str, Any]) -> dict[str, Any]:
        if self.step < self.t.steps:
            print(f"trainer.max_minutes={self.t.max_minutes} reached at step {self.step}")
            self.save()
        self.dd.barrier()
        result: dict[str, Any] = {"step": self.step}
        if last:
            result[f"train_{self.obj.loss_name}"] = last[self.obj.loss_name]
        if self.t.eval_at_end and self.dd.main:
            result |= self.obj.finish(_with_ema(self.model, self.ema), self.run_dir, wb)
        wb.finish()
        if self.dd.main:
            print(json.dumps({k: v for k, v in result.items() if isinstance(v, int | float | str)}))
        return result
