"""What one path-gradient step of the lattice sampler is made of, and the alternatives to its parts.

1. The step (``flow=lattice_coupling`` at the review point, batch 64, fused Adam): dispatched
   operators per step, counted by the source line in ``gflows`` that issued them; the loss's
   autograd graph, nodes by type; ``torch.profiler``'s self-time table over 5 steps.
2. Alternatives to its parts, each against what the library does, median microseconds: the
   periodic convolution (pad + mkldnn) against an FFT convolution, ``F.unfold`` plus a product and
   channels-last; ``F.pad``'s circular mode against two concatenations and an empty tensor filled
   by copies; LipSwish against ``silu(beta x) / (1.1 beta)`` and a hand-written ``autograd.Function``.
3. With ``--compile``: the step with each conditioner through ``torch.compile``, against eager,
   interleaved (the cold compile time printed).

    python benchmarks/profile_lattice_step.py [--compile]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
import traceback
from pathlib import Path

import bench_checks  # this folder, first on sys.path when run as a script
import torch
import torch.nn.functional as F
from bench_machine import header  # this folder, first on sys.path when run as a script
from hydra import compose, initialize_config_dir
from torch.profiler import profile
from torch.utils._python_dispatch import TorchDispatchMode

from gflows.models.config import lattice_model_from_config
from gflows.nn.equivariant import LipSwish
from gflows.physics import Phi4
from gflows.training.lattice import reverse_kl_loss
from gflows.transforms.conditioner import Conditioner

ROOT = Path(__file__).resolve().parents[1]
THEORY = Phi4.preset("review")


def median_us(f) -> float:
    return bench_checks.median_us(f, repeats=300, warmup=20)


def sampler():
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", ["data=phi4", "flow=lattice_coupling"])
    torch.manual_seed(0)
    model = lattice_model_from_config(cfg.flow, THEORY.L)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

    def step() -> float:
        t0 = time.perf_counter()
        loss = reverse_kl_loss(model, THEORY.action, 64, "path")[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return model, step


class _CountBySource(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_source = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        stack = reversed(traceback.extract_stack(limit=12))
        here = next((f for f in stack if "/gflows/" in f.filename), None)
        where = f"{here.filename.split('gflows/')[-1]}:{here.lineno}" if here else "(autograd engine)"
        self.by_source[f"{where} {func}"] += 1
        return func(*args, **(kwargs or {}))


def profile_step() -> None:
    model, step = sampler()
    for _ in range(5):
        step()
    counter = _CountBySource()
    with counter:
        step()
    print(f"\n## dispatched operators per step: {sum(counter.by_source.values())}")
    for k, v in counter.by_source.most_common(20):
        print(f"{v:6d} {k}")
    loss = reverse_kl_loss(model, THEORY.action, 64, "path")[0]
    seen, kinds, stack = set(), collections.Counter(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds[type(node).__name__] += 1
        stack.extend(f for f, _ in node.next_functions)
    print(f"\n## the loss's autograd graph: {len(seen)} nodes")
    print(", ".join(f"{k} {v}" for k, v in kinds.most_common(12)))
    with profile() as prof:
        for _ in range(5):
            step()
    print("\n## torch.profiler, 5 steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def circular(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 1, 1, 1), mode="circular")


def fft_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The periodic 3x3 correlation as a product per frequency (the filter's transform included)."""
    n, c, L, _ = x.shape
    o = w.shape[0]
    k = torch.zeros(o, c, L, L)
    k[:, :, :3, :3] = w
    wf = torch.fft.rfft2(torch.roll(k, (-1, -1), (2, 3))).conj().permute(2, 3, 1, 0).reshape(-1, c, o)
    xf = torch.fft.rfft2(x).permute(2, 3, 0, 1).reshape(-1, n, c)
    y = torch.bmm(xf, wf).view(L, L // 2 + 1, n, o).permute(2, 3, 0, 1)
    return torch.fft.irfft2(y, s=(L, L))


def unfold_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n, _, L, _ = x.shape
    return (w.view(w.shape[0], -1) @ F.unfold(circular(x), 3)).view(n, -1, L, L)


def cat_pad(x: torch.Tensor) -> torch.Tensor:
    h = torch.cat([x[..., -1:, :], x, x[..., :1, :]], -2)
    return torch.cat([h[..., -1:], h, h[..., :1]], -1)


def copy_pad(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    out = x.new_empty(n, c, h + 2, w + 2)
    out[..., 1:-1, 1:-1] = x
    out[..., :1, 1:-1] = x[..., -1:, :]
    out[..., -1:, 1:-1] = x[..., :1, :]
    out[..., :, :1] = out[..., :, -2:-1]
    out[..., :, -1:] = out[..., :, 1:2]
    return out


class _FusedLipSwish(torch.autograd.Function):
    @staticmethod
    def forward(x, beta):
        sig = torch.sigmoid(beta * x)
        return x * sig / 1.1, sig

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, _):
        x, beta, sig = ctx.saved_tensors
        g_arg = g * x * sig * (1 - sig) / 1.1
        g_beta = (g_arg * x).sum((0, 2, 3), keepdim=True).view_as(beta) if ctx.needs_input_grad[1] else None
        return g * sig / 1.1 + g_arg * beta, g_beta


def conv_row(x: torch.Tensor, w: torch.Tensor) -> str:
    ref = F.conv2d(circular(x), w)
    last = x.contiguous(memory_format=torch.channels_last)
    row = {"pad + conv2d": median_us(lambda: F.conv2d(circular(x), w)),
           "fft": median_us(lambda: fft_conv(x, w)),
           "unfold + mm": median_us(lambda: unfold_conv(x, w)),
           "channels-last": median_us(lambda: F.conv2d(circular(last), w))}
    err = max(float((f(x, w) - ref).abs().max()) for f in (fft_conv, unfold_conv))
    return ", ".join(f"{k} {v:.1f}" for k, v in row.items()) + f" (max diff {err:.1e})"


def pad_row(x: torch.Tensor) -> str:
    assert torch.equal(cat_pad(x), circular(x)) and torch.equal(copy_pad(x), circular(x))
    return (f"F.pad {median_us(lambda: circular(x)):.1f}, two cats {median_us(lambda: cat_pad(x)):.1f}, "
            f"empty + copies {median_us(lambda: copy_pad(x)):.1f}")


def lipswish_row(f, h: torch.Tensor) -> str:
    def both():
        y = f(h)
        y.backward(torch.ones_like(y))

    def input_only():
        y = f(h)
        torch.autograd.grad(y, h, torch.ones_like(y))

    return (f"forward {median_us(lambda: f(h)):6.1f}, + backward (both) {median_us(both):6.1f}, "
            f"+ input gradient {median_us(input_only):6.1f}")


def alternatives() -> None:
    torch.manual_seed(0)
    print("\n## periodic convolution, batch 64, 8 x 8 (us; max |difference| to the library's)")
    for c_in, c_out in [(1, 8), (8, 8), (8, 2)]:
        print(f"{c_in}->{c_out}: {conv_row(torch.randn(64, c_in, 8, 8), torch.randn(c_out, c_in, 3, 3))}")
    print("\n## circular pad by 1 (us)")
    for shape in [(64, 1, 8, 8), (64, 8, 8, 8), (64, 64, 8, 8), (64, 8, 20, 20)]:
        print(f"{shape}: {pad_row(torch.randn(shape))}")
    print("\n## LipSwish on [64, 8, 8, 8], 8 one-channel fields (us)")
    act = LipSwish(8, 1)
    h = torch.randn(64, 8, 8, 8, requires_grad=True)
    beta = lambda: F.softplus(act.rho).view(-1, 1, 1)  # noqa: E731
    variants = {"library": act,
                "silu(beta x) / (1.1 beta)": lambda x: F.silu(beta() * x) / (1.1 * beta()),
                "autograd.Function": lambda x: _FusedLipSwish.apply(x, beta())[0]}
    ref = act(h)
    for name, f in variants.items():
        assert torch.allclose(f(h), ref, atol=1e-6)
        print(f"{name:28s} {lipswish_row(f, h)}")


def compiled_conditioners() -> None:
    _, eager = sampler()
    model, compiled = sampler()
    fn = torch.compile(Conditioner.forward, dynamic=False)  # one graph for all 16 conditioners
    for m in model.modules():
        if isinstance(m, Conditioner):
            m.forward = (lambda mod: lambda x: fn(mod, x))(m)
    print(f"\n## compiled conditioners: first step (cold compile) {compiled():.1f} s")
    times = {"eager": [], "compiled conditioners": []}
    for _ in range(40):
        times["eager"].append(eager())
        times["compiled conditioners"].append(compiled())
    for k, v in times.items():
        print(f"{k}: {statistics.median(v[5:]):.4f} s/step")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--compile", action="store_true", help="also time compiled conditioners (cold compile)")
    a = p.parse_args()
    print(header())
    profile_step()
    alternatives()
    if a.compile:
        compiled_conditioners()


if __name__ == "__main__":
    main()
