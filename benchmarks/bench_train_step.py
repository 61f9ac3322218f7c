"""Seconds per training step through ``train.py``, this checkout against another, runs alternated.

A step as a user meets it: the engine's whole step (loss, backward, clipping, Adam, Lipschitz
refresh, logging), read from each run's ``metrics.jsonl`` between two logged steps, so start-up and
the first steps (allocations, warm-up) are left out. Both runs train from one seed, so the script
also prints how far apart their logged curves are (loss, batch ESS, gradient norm...): zero where a
change only rearranges the same arithmetic, round-off where it reorders it. The other checkout
(``--ref``, for example a ``git worktree`` of an older commit) runs with its own ``gflows``
(``train.py``'s folder comes first on ``sys.path``) in the same interpreter and environment.
Rounds alternate the two, so a change in the machine's speed moves both, this checkout first in even
rounds and the other in odd ones.

    git worktree add /tmp/ref 36f5b53
    python benchmarks/bench_train_step.py --ref /tmp/ref --rounds 3 -- data=phi4 flow=lattice_coupling
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_checks import in_turn  # this folder, first on sys.path when run as a script
from bench_machine import header

ROOT = Path(__file__).resolve().parents[1]


def run(checkout: Path, overrides: list[str], steps: int, skip: int) -> tuple[float, list[dict]]:
    """One ``train.py`` run in ``checkout``: the mean seconds per step from step ``skip`` to
    ``steps``, and its logged rows."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, str(checkout / "train.py"), *overrides, f"trainer.steps={steps}",
               "trainer.eval_at_end=false", "wandb.mode=disabled",
               f"trainer.ckpt_every={steps + 1}", f"run_dir={run_dir}"]
        subprocess.run(cmd, cwd=checkout, check=True, capture_output=True, text=True,
                       env=os.environ | {"CI": "true"})
        rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    seconds = {r["step"]: r["seconds"] for r in rows if "seconds" in r}
    return (seconds[steps] - seconds[skip]) / (steps - skip), rows


def curve_differences(a: list[dict], b: list[dict]) -> str:
    """The largest difference of each logged figure between two runs, step by step."""
    keys = sorted(set(a[0]) & set(b[0]) - {"step", "seconds", "lr"})
    diffs = {k: max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True)) for k in keys}
    return ", ".join(f"{k} {d:.3g}" for k, d in diffs.items())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ref", type=Path, required=True, help="the other checkout (its train.py and gflows)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip", type=int, default=20, help="steps left out at the start")
    p.add_argument("overrides", nargs="*", help="train.py overrides, the same for both")
    a = p.parse_args()
    if not (a.ref / "train.py").exists():
        raise SystemExit(f"--ref {a.ref}: no train.py there")
    if not 0 < a.skip < a.steps:
        raise SystemExit(f"--skip {a.skip} must lie between 0 and --steps {a.steps}")
    print(header(f"train.py {' '.join(a.overrides)}; steps {a.skip}..{a.steps}, {a.rounds} "
                 "alternated rounds"), flush=True)
    times: dict[str, list[float]] = {"this checkout": [], f"ref {a.ref}": []}
    curves = []
    for i in range(a.rounds):
        for (name, ts), checkout in in_turn(zip(times.items(), (ROOT, a.ref), strict=True), i):
            seconds, rows = run(checkout, a.overrides, a.steps, a.skip)
            ts.append(seconds)
            curves.append(rows)
            print(f"round {i}: {name:30s} {ts[-1]:.4f} s/step", flush=True)
    print(f"largest differences of the two checkouts' curves (round 0): {curve_differences(*curves[:2])}")
    now, ref = (statistics.median(ts) for ts in times.values())
    print(f"median: this checkout {now:.4f} s/step, ref {ref:.4f} s/step: ref / this = {ref / now:.2f}x")


if __name__ == "__main__":
    main()
