"""A 1x1 convolution as ``F.conv2d`` against gflows' batched matrix product (what
``GConv2d.conv`` runs for 1x1 filters on the CPU): forward plus backward (input, filter and bias
gradients), interleaved, median milliseconds, at the hidden widths of the CIFAR models.

    python benchmarks/bench_pointwise.py [--repeats 40] [--channels 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from gflows.nn.equivariant import _pointwise


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, GPU: no; batch {a.batch}, {a.channels} -> {a.channels} "
          "channels")
    print(f"{'H x W':>8} {'conv2d ms':>10} {'bmm ms':>8} {'conv2d / bmm':>13}")
    c = a.channels
    for hw in (32, 16, 8, 4):
        x = torch.randn(a.batch, c, hw, hw, requires_grad=True)
        w = torch.randn(c, c, 1, 1, requires_grad=True)
        b = torch.randn(c, requires_grad=True)
        g = torch.randn(a.batch, c, hw, hw)
        fns = {"conv2d": lambda x=x, w=w, b=b, g=g: F.conv2d(x, w, b).backward(g),
               "bmm": lambda x=x, w=w, b=b, g=g: _pointwise(x, w, b).backward(g)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(a.repeats + 5):
            for k, f in fns.items():
                x.grad = w.grad = b.grad = None
                t0 = time.perf_counter()
                f()
                if i >= 5:
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{hw:>3} x {hw:<3} {med['conv2d']:10.3f} {med['bmm']:8.3f} {med['conv2d'] / med['bmm']:13.2f}")


if __name__ == "__main__":
    main()
