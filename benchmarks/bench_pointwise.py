"""A 1x1 convolution as ``F.conv2d`` against gflows' batched matrix product (what
``GConv2d.conv`` runs for 1x1 filters on the CPU): forward plus backward (input, filter and bias
gradients), interleaved, median milliseconds, at the hidden widths of the CIFAR models. ``--tanh``:
float32 ``torch.tanh`` against :func:`gflows.nn.tanh.tanh` (the logistic form) at the CIFAR
flagship's hidden shapes, forward alone and forward plus backward, and the largest absolute error
of each against float64 ``tanh``.

    python benchmarks/bench_pointwise.py [--repeats 40] [--channels 128]
    python benchmarks/bench_pointwise.py --tanh
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from bench_checks import alternated  # this folder, first on sys.path when run as a script
from bench_machine import header

from gflows.nn.equivariant import _pointwise
from gflows.nn.tanh import tanh


def tanh_table(repeats: int) -> None:
    print(f"{'shape':>18} {'pass':>9} {'torch.tanh ms':>14} {'gflows tanh ms':>15} {'ratio':>6}")
    for shape in ((16, 128, 16, 16), (16, 128, 8, 8), (16, 192, 4, 4)):
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        xg, g = x.clone().requires_grad_(True), torch.randn_like(x)
        passes = (("forward", {"torch": lambda x=x: torch.tanh(x), "gflows": lambda x=x: tanh(x)}),
                  ("with bwd", {"torch": lambda xg=xg, g=g: torch.tanh(xg).backward(g),
                                "gflows": lambda xg=xg, g=g: tanh(xg).backward(g)}))
        for label, fns in passes:
            med = alternated(fns, repeats, 5, lambda xg=xg: setattr(xg, "grad", None))
            print(f"{str(shape):>18} {label:>9} {med['torch']:14.3f} {med['gflows']:15.3f} "
                  f"{med['torch'] / med['gflows']:6.2f}")
    x = torch.linspace(-30, 30, 2_000_001)
    ref = torch.tanh(x.double())
    errors = [float((f(x).double() - ref).abs().max()) for f in (torch.tanh, tanh)]
    print(f"max |error| against float64 tanh on [-30, 30]: torch.tanh {errors[0]:.2e}, "
          f"gflows {errors[1]:.2e}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--channels", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tanh", action="store_true", help="time tanh's two forms instead")
    a = p.parse_args()
    torch.manual_seed(0)
    print(header(f"batch {a.batch}, {a.channels} -> {a.channels} channels"))
    if a.tanh:
        tanh_table(a.repeats)
        return
    print(f"{'H x W':>8} {'conv2d ms':>10} {'bmm ms':>8} {'conv2d / bmm':>13}")
    c = a.channels
    for hw in (32, 16, 8, 4):
        x = torch.randn(a.batch, c, hw, hw, requires_grad=True)
        w = torch.randn(c, c, 1, 1, requires_grad=True)
        b = torch.randn(c, requires_grad=True)
        g = torch.randn(a.batch, c, hw, hw)
        fns = {"conv2d": lambda x=x, w=w, b=b, g=g: F.conv2d(x, w, b).backward(g),
               "bmm": lambda x=x, w=w, b=b, g=g: _pointwise(x, w, b).backward(g)}
        med = alternated(fns, a.repeats, 5, lambda ts=(x, w, b): [setattr(t, "grad", None) for t in ts])
        print(f"{hw:>3} x {hw:<3} {med['conv2d']:10.3f} {med['bmm']:8.3f} {med['conv2d'] / med['bmm']:13.2f}")


if __name__ == "__main__":
    main()
