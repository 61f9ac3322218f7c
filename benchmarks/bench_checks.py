"""The layers' finiteness check: one sum read back (what ``gflows._checks.check_finite`` does),
against ``isfinite(x).all()`` and against the ``aminmax`` pass it used before, on a layer input of
each kind, median of 50.

    python benchmarks/bench_checks.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from bench_machine import header  # this folder, first on sys.path when run as a script

from gflows._checks import check_finite

T = TypeVar("T")


def median_us(f, repeats: int = 50, warmup: int = 3) -> float:
    """The median time of ``f()`` in microseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def in_turn(items: Iterable[T], round_: int) -> list[T]:
    """``items`` in order on even rounds and reversed on odd ones, for interleaved timing loops: the
    one timed right after another pays for the caches that one left, and a fixed order favoured the
    first-timed of two copies of the same butterfly layer by up to 1.34x (RESULTS.md, 2026-12-07)."""
    items = list(items)
    return items if round_ % 2 == 0 else items[::-1]


def alternated(ways: dict[str, Callable[[], object]], repeats: int, warmup: int = 3,
               reset: Callable[[], object] | None = None) -> dict[str, float]:
    """Median milliseconds of each way, called in turn (this machine's speed moves within seconds,
    so the ways alternate call by call, in the order of :func:`in_turn`), after ``warmup`` rounds;
    ``reset()`` runs untimed before every call."""
    ts: dict[str, list[float]] = {k: [] for k in ways}
    for i in range(repeats + warmup):
        for name, f in in_turn(ways.items(), i):
            if reset is not None:
                reset()
            t0 = time.perf_counter()
            f()
            if i >= warmup:
                ts[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in ts.items()}


def main() -> None:
    print(header())
    print(f"{'input':>18} {'isfinite.all us':>16} {'aminmax us':>11} {'check_finite us':>16} {'ratio':>7}")
    for shape in [(64, 1, 8, 8), (64, 512), (16, 3, 32, 32), (16, 12, 16, 16), (4096, 512)]:
        x = torch.randn(*shape)
        old = median_us(lambda x=x: bool(torch.isfinite(x).all()))
        minmax = median_us(lambda x=x: bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()))
        new = median_us(lambda x=x: check_finite(x))
        print(f"{str(shape):>18} {old:16.1f} {minmax:11.1f} {new:16.1f} {old / new:7.2f}")


if __name__ == "__main__":
    main()
