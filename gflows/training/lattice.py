r"""Reverse KL on the :math:`\phi^4` action: the objective of ``python train.py data=phi4``.

Self-training without data: each step draws a batch from the flow and minimises an estimate of
:math:`E_q[\log q + S]`; under ``torchrun`` the step's noise is drawn for the whole batch from a
per-step seed and each rank maps its slice, so any number of processes takes the same steps. At
the end, :func:`~gflows.physics.report.sampler_report` on fresh samples (ESS, MH, observables
against HMC) and its plots.
"""

from __future__ import annotations

import json
from dataclasses import astuple
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from gflows._checks import is_number
from gflows.flow import Compiled, Flow
from gflows.models.config import lattice_model_from_config
from gflows.models.lattice import LatticeSymmetrised
from gflows.models.transfer import transfer_lattice_state
from gflows.nn.lipschitz import update_lipschitz
from gflows.physics.mcmc import ess
from gflows.physics.phi4 import Phi4
from gflows.physics.plots import save_plots
from gflows.physics.report import format_report, hmc_dataset, sampler_report
from gflows.training.checkpoint import exists, load_latest
from gflows.training.distributed import Dist, device_of, step_seed
from gflows.training.engine import StepLoss, check_counts, data_dtype
from gflows.training.records import read_metrics
from gflows.transforms.residual import logdet_mode

__all__ = ["DATA_COUNTS", "ESTIMATORS", "LatticeTask", "check_data", "compiled_sampler", "reverse_kl_loss",
           "train_reverse_kl"]

ESTIMATORS = ("reparam", "path")
OBJECTIVES = ("reverse_kl", "samples")
#: the report's sample counts and the HMC settings (``data.*``), and their least values
DATA_COUNTS = {"ess_samples": 2, "samples.train": 1, "samples.test": 1, "hmc.chains": 1,
               "hmc.trajectories": 1, "hmc.therm": 0, "hmc.n_steps": 1}


def check_data(d) -> None:
    """Name a count of :data:`DATA_COUNTS` or an HMC step size out of range (before training, so that a
    report cannot fail at its end)."""
    check_counts(d, DATA_COUNTS, "data")
    step = OmegaConf.select(d, "hmc.step_size")
    if step is not None and not is_number(step, 0):
        raise ValueError(f"data.hmc.step_size must be a number > 0, got {step!r}")


def reverse_kl_loss(flow: Flow, action, batch_size: int, estimator: str = "reparam",
                    z: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""A surrogate whose gradient estimates that of the reverse KL :math:`E_q[\log q + S]`, and the
    batch's log-weights ``-S - log q`` (detached).

    With ``x = T_\theta(z)``, :math:`\nabla_\theta KL = E_z[\nabla_x(\log q_\theta + S)(x) \cdot
    \partial_\theta x] + E_q[\partial_\theta \log q_\theta]`, and the last term vanishes in expectation.

    * ``"reparam"``: the reparameterisation estimator, the mean of ``log q + S`` (both terms).
    * ``"path"``: the path-gradient ("sticking the landing") estimator of Roeder et al. 2017 and
      Vaitl et al. 2022, "Gradients should stay on path": the score term is dropped, which leaves the
      expectation unchanged and makes the estimator exactly zero at ``q = p``, so its variance
      vanishes as the flow converges. :math:`\nabla_x \log q` comes with the samples from the
      forward recursion of Vaitl et al. 2024 (:meth:`~gflows.flow.Flow.push_and_score`: a coupling
      layer adds one input-gradient pass through its conditioner, no second evaluation of the flow),
      :math:`\nabla_x S` from autograd, both with the parameters held fixed.

    Args:
        flow: a flow with ``push``/``sample_and_log_prob`` and ``log_prob``.
        action: ``S``, mapping samples ``[B, ...]`` to ``[B]``.
        batch_size: samples drawn from the flow (ignored when ``z`` is given).
        estimator: ``"reparam"`` or ``"path"``.
        z: the base noise to map, instead of drawing ``batch_size`` samples.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown gradient estimator {estimator!r}: expected one of {ESTIMATORS}")
    if z is None:
        z = flow.base.sample(batch_size)
    if estimator == "reparam":
        x, lq = flow.push(z)
        log_w = -action(x) - lq
        return -log_w.mean(), log_w.detach()
    x, lq, score = flow.push_and_score(z)
    log_w = -action(x) - lq
    with torch.enable_grad():
        xd = x.detach().requires_grad_(True)
        s = action(xd)
        # an action that does not depend on the field (a test's constant) has no graph: zero gradient
        g = torch.autograd.grad(s.sum(), xd)[0] if s.requires_grad else torch.zeros_like(xd)
    return ((score + g) * x).flatten(1).sum(1).mean(), log_w.detach()


def compiled_sampler(flow: Flow, action) -> tuple[Flow, Any]:
    """``flow`` and ``action`` for :func:`reverse_kl_loss` through ``torch.compile``: the transform
    compiled (:class:`~gflows.flow.Compiled`, parameters shared), the base kept eager so that the
    sampling noise is the eager run's."""
    return Flow(Compiled(flow.transform), flow.base), torch.compile(action)


def train_reverse_kl(flow: Flow, theory: Phi4, steps: int, batch_size: int = 64, lr: float = 1e-3,
                     log_every: int = 50, callback=None, estimator: str = "reparam") -> list[dict]:
    """Minimise ``E_q[log q + S]`` by sampling from the flow with Adam at a constant ``lr``: a few
    lines for scripts and tests (``train.py`` runs the :class:`~gflows.training.engine.Engine`).
    ``estimator``: see :func:`reverse_kl_loss`."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    history = []
    for step in range(1, steps + 1):
        surrogate, log_w = reverse_kl_loss(flow, theory.action, batch_size, estimator)
        opt.zero_grad()
        surrogate.backward()
        opt.step()
        update_lipschitz(flow, lazy=True)  # residual samplers: refresh in the next pass
        if step % log_every == 0 or step == steps:
            rec = {"step": step, "loss": float(-log_w.mean()), "ess_batch": ess(log_w)}
            history.append(rec)
            if callback:
                callback(rec)
    return history


class LatticeTask:
    """The reverse-KL objective and the sampler report for a run's ``cfg`` (see ``configs/``)."""

    loss_name = "loss"

    def __init__(self, cfg):
        self.cfg, t = cfg, cfg.trainer
        dtype = data_dtype(cfg.data.dtype)
        if t.gradient not in ESTIMATORS:
            raise ValueError(f"unknown trainer.gradient {t.gradient!r}: expected one of {list(ESTIMATORS)}")
        if t.objective not in OBJECTIVES:
            raise ValueError(f"unknown trainer.objective {t.objective!r}: expected one of {list(OBJECTIVES)}")
        self.configs: tuple[Tensor, Tensor] | None = None  # (train, test) HMC configurations
        self.resume_keys = ("seed", "trainer.objective") + (
            ("data.augment", "data.samples.train", "data.samples.test", "data.hmc.chains", "data.hmc.therm",
             "data.hmc.n_steps", "data.hmc.step_size") if t.objective == "samples" else ())
        d = cfg.data
        check_data(d)
        self.theory = Phi4.from_settings(d.preset, d.L, d.m2, d.lam, d.kappa, d.lambda_h)
        self.model = lattice_model_from_config(cfg.flow, self.theory.L)
        self.model.to(device=device_of(cfg.device), dtype=dtype)
        self.label = f"{cfg.flow.name}/phi4 L={self.theory.L}"
        self.sampler, self.action = self.model, self.theory.action
        if t.compile:
            self.sampler, self.action = compiled_sampler(self.model, self.theory.action)
        th = self.theory
        hopping = (f" (kappa, lambda_h = {', '.join(f'{v:.5f}' for v in th.hopping_parameters)})"
                   if th.lam else "")  # the free field has no hopping form
        print(f"phi4: L={th.L} m2={th.m2} lam={th.lam}{hopping}; {cfg.flow.name}, "
              f"{sum(p.numel() for p in self.model.parameters())} parameters, {d.dtype}")

    def prepare(self, dd: Dist) -> None:
        if self.cfg.trainer.batch_size % dd.world:
            raise ValueError(f"trainer.batch_size {self.cfg.trainer.batch_size} does not split over "
                             f"{dd.world} processes")
        if self.cfg.trainer.objective == "samples":
            self._hmc_configs()
        if self.cfg.init_from and not (self.cfg.resume and exists(Path(self.cfg.run_dir) / "checkpoint.pt")):
            self._transfer(Path(self.cfg.init_from))

    def _hmc_configs(self) -> tuple[Tensor, Tensor]:
        """The HMC configurations of ``trainer.objective=samples`` (made once, seeded)."""
        if self.configs is None:
            d = self.cfg.data
            hmc = {k: d.hmc[k] for k in ("chains", "therm", "n_steps", "step_size")}
            train, test = hmc_dataset(self.theory, int(d.samples.train), int(d.samples.test), hmc,
                                      int(self.cfg.seed) + 7)
            p = next(self.model.parameters())
            self.configs = train.to(p.device, p.dtype)[:, None], test.to(p.device, p.dtype)[:, None]
            print(f"samples: {len(train)} training and {len(test)} held-out HMC configurations")
        return self.configs

    def _nll(self, step: int, dd: Dist) -> StepLoss:
        """Maximum likelihood on HMC configurations (``data.augment``: each moved by a random
        symmetry of the action): ``-log q`` per site."""
        train, _ = self._hmc_configs()
        g = torch.Generator().manual_seed(step_seed(self.cfg.seed, step))
        x = train[torch.randperm(len(train), generator=g)[: self.cfg.trainer.batch_size]]
        if self.cfg.data.augment:
            x = Phi4.random_symmetry(x, g)
        nll = -self.model.log_prob(dd.shard(x)) / self.theory.volume
        return StepLoss(nll.mean(), dd.gather(nll.detach()).mean())

    def _transfer(self, source: Path) -> None:
        """Start from the weights of the run in ``source`` (another lattice size of this sampler)."""
        path = source / "checkpoint.pt"
        if not exists(path):
            raise FileNotFoundError(f"init_from={source}: no checkpoint at {path}")
        state, used = load_latest(path)
        if "theory" not in state:
            raise ValueError(f"init_from={source}: {used} is not a lattice sampler's checkpoint")
        L0, m2, lam = state["theory"]
        notes = transfer_lattice_state(self.model, state["model"], int(L0), self.theory.L)
        self.model.to(device=device_of(self.cfg.device), dtype=data_dtype(self.cfg.data.dtype))
        print(f"init_from: the weights of {used} (L={L0}, m2={m2}, lam={lam}, step {state['step']})"
              + "".join(f"\n  {n}" for n in notes))

    def loss(self, step: int, dd: Dist) -> StepLoss:
        if self.cfg.trainer.objective == "samples":
            return self._nll(step, dd)
        torch.manual_seed(step_seed(self.cfg.seed, step))
        z = dd.shard(self.model.base.sample(self.cfg.trainer.batch_size))
        surrogate, log_w = reverse_kl_loss(self.sampler, self.action, len(z), self.cfg.trainer.gradient, z=z)
        log_w = dd.gather(log_w)
        finite = bool(torch.isfinite(log_w).all())  # else the engine skips the step
        return StepLoss(surrogate, -log_w.mean(), {"ess_batch": ess(log_w)} if finite else {})

    def checkpoint_info(self) -> dict[str, Any]:
        return {"theory": list(astuple(self.theory)), "init_from": str(self.cfg.init_from or "")}

    def check_checkpoint(self, state: dict[str, Any], path: Path) -> None:
        if tuple(state["theory"]) != astuple(self.theory):
            raise ValueError(f"the checkpoint at {path} was trained for (L, m2, lam) = "
                             f"{tuple(state['theory'])}, not {astuple(self.theory)}: set another run_dir")

    def evaluate(self, model: nn.Module, wb=None) -> dict[str, Any]:
        """The sampler report (``data.symmetrise``: on the flow's mixture over the lattice
        symmetries), its table, ``report.json`` and plots in ``run_dir``."""
        d, run_dir = self.cfg.data, Path(self.cfg.run_dir)
        rows = read_metrics(run_dir / "metrics.jsonl")
        train_seconds = rows[-1]["seconds"] if rows else None  # of the last training invocation
        model.eval()
        hmc = None
        if d.hmc.enabled:
            hmc = {k: d.hmc[k] for k in ("chains", "trajectories", "therm", "n_steps", "step_size")}
        # residual blocks' log-dets exact (brute-force Jacobian), so that log w is not a noisy estimate
        with logdet_mode(model, "exact"):
            sampler = LatticeSymmetrised(model) if d.symmetrise else model
            report, arrays = sampler_report(sampler, self.theory, int(d.ess_samples), hmc, int(self.cfg.seed),
                                            train_seconds, int(d.amortise_samples))
        report["symmetrised"] = bool(d.symmetrise)
        if self.cfg.trainer.objective == "samples":
            report["test_nll_per_site"] = self._test_nll(model)
            print(f"held-out HMC configurations: -log q per site {report['test_nll_per_site'][0]:.5f} "
                  f"+- {report['test_nll_per_site'][1]:.5f}")
        report["init_from"] = self.cfg.init_from  # the run the weights started from (null: none)
        print(format_report(report))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "report.json").write_text(json.dumps(report, indent=1))
        curve = [(r["step"], r["ess_batch"]) for r in rows if "ess_batch" in r]  # reverse KL only
        plots = save_plots(run_dir, arrays, curve)
        print(f"report: wrote {run_dir / 'report.json'} and {', '.join(plots)}")
        if wb is not None:
            import wandb

            wb.log({"final/ess": report["ess"], "final/mh_acceptance": report["mh_acceptance"],
                    "final/tau_int": report["tau_int_abs_m"]}
                   | {f"final/{Path(p).stem}": wandb.Image(p) for p in plots})
        return report

    @torch.no_grad()
    def _test_nll(self, model: nn.Module) -> tuple[float, float]:
        """``-log q`` per site on the held-out HMC configurations (mean, standard error)."""
        _, test = self._hmc_configs()
        with logdet_mode(model, "exact"):
            nll = torch.cat([-model.log_prob(b) for b in test.split(1024)]) / self.theory.volume
        return float(nll.mean()), float(nll.std() / len(nll) ** 0.5)

    def finish(self, model: nn.Module, run_dir: Path, wb) -> dict[str, Any]:
        return self.evaluate(model, wb)
