"""Reverse-KL training of a lattice flow sampler on the phi^4 action (no data)."""

from __future__ import annotations

import torch

from gflows.flow import Flow
from gflows.physics.mcmc import ess
from gflows.physics.phi4 import Phi4

__all__ = ["log_weights", "train_reverse_kl"]


@torch.no_grad()
def log_weights(flow: Flow, theory: Phi4, n: int, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fresh samples and their ``log w = -S - log q``."""
    xs, lws = [], []
    for i in range(0, n, batch):
        x, lq = flow.sample_and_log_prob(min(batch, n - i))
        xs.append(x[:, 0])
        lws.append(-theory.action(x) - lq)
    return torch.cat(xs), torch.cat(lws)


def train_reverse_kl(flow: Flow, theory: Phi4, steps: int, batch_size: int = 64, lr: float = 1e-3,
                     log_every: int = 50, callback=None) -> list[dict]:
    """Minimise ``E_q[log q + S]`` by sampling from the flow (self-training)."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    history = []
    for step in range(1, steps + 1):
        x, lq = flow.sample_and_log_prob(batch_size)
        log_w = -theory.action(x) - lq
        loss = -log_w.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            rec = {"step": step, "loss": float(loss), "ess_batch": ess(log_w.detach())}
            history.append(rec)
            if callback:
                callback(rec)
    return history
