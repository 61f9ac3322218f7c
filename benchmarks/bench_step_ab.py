"""Two settings of one image model's training step, side by side in one process, blocks alternated.

Builds the run of ``train.py``'s overrides twice (``--a`` and ``--b`` add overrides to each), each
with the engine's own step (loss, backward, clipping, fused Adam, Lipschitz refresh, EMA), and
alternates blocks of steps between the two, so that a change in the machine's speed moves both
(A first in even rounds, B in odd ones; before 2026-12-07 A always went first).
``--a-before NAMES`` runs model A with the code before the named changes (``legacy_step.py``:
the residual step's changes of 2026-12-07). ``--a-plain-layout`` keeps model A's residual branches
in the plain (NCHW) layout where they would run channels-last
(``GConvNet.prefers_channels_last``). Prints each block's seconds per step and the ratio of the
medians. Also the residual branch alone (``--layout``): one block's training work
(g, two vector-Jacobian products of the series, the surrogate's Jacobian-vector product, backward)
with plain 3x3 / 1x1 / 3x3 convolutions and tanh, NCHW against channels-last, at the flagship's
three scales.

    python benchmarks/bench_step_ab.py --b flow.block.n_exact_terms=1 -- flow=g_residual group=flip ...
    python benchmarks/bench_step_ab.py --a-plain-layout -- flow=g_residual group=flip ...
    python benchmarks/bench_step_ab.py --a-before power,tanh,rows,adjoint -- flow=g_residual ...
    python benchmarks/bench_step_ab.py --layout
    python benchmarks/bench_step_ab.py --losses 100 --rounds 24 --steps 25 \
        --b flow.dequantization=variational -- flow=g_coupling group=flip ...

``--losses N`` also prints both models' mean training loss over every ``N`` steps (the same seed,
hence the same batches): a comparison at equal steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import bench_checks  # this folder, first on sys.path when run as a script
import legacy_step
import torch
import torch.nn.functional as F
from bench_machine import header  # this folder, first on sys.path when run as a script
from hydra import compose, initialize_config_dir

from gflows.nn.equivariant import GConvNet
from gflows.training.engine import Engine
from gflows.training.images import ImageTask

ROOT = Path(__file__).resolve().parents[1]


def stepper(overrides: list[str], plain_layout: bool, losses: list[float] | None = None):
    """A function ``block(n)`` that trains ``n`` steps of the run and returns seconds per step
    (the learning rate warmed up over ``trainer.warmup_steps``, then constant); each step's
    training loss is appended to ``losses``. ``block.model`` is the model it trains."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", [*overrides, "wandb.mode=disabled", f"run_dir={tempfile.mkdtemp()}"])
    torch.manual_seed(cfg.seed)
    task = ImageTask(cfg)
    engine = Engine(task, cfg)
    task.prepare(engine.dd)
    if cfg.trainer.ema_decay is not None:
        engine.ema = {k: p.detach().clone() for k, p in engine.model.named_parameters()}
    engine.model.train()
    if plain_layout:
        for m in engine.model.modules():
            if isinstance(m, GConvNet):
                m.CHANNELS_LAST_PIXELS = 10**9
    step = [0]

    def block(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            out = task.loss(step[0], engine.dd)
            engine._update(out, cfg.trainer.lr * min(1.0, (step[0] + 1) / max(1, cfg.trainer.warmup_steps)))
            if losses is not None:
                losses.append(float(out.loss))
            step[0] += 1
        return (time.perf_counter() - t0) / n

    block.model = engine.model
    return block


def branch_ms(channels_last: bool, c: int, hw: int, hidden: int = 128, batch: int = 16,
              repeats: int = 15) -> float:
    """Median milliseconds of one residual branch's training work (see the module docstring)."""
    torch.manual_seed(0)
    w1, w2, w3 = (torch.randn(*s, requires_grad=True) for s in
                  ((hidden, c, 3, 3), (hidden, hidden, 1, 1), (c, hidden, 3, 3)))
    x = torch.randn(batch, c, hw, hw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def conv(t, w):
        return F.conv2d(t, w, padding=w.shape[-1] // 2)

    def once() -> None:
        xx = x.contiguous(memory_format=fmt).requires_grad_(True)
        a1 = torch.tanh(conv(xx, w1))
        a2 = torch.tanh(conv(a1, w2))
        g = conv(a2, w3)
        adj = [w.detach().transpose(0, 1).flip(2, 3).contiguous() for w in (w1, w2, w3)]
        v = torch.randn(x.shape).contiguous(memory_format=fmt)
        u, w = v, v
        with torch.no_grad():
            for _ in range(2):
                t = torch.ops.aten.tanh_backward(conv(w, adj[2]), a2)
                w = conv(torch.ops.aten.tanh_backward(conv(t, adj[1]), a1), adj[0])
                u = u - w
        t = torch.ops.aten.tanh_backward(conv(v, w1), a1)
        jv = conv(torch.ops.aten.tanh_backward(conv(t, w2), a2), w3)
        ((g * g).sum() + (u * jv).sum()).backward()

    return bench_checks.median_us(once, repeats=repeats, warmup=3) / 1e3


def _before(block, names: list[str]):
    """``block`` run with the code before the changes ``names`` (``legacy_step.before``)."""
    def run(n: int) -> float:
        with legacy_step.before(names):
            return block(n)

    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--a", nargs="*", default=[], help="overrides of model A only")
    p.add_argument("--b", nargs="*", default=[], help="overrides of model B only")
    p.add_argument("--a-plain-layout", action="store_true", help="model A never channels-last")
    p.add_argument("--a-before", default="", metavar="NAMES",
                   help="model A with the code before these changes (legacy_step.py), comma-separated")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=15, help="steps per block")
    p.add_argument("--layout", action="store_true", help="the residual branch alone, both layouts")
    p.add_argument("--losses", type=int, default=0, metavar="N",
                   help="also print both models' mean training loss over every N steps (equal steps)")
    p.add_argument("overrides", nargs="*", help="train.py overrides of both")
    a = p.parse_args()
    print(header(), flush=True)
    if a.layout:
        for c, hw in ((12, 16), (48, 8), (192, 4)):
            pairs = [(branch_ms(False, c, hw), branch_ms(True, c, hw)) for _ in range(3)]
            ratio = statistics.median(cl / plain for plain, cl in pairs)
            shown = ", ".join(f"{x:.2f} / {y:.2f}" for x, y in pairs)
            print(f"{c} x {hw} x {hw}: NCHW / channels-last ms {shown}; channels-last / NCHW {ratio:.3f}",
                  flush=True)
        return
    before = f" (before {a.a_before})" if a.a_before else ""
    print(f"# train.py {' '.join(a.overrides)}; A: {' '.join(a.a) or '-'}"
          f"{' (plain layout)' if a.a_plain_layout else ''}{before}; B: {' '.join(a.b) or '-'}", flush=True)
    loss_a: list[float] = []
    loss_b: list[float] = []
    model_a = stepper([*a.overrides, *a.a], a.a_plain_layout, loss_a)
    model_b = stepper([*a.overrides, *a.b], False, loss_b)
    if a.a_before:
        model_a = _before(model_a, a.a_before.split(","))
    if not a.losses:  # warm-up steps, left out of the timing (with --losses every step counts)
        model_a(5)
        model_b(5)
    times_a, times_b = [], []
    for r in range(a.rounds):
        for model, times in bench_checks.in_turn(((model_a, times_a), (model_b, times_b)), r):
            times.append(model(a.steps))
        done = (r + 1) * a.steps
        if a.losses and done % a.losses == 0:
            ma, mb = statistics.mean(loss_a[-a.losses:]), statistics.mean(loss_b[-a.losses:])
            sa, sb = statistics.median(times_a), statistics.median(times_b)
            print(f"steps {done - a.losses + 1}-{done}: mean loss A {ma:.4f} B {mb:.4f} "
                  f"B - A {mb - ma:+.4f}; s/step so far A {sa:.3f} B {sb:.3f}", flush=True)
    print("A s/step: " + " ".join(f"{t:.3f}" for t in times_a))
    print("B s/step: " + " ".join(f"{t:.3f}" for t in times_b))
    ma, mb = statistics.median(times_a), statistics.median(times_b)
    print(f"median A {ma:.4f} s/step, B {mb:.4f} s/step: B / A = {mb / ma:.3f}")


if __name__ == "__main__":
    main()
