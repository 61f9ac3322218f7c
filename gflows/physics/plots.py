"""The sampler report's figures (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["save_plots"]


def save_plots(folder: Path, arrays: dict[str, Tensor], curve: Sequence[tuple[int, float]] = ()) -> list[str]:
    """``ess.png`` (the batch ESS during training, from ``curve``'s ``(step, ess)`` pairs, if any),
    ``log_weights.png`` (histogram of the fresh samples' log-weights) and ``magnetisation.png``
    (flow + MH against HMC where ``arrays`` has it); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        steps, values = [s for s, _ in curve], torch.tensor([v for _, v in curve])
        ax.plot(steps, values, lw=0.5, alpha=0.4, label="batch")
        w = max(1, len(curve) // 50)
        ax.plot(steps[w - 1 :], values.unfold(0, w, 1).mean(1), label=f"moving average of {w}")
        ax.set(xlabel="step", ylabel="ESS/N (batch estimate, biased high)", ylim=(0, 1))
        ax.legend()
        paths.append(_save(fig, folder / "ess.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    lw = arrays["log_w"]
    ax.hist((lw - lw.max()).numpy(), bins=60)
    ax.set(xlabel="log w - max log w", ylabel="count", title="log-weights of fresh samples")
    paths.append(_save(fig, folder / "log_weights.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(arrays["m_flow"].numpy(), bins=60, density=True, alpha=0.6, label="flow + MH")
    if "m_hmc" in arrays:
        ax.hist(arrays["m_hmc"].numpy(), bins=60, density=True, alpha=0.6, label="HMC")
    ax.set(xlabel="M / V", ylabel="density")
    ax.legend()
    paths.append(_save(fig, folder / "magnetisation.png"))
    return paths


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
