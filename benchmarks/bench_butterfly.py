"""Butterfly channel mixing vs a dense LU-parametrised mix (Glow / nflows LULinear) vs a dense
matrix with torch.linalg.slogdet: forward with log-det plus inverse, for n = 64 .. 4096.

All run interleaved in one process on the same inputs; the script prints median times, the
speed-ups and the fitted scaling exponent ``t ~ n^p`` of each. ``--compiled`` adds the butterfly
through ``gflows.Compiled`` and nflows' LU layer through ``torch.compile`` (like with like), with
each one's cold compile time. ``--paths`` adds the butterfly's two computations forced (the factors
one by one, and the grouped dense blocks; the layer picks by the rows, ``FACTOR_SPAN``), the mixing
alone in both directions. ``--ref DIR`` adds the layer of another checkout (``DIR`` a git worktree:
its ``gflows/transforms/butterfly.py``, same weights), timed in the same loop; with ``--images`` it
also times both on image batches ``[B, C, H, W]`` (channel mixing, as in the Glow-type models),
with ``--vectors`` on vector batches of several sizes, the two layers alone, and with ``--train``
both in a training step (forward with log-det and backward). Every loop takes its ways in reverse
order every other repeat: timed in a fixed order, two copies of the same layer differed by
1.15-1.34x (2026-12-07), the one timed after nflows' LU and the dense solve the slower.

    python benchmarks/bench_butterfly.py [--rows 64] [--repeats 7] [--compiled] [--paths] [--ref DIR]
        [--images] [--vectors] [--train]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import time

import torch
from bench_checks import in_turn  # this folder, first on sys.path when run as a script
from bench_machine import header
from nflows.transforms.lu import LULinear

from gflows.flow import Compiled
from gflows.transforms.butterfly import Butterfly


def dense_step(w: torch.Tensor, x: torch.Tensor) -> None:
    y = x @ w.T
    ld = torch.linalg.slogdet(w).logabsdet
    xr = torch.linalg.solve(w, y.T).T
    _ = ld, xr


def reference_class(checkout: str) -> type:
    """The ``Butterfly`` class of another checkout's module (it needs only ``gflows.flow``)."""
    path = os.path.join(checkout, "gflows", "transforms", "butterfly.py")
    spec = importlib.util.spec_from_file_location("reference_butterfly", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Butterfly


VECTOR_SHAPES = [(64, 512), (256, 512), (1024, 512), (4096, 512), (64, 1024), (256, 2048)]
IMAGE_SHAPES = [(16, 12, 16, 16), (16, 48, 8, 8), (16, 192, 4, 4), (16, 512, 4, 4), (4, 512, 2, 2)]
TRAIN_SHAPES = [(64, 512), (16, 48, 8, 8), (16, 512, 4, 4), (4096, 512)]


def _apply_both(m, x: torch.Tensor) -> None:
    m(x), m.inverse(x)


def _train_step(m, x: torch.Tensor) -> None:
    y, ld = m(x)
    (y.square().sum() - ld.sum()).backward()
    m.weight.grad = None


def against_ref(ref_class: type, repeats: int, shapes: list[tuple[int, ...]], title: str,
                train: bool = False) -> None:
    """This checkout's layer against the reference's, alone and interleaved, each first in turn
    (median ms): on ``shapes``, forward with log-det plus inverse; or (``train``) in a training
    step, forward with log-det then backward of ``sum(y^2) - log det`` to the weights."""
    step = _train_step if train else torch.no_grad()(_apply_both)
    print(f"{title:>20} {'rows':>6} {'layer ms':>9} {'ref ms':>9} {'ref/layer':>10}")
    for shape in shapes:
        layer = Butterfly(shape[1:])
        ref = ref_class(shape[1:])
        ref.load_state_dict(layer.state_dict())
        x = torch.randn(*shape)
        times: dict[str, list[float]] = {"layer": [], "ref": []}
        for i in range(repeats + 3):
            for k, m in in_turn((("ref", ref), ("layer", layer)), i):
                t0 = time.perf_counter()
                step(m, x)
                if i >= 3:
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows = shape[0] * math.prod(shape[2:])
        ratio = med["ref"] / med["layer"]
        print(f"{str(shape):>20} {rows:6d} {med['layer']:9.3f} {med['ref']:9.3f} {ratio:10.2f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=64, help="batch rows (pixels x images)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--compiled", action="store_true", help="add compiled butterfly and LU columns")
    p.add_argument("--paths", action="store_true", help="add the factor-by-factor and block paths, forced")
    p.add_argument("--ref", help="a checkout whose butterfly layer is timed beside this one's")
    p.add_argument("--images", action="store_true", help="with --ref: image batches as well")
    p.add_argument("--train", action="store_true", help="with --ref: training steps (with backward) as well")
    p.add_argument("--vectors", action="store_true",
                   help="with --ref: vector batches (rows x n) as well, the two layers alone")
    a = p.parse_args()
    ref_class = reference_class(a.ref) if a.ref else None
    torch.manual_seed(0)
    print(header(f"rows {a.rows}, median of {a.repeats}"))
    names = ["butterfly", "lu", "dense"] + (["butterfly_c", "lu_c"] if a.compiled else []) + (
        ["by_factor", "by_blocks"] if a.paths else []) + (["ref"] if a.ref else [])
    ratios = f" {'LU/bfly':>9} {'dense/bfly':>11}" + (f" {'ref/bfly':>9}" if a.ref else "")
    if a.compiled:
        ratios += f" {'LU/bfly_c':>10} {'LU_c/bfly_c':>12}"
    print(f"{'n':>6}" + "".join(f" {k + ' ms':>14}" for k in names) + ratios)
    res: dict[str, list[float]] = {k: [] for k in names}
    with torch.no_grad():
        for n in a.sizes:
            bf, lu = Butterfly((n,)), LULinear(n, identity_init=False)
            w = torch.linalg.qr(torch.randn(n, n))[0]
            x = torch.randn(a.rows, n)
            fns = {
                "butterfly": lambda bf=bf, x=x: (bf(x), bf.inverse(x)),
                "lu": lambda lu=lu, x=x: (lu(x), lu.inverse(x)),
                "dense": lambda w=w, x=x: dense_step(w, x),
            }
            cols = x.T.contiguous()  # the layer's layout: the mixed axis first
            for name, forced in (("by_factor", True), ("by_blocks", False)) if a.paths else ():
                fns[name] = lambda bf=bf, c=cols, f=forced: (bf._mix(c, False, f), bf._mix(c, True, f))
            if ref_class is not None:
                ref = ref_class((n,))
                ref.load_state_dict(bf.state_dict())
                fns["ref"] = lambda ref=ref, x=x: (ref(x), ref.inverse(x))
            if a.compiled:
                bfc = Compiled(bf, dynamic=False)
                luf, lui = torch.compile(lu.forward, dynamic=False), torch.compile(lu.inverse, dynamic=False)
                fns["butterfly_c"] = lambda bfc=bfc, x=x: (bfc(x), bfc.inverse(x))
                fns["lu_c"] = lambda luf=luf, lui=lui, x=x: (luf(x), lui(x))
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                if k.endswith("_c"):
                    print(f"# n {n}: {k} cold compile {time.perf_counter() - t0:.1f} s")
            times = {k: [] for k in fns}
            for r in range(a.repeats):
                for k, f in in_turn(fns.items(), r):
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            for k in res:
                res[k].append(med[k])
            line = f"{n:6d}" + "".join(f" {med[k] * 1e3:14.3f}" for k in names)
            line += f" {med['lu'] / med['butterfly']:9.2f} {med['dense'] / med['butterfly']:11.2f}"
            if a.ref:
                line += f" {med['ref'] / med['butterfly']:9.2f}"
            if a.compiled:
                line += f" {med['lu'] / med['butterfly_c']:10.2f} {med['lu_c'] / med['butterfly_c']:12.2f}"
            print(line)
    for wanted, shapes, title, train in ((a.vectors, VECTOR_SHAPES, "vector batch", False),
                                         (a.images, IMAGE_SHAPES, "image batch", False),
                                         (a.train, TRAIN_SHAPES, "training step", True)):
        if ref_class is not None and wanted:
            against_ref(ref_class, a.repeats, shapes, title, train)
    logn = [math.log(n) for n in a.sizes]
    for k, v in res.items() if len(a.sizes) > 1 else ():
        ly = [math.log(t) for t in v]
        mx, my = statistics.mean(logn), statistics.mean(ly)
        slope = sum((u - mx) * (w_ - my) for u, w_ in zip(logn, ly, strict=True)) / sum(
            (u - mx) ** 2 for u in logn)
        print(f"fitted exponent {k:10s} t ~ n^{slope:.2f}")


if __name__ == "__main__":
    main()
