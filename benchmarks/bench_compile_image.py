"""``torch.compile`` of an image model's training step against the eager step, on this machine.

Builds ``train.py``'s image model for the given overrides, wraps its transform in
``gflows.Compiled`` (parameters shared, the base distribution eager) and times, interleaved, the
training step (``-log p`` of a batch of CIFAR-sized integer images, backward) of the eager and the
compiled model after the cold compile. Prints the cold compile (the first compiled step, with every
recompile it triggers), the steps that still recompiled (the residual blocks' Russian roulette draws
a new number of series terms each step, and each count is a new graph), the steady seconds per step
of each, and the break-even: the number of steady steps after which the compiled run would have
caught up with the eager one (none where compiled steps are not faster). Also the largest difference
between the compiled and eager transform on one fixed dequantised batch in eval mode (exact for
coupling models; residual blocks draw their probes and roulette from the random stream, which a
compiled graph consumes differently, so there it measures the estimators' spread, not an error).

    python benchmarks/bench_compile_image.py --steps 10 -- flow=g_coupling group=flip \
        flow.hidden_channels=128 flow.n_scales=3 flow.blocks_per_scale=4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_machine import header  # this folder, first on sys.path when run as a script
from hydra import compose, initialize_config_dir

from gflows.flow import Compiled, Compose, Flow
from gflows.models.config import image_model_from_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="steady steps timed per model and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warm", type=int, default=10, help="compiled steps after the first, before timing")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    print(header(f"overrides {a.overrides}"))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=["data=cifar10", *a.overrides])
    torch.manual_seed(0)
    model = image_model_from_config(cfg.flow, cfg.data.shape, cfg.data.alpha, cfg.data.levels)
    x = torch.randint(0, 256, (a.batch, *cfg.data.shape)).float()
    with torch.no_grad():
        model.log_prob(x)  # ActNorm's data-dependent initialisation
    compiled = Flow(Compiled(model.transform), model.base)
    params = sum(q.numel() for q in model.parameters())

    def step(m: Flow) -> float:
        t0 = time.perf_counter()
        loss = -m.log_prob(x).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    model.train()
    cold = step(compiled)
    warm = [step(compiled) for _ in range(a.warm)]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(a.rounds):
        for name, m in (("eager", model), ("compiled", compiled)):
            times[name] += [step(m) for _ in range(a.steps)]
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    slow = [round(t, 1) for t in warm if t > 5 * med["compiled"]]
    print(f"{params} parameters, batch {a.batch}: cold compile (first step) {cold:.1f} s; "
          f"{len(slow)} of the next {a.warm} compiled steps recompiled ({slow} s)")
    print(f"steady s/step: eager {med['eager']:.4f}, compiled {med['compiled']:.4f} "
          f"(compiled / eager {med['compiled'] / med['eager']:.3f}; medians of {a.rounds * a.steps})")
    saved = med["eager"] - med["compiled"]
    if saved > 0:
        print(f"break-even after {(cold + sum(warm)) / saved:.0f} steps")
    else:
        print("break-even: none (compiled steps are not faster)")
    model.eval()
    rest = Compose(*model.transform.transforms[1:])  # the transform after Dequantize, whose noise is random
    y = torch.rand(a.batch, *cfg.data.shape)  # a dequantised batch in [0, 1)
    outs = []
    with torch.no_grad():
        for t in (rest, Compiled(rest)):
            torch.manual_seed(1)
            outs.append(t(y))
    (z0, ld0), (z1, ld1) = outs
    print(f"eval-mode transform after dequantisation, compiled - eager: outputs "
          f"{float((z1 - z0).abs().max()):.2e}, log-dets {float((ld1 - ld0).abs().max()):.2e} "
          f"(of {float(ld0.abs().max()):.3e})")

if __name__ == "__main__":
    main()
