r"""Reverse-KL training of lattice flow samplers on the :math:`\phi^4` action (no data), and their report.

``python train.py data=phi4 data.preset=E2 flow=g_coupling`` runs :func:`run`: self-training by
minimising :math:`E_q[\log q + S]`, checkpoints and resume as for images, and at the end
:func:`sampler_report`: ESS on fresh samples, independence Metropolis-Hastings (acceptance,
:math:`\tau_{int}`), observables with binned-jackknife errors next to an HMC reference, and plots.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import astuple
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gflows.flow import Compiled, Flow
from gflows.models.lattice import LatticeSymmetrised, lattice_flow, realnvp_baseline, residual_lattice_flow
from gflows.physics.mcmc import ess, hmc, independence_mh, tau_int
from gflows.physics.observables import measure
from gflows.physics.phi4 import Phi4
from gflows.training.checkpoint import (
    exists,
    load_latest,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gflows.training.common import (
    device_of,
    learning_rate,
    log_metrics,
    open_wandb,
    out_of_time,
    skip_or_restore,
    truncate_metrics,
)
from gflows.transforms.residual import logdet_mode

__all__ = [
    "build_lattice_model",
    "compiled_sampler",
    "hmc_reference",
    "log_weights",
    "reverse_kl_loss",
    "run",
    "sampler_report",
    "theory_from_cfg",
    "train_reverse_kl",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
ESTIMATORS = ("reparam", "path")
LATTICE_KINDS = ("coupling", "realnvp", "residual")
OBSERVABLES = ("abs_m", "chi2", "chi2_conn", "energy", "xi")


@torch.no_grad()
def log_weights(flow: Flow | LatticeSymmetrised, theory: Phi4, n: int, batch: int = 1024,
                ) -> tuple[Tensor, Tensor]:
    """``n`` fresh samples ``[n, L, L]`` and their ``log w = -S - log q``."""
    xs, lws = [], []
    for i in range(0, n, batch):
        x, lq = flow.sample_and_log_prob(min(batch, n - i))
        xs.append(x[:, 0])
        lws.append(-theory.action(x) - lq)
    return torch.cat(xs), torch.cat(lws)


def reverse_kl_loss(flow: Flow, action, batch_size: int, estimator: str = "reparam") -> tuple[Tensor, Tensor]:
    r"""A surrogate whose gradient estimates that of the reverse KL :math:`E_q[\log q + S]`, and the
    batch's log-weights ``-S - log q`` (detached).

    With ``x = T_\theta(z)``, :math:`\nabla_\theta KL = E_z[\nabla_x(\log q_\theta + S)(x) \cdot
    \partial_\theta x] + E_q[\partial_\theta \log q_\theta]`, and the last term vanishes in expectation.

    * ``"reparam"``: the reparameterisation estimator, the mean of ``log q + S`` (both terms).
    * ``"path"``: the path-gradient ("sticking the landing") estimator of Roeder et al. 2017 and
      Vaitl et al. 2022, "Gradients should stay on path": the score term is dropped, which leaves the
      expectation unchanged and makes the estimator exactly zero at ``q = p``, so its variance
      vanishes as the flow converges. ``\nabla_x(\log q + S)`` comes from a density pass with the
      parameters held fixed (roughly twice the cost of a step).

    Args:
        flow: a flow with ``sample_and_log_prob`` and ``log_prob``.
        action: ``S``, mapping samples ``[B, ...]`` to ``[B]``.
        batch_size: samples drawn from the flow.
        estimator: ``"reparam"`` or ``"path"``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown gradient estimator {estimator!r}: expected one of {ESTIMATORS}")
    x, lq = flow.sample_and_log_prob(batch_size)
    log_w = -action(x) - lq
    if estimator == "reparam":
        return -log_w.mean(), log_w.detach()
    with torch.enable_grad():
        xd = x.detach().requires_grad_(True)
        # autograd.grad with inputs=xd leaves the parameters' .grad untouched: they act as constants.
        (g,) = torch.autograd.grad((flow.log_prob(xd) + action(xd)).sum(), xd)
    return (g * x).flatten(1).sum(1).mean(), log_w.detach()


def compiled_sampler(flow: Flow, action) -> tuple[Flow, Any]:
    """``flow`` and ``action`` for :func:`reverse_kl_loss` through ``torch.compile``: the transform
    compiled (:class:`~gflows.flow.Compiled`, parameters shared), the base kept eager so that the
    sampling noise is the eager run's."""
    return Flow(Compiled(flow.transform), flow.base), torch.compile(action)


def train_reverse_kl(flow: Flow, theory: Phi4, steps: int, batch_size: int = 64, lr: float = 1e-3,
                     log_every: int = 50, callback=None, estimator: str = "reparam") -> list[dict]:
    """Minimise ``E_q[log q + S]`` by sampling from the flow (self-training); a minimal loop for
    scripts and tests (:func:`run` adds schedules, checkpoints and logging). ``estimator``: see
    :func:`reverse_kl_loss`."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    history = []
    for step in range(1, steps + 1):
        surrogate, log_w = reverse_kl_loss(flow, theory.action, batch_size, estimator)
        opt.zero_grad()
        surrogate.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            rec = {"step": step, "loss": float(-log_w.mean()), "ess_batch": ess(log_w)}
            history.append(rec)
            if callback:
                callback(rec)
    return history


def theory_from_cfg(data) -> Phi4:
    """The theory of ``cfg.data``: ``preset`` (or null), with ``L`` and either ``(m2, lam)`` or the
    hopping parameters ``(kappa, lambda_h)`` overriding it where they are given."""
    L, m2, lam = (None, None, None) if data.get("preset") is None else astuple(Phi4.preset(data.preset))
    L = data.get("L") if data.get("L") is not None else L
    kappa, lam_h = data.get("kappa"), data.get("lambda_h")
    if kappa is not None or lam_h is not None:
        if data.get("m2") is not None or data.get("lam") is not None:
            raise ValueError("give either data.m2/data.lam or data.kappa/data.lambda_h, not both")
        if kappa is None or lam_h is None or L is None:
            raise ValueError("the hopping form needs data.kappa, data.lambda_h and data.L (or a preset)")
        return Phi4.hopping(int(L), float(kappa), float(lam_h))
    m2 = data.get("m2") if data.get("m2") is not None else m2
    lam = data.get("lam") if data.get("lam") is not None else lam
    if L is None or m2 is None or lam is None:
        raise ValueError("data.preset is null: give data.L with data.m2 and data.lam "
                         "(or data.kappa and data.lambda_h)")
    return Phi4(int(L), float(m2), float(lam))


def build_lattice_model(cfg, theory: Phi4) -> Flow:
    """The lattice flow of ``cfg.flow`` (``kind`` coupling, realnvp or residual, sizes in
    ``flow.lattice``)."""
    kind = cfg.flow.kind
    if kind not in LATTICE_KINDS:
        raise ValueError(f"flow={cfg.flow.name} (kind {kind!r}) is not available for data=phi4: "
                         f"use flow=g_coupling, coupling, g_residual, residual or realnvp")
    lat = cfg.flow.lattice
    if kind == "realnvp":
        return realnvp_baseline(theory.L, int(lat.n_layers), int(lat.hidden_channels))
    from gflows.groups import Group

    group = Group(cfg.flow.group or cfg.group.name)
    if kind == "residual":
        return residual_lattice_flow(
            theory.L, int(lat.n_blocks), max(1, int(lat.hidden_channels) // group.order), group,
            sign_symmetric=bool(lat.sign_symmetric), kernel_sizes=tuple(lat.kernel_sizes),
            coeff=float(lat.coeff), site_spline_bins=int(lat.site_spline_bins),
            site_spline_bound=float(lat.site_spline_bound), momentum_scale=bool(lat.momentum_scale),
            n_exact_terms=int(lat.n_exact_terms), lipschitz_kwargs=dict(lat.lipschitz_kwargs),
            basis=str(lat.basis),
        )
    return lattice_flow(
        theory.L, int(lat.n_layers), max(1, int(lat.hidden_channels) // group.order), group,
        sign_symmetric=bool(lat.sign_symmetric), kernel_sizes=tuple(lat.kernel_sizes),
        scale_bound=float(lat.scale_bound), activation=lat.activation,
        zero_mode_bins=int(lat.get("zero_mode_bins") or 0),
        zero_mode_bound=float(lat.get("zero_mode_bound", 1.0)),
        site_spline_bins=int(lat.get("site_spline_bins") or 0),
        site_spline_bound=float(lat.get("site_spline_bound", 3.0)),
        site_spline_every=int(lat.get("site_spline_every") or 0),
        spline_layers=int(lat.get("spline_layers") or 0),
        spline_bins=int(lat.get("spline_bins") or 8),
        spline_bound=float(lat.get("spline_bound", 3.0)),
        momentum_scale=bool(lat.get("momentum_scale", False)),
        basis=str(lat.get("basis", "auto")),
    )


def hmc_reference(theory: Phi4, chains: int, trajectories: int, therm: int, n_steps: int,
                  step_size: float, seed: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, float]:
    """HMC configurations ``[chains * trajectories, L, L]``, chain after chain (so that consecutive
    rows are consecutive in Monte Carlo time, as binning needs), and the acceptance rate."""
    g = torch.Generator().manual_seed(seed)
    phi0 = 0.5 * torch.randn(chains, theory.L, theory.L, generator=g, dtype=dtype)
    phi, _ = hmc(theory.action, theory.force, phi0, therm, n_steps, step_size, g)
    phi, acc = hmc(theory.action, theory.force, phi[-1], trajectories, n_steps, step_size, g)
    return phi.transpose(0, 1).reshape(-1, theory.L, theory.L), acc


def sampler_report(flow: Flow, theory: Phi4, n_samples: int, hmc_cfg=None, seed: int = 0,
                   symmetrise: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """ESS/N on ``n_samples`` fresh samples, an independence-MH chain through them (acceptance,
    ``tau_int`` of ``|M|``), its observables with errors, the same observables by reweighting the
    fresh samples and, with ``hmc_cfg``, HMC's and the differences in combined standard errors
    (``z`` for MH, ``z_reweighted``). With ``symmetrise``, the sampler is the flow's mixture over the
    lattice symmetries (:class:`~gflows.models.lattice.LatticeSymmetrised`: exact, invariant, ESS no
    lower, 32 density evaluations per sample). Returns the report and the arrays the plots need."""
    flow.eval()
    torch.manual_seed(seed)
    sampler = LatticeSymmetrised(flow) if symmetrise else flow
    # Residual blocks' log-dets exact (brute-force Jacobian), so that log w is not a noisy estimate.
    with logdet_mode(flow, "exact"):
        phi, lw = (t.cpu() for t in log_weights(sampler, theory, n_samples))  # MCMC and plots on the CPU
    if not bool(torch.isfinite(lw).all()):
        raise RuntimeError("the flow produced non-finite log-weights: the sampler is unusable")
    idx, acc = independence_mh(lw, torch.Generator().manual_seed(seed))
    chain = phi[idx].double()
    tau, window = tau_int(chain.flatten(1).sum(1).abs())
    flow_obs = measure(chain)
    report: dict[str, Any] = {
        "theory": {"L": theory.L, "m2": theory.m2, "lam": theory.lam},
        "n_samples": n_samples,
        "symmetrised": bool(symmetrise),
        "ess": ess(lw),
        "mh_acceptance": acc,
        "tau_int_abs_m": tau,
        "tau_window": window,
        "flow": flow_obs,
        "flow_reweighted": measure(phi, log_w=lw),
    }
    arrays = {"log_w": lw.double(), "m_flow": chain.flatten(1).sum(1) / theory.volume}
    if hmc_cfg is not None:
        t0 = time.time()
        ref, hmc_acc = hmc_reference(theory, int(hmc_cfg.chains), int(hmc_cfg.trajectories),
                                     int(hmc_cfg.therm), int(hmc_cfg.n_steps), float(hmc_cfg.step_size),
                                     seed + 1)
        hmc_obs = measure(ref)
        report["hmc"] = hmc_obs | {"acceptance": (hmc_acc, 0.0), "seconds": (time.time() - t0, 0.0)}
        for key, obs in (("z", flow_obs), ("z_reweighted", report["flow_reweighted"])):
            report[key] = {k: abs(obs[k][0] - hmc_obs[k][0]) / math.hypot(obs[k][1], hmc_obs[k][1])
                           for k in OBSERVABLES}
        arrays["m_hmc"] = ref.flatten(1).sum(1) / theory.volume
    return report, arrays


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: flow (MH and reweighted) and HMC observables with errors and their
    distances in combined standard errors."""
    th = report["theory"]
    hmc_head = f" {'HMC':>22s} {'z MH':>5s} {'z rw':>5s}" if "hmc" in report else ""
    lines = [
        f"phi4 L={th['L']} m2={th['m2']} lam={th['lam']}",
        f"ESS/N on {report['n_samples']} fresh samples: {report['ess']:.4f}"
        + (" (the flow mixed over the 32 lattice-symmetry cosets)" if report.get("symmetrised") else ""),
        f"independence MH: acceptance {report['mh_acceptance']:.3f}, tau_int(|M|) "
        f"{report['tau_int_abs_m']:.2f} (window {report['tau_window']})",
        f"bin size: flow MH {int(report['flow']['bin_size'][0])}, reweighted "
        f"{int(report['flow_reweighted']['bin_size'][0])}"
        + (f", HMC {int(report['hmc']['bin_size'][0])} (HMC acceptance {report['hmc']['acceptance'][0]:.3f})"
           if "hmc" in report else ""),
        f"{'observable':10s} {'flow (MH)':>22s} {'flow (reweighted)':>22s}" + hmc_head,
    ]
    for k in OBSERVABLES:
        row = f"{k:10s}" + "".join(f" {v:12.5f} +- {e:7.5f}" for v, e in
                                   (report["flow"][k], report["flow_reweighted"][k]))
        if "hmc" in report:
            hv, he = report["hmc"][k]
            row += f" {hv:12.5f} +- {he:7.5f} {report['z'][k]:5.2f} {report['z_reweighted'][k]:5.2f}"
        lines.append(row)
    return "\n".join(lines)


def save_plots(run_dir: Path, metrics: Path, arrays: dict[str, Tensor]) -> list[str]:
    """PNGs: batch ESS during training, histogram of the log-weights, magnetisation flow vs HMC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if metrics.exists():
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        steps, values = [r["step"] for r in rows], torch.tensor([r["ess_batch"] for r in rows])
        ax.plot(steps, values, lw=0.5, alpha=0.4, label="batch")
        w = max(1, len(rows) // 50)
        if len(rows) >= w:
            ax.plot(steps[w - 1 :], values.unfold(0, w, 1).mean(1), label=f"moving average of {w}")
        ax.set(xlabel="step", ylabel="ESS/N (batch estimate, biased high)", ylim=(0, 1))
        ax.legend()
        paths.append(_save(fig, run_dir / "ess.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    lw = arrays["log_w"]
    ax.hist((lw - lw.max()).numpy(), bins=60)
    ax.set(xlabel="log w - max log w", ylabel="count", title="log-weights of fresh samples")
    paths.append(_save(fig, run_dir / "log_weights.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(arrays["m_flow"].numpy(), bins=60, density=True, alpha=0.6, label="flow + MH")
    if "m_hmc" in arrays:
        ax.hist(arrays["m_hmc"].numpy(), bins=60, density=True, alpha=0.6, label="HMC")
    ax.set(xlabel="M / V", ylabel="density")
    ax.legend()
    paths.append(_save(fig, run_dir / "magnetisation.png"))
    return paths


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _finish(cfg, model: Flow, theory: Phi4, run_dir: Path, wb) -> dict[str, Any]:
    report, arrays = sampler_report(model, theory, int(cfg.data.ess_samples),
                                    cfg.data.hmc if cfg.data.hmc.enabled else None, int(cfg.seed),
                                    bool(cfg.data.get("symmetrise", False)))
    print(format_report(report))
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    plots = save_plots(run_dir, run_dir / "metrics.jsonl", arrays)
    print(f"report: wrote {run_dir / 'report.json'} and {', '.join(plots)}")
    if wb is not None:
        import wandb

        wb.log({"final/ess": report["ess"], "final/mh_acceptance": report["mh_acceptance"],
                "final/tau_int": report["tau_int_abs_m"]}
               | {f"final/{Path(p).stem}": wandb.Image(p) for p in plots})
    return report


def _load(path: Path, theory: Phi4, model: Flow) -> dict[str, Any]:
    """The newest readable checkpoint, of this theory, loaded into ``model``."""
    state, used = load_latest(path)
    if tuple(state["theory"]) != astuple(theory):
        raise ValueError(f"the checkpoint at {used} was trained for (L, m2, lam) = {tuple(state['theory'])}, "
                         f"not {astuple(theory)}: set another run_dir")
    load_model_state(model, state["model"], used)
    return state


def run(cfg) -> dict[str, Any]:
    """``train.py data=phi4``: train (``mode=train``) or report on a checkpoint (``mode=eval``)."""
    if cfg.mode not in ("train", "eval"):
        raise ValueError(f"unknown mode {cfg.mode!r} for data=phi4: expected 'train' or 'eval'")
    if cfg.data.dtype not in DTYPES:
        raise ValueError(f"unknown data.dtype {cfg.data.dtype!r}: expected one of {sorted(DTYPES)}")
    estimator = cfg.trainer.get("gradient", "reparam")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown trainer.gradient {estimator!r}: expected one of {list(ESTIMATORS)}")
    theory = theory_from_cfg(cfg.data)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_lattice_model(cfg, theory)
    device = device_of(cfg.device)
    model.to(device=device, dtype=DTYPES[cfg.data.dtype])
    run_dir = Path(cfg.run_dir)
    ckpt_path, metrics = run_dir / "checkpoint.pt", run_dir / "metrics.jsonl"
    print(f"phi4: L={theory.L} m2={theory.m2} lam={theory.lam} (kappa, lambda_h = "
          f"{', '.join(f'{v:.5f}' for v in theory.hopping_parameters)}); {cfg.flow.name}, "
          f"{sum(p.numel() for p in model.parameters())} parameters, {cfg.data.dtype}")
    if cfg.mode == "eval":
        if not exists(ckpt_path):
            raise FileNotFoundError(f"no checkpoint at {ckpt_path}: train first (mode=train)")
        _load(ckpt_path, theory, model)
        return _finish(cfg, model, theory, run_dir, None)

    opt = torch.optim.Adam(model.parameters(), lr=cfg.trainer.lr)
    step, restores, lr_scale = 0, 0, 1.0

    def load() -> dict[str, Any]:
        state = _load(ckpt_path, theory, model)
        opt.load_state_dict(state["optimizer"])
        truncate_metrics(metrics, state["step"])
        return state

    def checkpoint() -> None:
        save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "restores": restores, "lr_scale": lr_scale, "rng": rng_state(),
                         "theory": list(astuple(theory))}, ckpt_path)

    if cfg.resume and exists(ckpt_path):
        state = load()
        step, restores, lr_scale = state["step"], state["restores"], state["lr_scale"]
        set_rng_state(state["rng"])
        print(f"resume: continuing from step {step} of {ckpt_path}")
    run_dir.mkdir(parents=True, exist_ok=True)
    wb = open_wandb(cfg, run_dir)
    from tqdm import tqdm

    bar = tqdm(total=cfg.trainer.steps, initial=step, desc=f"{cfg.flow.name}/phi4 L={theory.L}",
               disable=os.environ.get("CI") == "true")
    bad, t0, recent = 0, time.time(), []
    model.train()
    sampler, action = model, theory.action
    if cfg.trainer.get("compile", False):
        sampler, action = compiled_sampler(model, theory.action)
    while step < cfg.trainer.steps and not out_of_time(cfg, t0):
        lr = learning_rate(cfg, step) * lr_scale
        for pg in opt.param_groups:
            pg["lr"] = lr
        surrogate, log_w = reverse_kl_loss(sampler, action, int(cfg.trainer.batch_size), estimator)
        loss = -log_w.mean()
        if not bool(torch.isfinite(loss) and torch.isfinite(surrogate)):
            bad += 1
            wb.log({"skipped_step": step}, step=step)
            opt.zero_grad(set_to_none=True)
            if skip_or_restore(cfg, step, bad, restores, exists(ckpt_path)):
                step = load()["step"]
                restores, lr_scale, bad = restores + 1, lr_scale * 0.5, 0
                print(f"restored step {step} from {ckpt_path}; learning rate scaled by {lr_scale}")
            continue
        bad = 0
        opt.zero_grad(set_to_none=True)
        surrogate.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        opt.step()
        step += 1
        batch_ess = ess(log_w)
        recent = (recent + [batch_ess])[-50:]
        loss = float(loss)
        rec = {"step": step, "loss": loss, "ess_batch": batch_ess, "lr": lr,
               "grad_norm": float(gnorm), "seconds": time.time() - t0}
        log_metrics(metrics, rec)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", ess=f"{sum(recent) / len(recent):.3f}")
        if step % cfg.trainer.log_every == 0:
            wb.log({"train/loss": loss, "train/ess_batch": batch_ess, "lr": lr,
                    "grad_norm": float(gnorm)}, step=step)
        if step % cfg.trainer.ckpt_every == 0 or step == cfg.trainer.steps:
            checkpoint()
    bar.close()
    if step < cfg.trainer.steps:
        print(f"trainer.max_minutes={cfg.trainer.max_minutes} reached at step {step}")
        checkpoint()
    result: dict[str, Any] = {"step": step}
    if cfg.trainer.eval_at_end:
        result |= _finish(cfg, model, theory, run_dir, wb)
    wb.finish()
    return result
