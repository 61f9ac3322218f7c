"""Where an image model's training step goes: operator times next to normflows' Glow, and the
filter gathers.

Builds the run of ``train.py``'s overrides (the engine's own step, as ``bench_step_ab.py``) and
normflows' Glow of ``bench_cifar.py``, times blocks of steps of the two interleaved (s/step and
the ratio), then times every dispatched operator of a few steps of each with a
``TorchDispatchMode`` that wraps each call in ``perf_counter`` (``torch.profiler`` inflated these
steps about 3x on this CPU) and prints the costliest. ``--gathers`` instead times the model's orbit
filter gathers with their backward, as ``index_select`` of the flat index (the layer's) against
advanced indexing with the filter-shaped index (before 2026-12-06); ``--ema`` times the trainer's
weight average over the model's parameters, as one ``_foreach_lerp_`` (the trainer's) against two
in-place kernels per tensor (before 2026-12-06, second session); ``--flops`` counts the
floating-point operations of one training step of each model (``torch.utils.flop_counter``:
convolutions and matrix products with their backward), a figure of the architecture that does not
move with this machine's speed.

    python benchmarks/profile_image_step.py -- flow=g_coupling group=flip flow.hidden_channels=128 \\
        flow.block.activation=silu data.root=../shared/data/cifar10-subset data.verify=false \\
        trainer.batch_size=16
    python benchmarks/profile_image_step.py --shapes -- flow=g_residual group=d4 ...
    python benchmarks/profile_image_step.py --gathers -- flow=g_coupling group=flip ...
    python benchmarks/profile_image_step.py --ema -- flow=g_coupling group=flip ...
    python benchmarks/profile_image_step.py --flops -- flow=g_coupling group=flip ...
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import bench_checks  # this folder, first on sys.path when run as a script
import bench_cifar
import bench_step_ab
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from gflows.data.cifar10 import load_cifar10
from gflows.nn import gather as gather_module
from gflows.nn.equivariant import GConv2d
from gflows.training.ema import ema_update

# operators whose calls ``--shapes`` tells apart by their operands' shapes
_DENSE = ("aten.convolution.default", "aten.convolution_backward.default", "aten.mm.default",
          "aten.bmm.default")


class _OpTimes(TorchDispatchMode):
    def __init__(self, shapes: bool = False) -> None:
        super().__init__()
        self.shapes = shapes
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        key = str(func)
        if self.shapes and key in _DENSE:
            key += " " + " x ".join(str(tuple(t.shape)) for t in args[:3] if isinstance(t, torch.Tensor))
        self.seconds[key] += time.perf_counter() - t0
        self.calls[key] += 1
        return out


def glow_stepper(root: str, batch: int):
    """``block(n)``: ``n`` training steps of normflows' Glow (Adam, clipping) in seconds per step."""
    train_x, _ = load_cifar10(root, "train", verify=False, download=False)
    model = bench_cifar.normflows_glow()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)

    def block(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            loss = bench_cifar.glow_bpd(model, train_x[torch.randint(len(train_x), (batch,), generator=g)], g)
            opt.zero_grad()
            loss.mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return (time.perf_counter() - t0) / n

    return block


def profile(overrides: list[str], root: str, batch: int, rounds: int, top: int, shapes: bool = False) -> None:
    steppers = {"gflows": bench_step_ab.stepper(overrides, False), "Glow": glow_stepper(root, batch)}
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for f in steppers.values():
        f(5)
    for _ in range(rounds):
        for k, f in steppers.items():
            times[k].append(f(8))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"s/step (medians of {rounds} interleaved blocks of 8): gflows {med['gflows']:.3f}, Glow "
          f"{med['Glow']:.3f}: {med['gflows'] / med['Glow']:.2f}x Glow's")
    for name, f in steppers.items():
        ops = _OpTimes(shapes)
        with ops:
            f(3)
        total, calls = sum(ops.seconds.values()) / 3, sum(ops.calls.values()) // 3
        print(f"\n## {name}: {total * 1e3:.1f} ms of operators per step, {calls} calls")
        for op, s in sorted(ops.seconds.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{s / 3 * 1e3:8.2f} ms {ops.calls[op] / 3:7.1f} calls  {op}")


def flops(overrides: list[str], root: str, batch: int) -> None:
    """GFLOP of one training step of each model, in all and by operator."""
    steppers = {"gflows": bench_step_ab.stepper(overrides, False), "Glow": glow_stepper(root, batch)}
    totals = {}
    for name, f in steppers.items():
        f(2)  # past the first step's one-off work (ActNorm's data-dependent start)
        counter = FlopCounterMode(display=False)
        with counter:
            f(1)
        totals[name] = counter.get_total_flops()
        by_op = counter.get_flop_counts()["Global"]
        ops = ", ".join(f"{str(op).split('.')[1]} {n / 1e9:.2f}" for op, n in
                        sorted(by_op.items(), key=lambda kv: -kv[1]))
        print(f"{name}: {totals[name] / 1e9:.2f} GFLOP per step ({ops})")
    print(f"gflows / Glow: {totals['gflows'] / totals['Glow']:.2f}")


def _indexed(ctx, weights, index):  # the gather before 2026-12-06
    ctx.save_for_backward(index)
    ctx.n = weights.shape[0]
    return weights[index]


def gathers(overrides: list[str], repeats: int) -> None:
    stepper = bench_step_ab.stepper(overrides, False)
    stepper(1)
    model = stepper.model
    convs = [m for m in model.modules() if isinstance(m, GConv2d) and m.basis == "orbit"]

    def once() -> None:
        filters = [c.expanded()[0] for c in convs]
        torch.autograd.backward([w.sum() for w in filters])

    layer = gather_module._Gather.forward

    def using(forward):
        def run() -> None:
            gather_module._Gather.forward = staticmethod(forward)
            once()
        return run

    try:
        ways = {"index_select (the layer)": using(layer), "advanced indexing": using(_indexed)}
        ms = bench_checks.alternated(ways, repeats)
    finally:
        gather_module._Gather.forward = layer
    print(f"{len(convs)} orbit-basis convolutions; ms per step's gathers with their backward (medians "
          f"of {repeats}, alternated):")
    for name, t in ms.items():
        print(f"  {name:26s} {t:.2f}")
    print(f"  the layer / advanced indexing: {ms['index_select (the layer)'] / ms['advanced indexing']:.2f}")


def ema(overrides: list[str], repeats: int, decay: float = 0.99) -> None:
    stepper = bench_step_ab.stepper(overrides, False)
    stepper(1)
    params = [p for p in stepper.model.parameters() if p.requires_grad]
    avg = [p.detach().clone() for p in params]

    def per_tensor() -> None:  # the trainer's loop before
        with torch.no_grad():
            for e, p in zip(avg, params, strict=True):
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)

    ms = bench_checks.alternated({"foreach lerp (the trainer)": lambda: ema_update(avg, params, decay),
                      "mul_ + add_ per tensor": per_tensor}, repeats)
    print(f"{len(params)} parameter tensors, {sum(p.numel() for p in params):,} numbers; ms per update "
          f"(medians of {repeats}, alternated):")
    for name, t in ms.items():
        print(f"  {name:28s} {t:.3f}")
    new, old = ms.values()
    print(f"  foreach / per tensor: {new / old:.2f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gathers", action="store_true", help="time the filter gathers only")
    p.add_argument("--ema", action="store_true", help="time the weight average only")
    p.add_argument("--flops", action="store_true", help="count one step's FLOPs of each model")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--shapes", action="store_true",
                   help="tell convolutions and matrix products apart by their operands' shapes")
    p.add_argument("overrides", nargs="*", help="train.py overrides of the gflows model")
    a = p.parse_args()
    if a.gathers:
        gathers(a.overrides, a.repeats)
        return
    if a.ema:
        ema(a.overrides, a.repeats)
        return
    root = next((o.split("=", 1)[1] for o in a.overrides if o.startswith("data.root=")), None)
    batch = next((int(o.split("=", 1)[1]) for o in a.overrides if o.startswith("trainer.batch_size=")), 16)
    if root is None:
        raise SystemExit("give data.root=<the CIFAR-10 folder> among the overrides (Glow trains on it too)")
    if a.flops:
        flops(a.overrides, root, batch)
        return
    profile(a.overrides, root, batch, a.rounds, a.top, a.shapes)


if __name__ == "__main__":
    main()
