"""Time one training step of a G-residual block: D4 vs trivial group vs normflows' Residual.

One step = forward with the stochastic log-det estimate, backward, Adam step (and so the
spectral-norm refresh that the next forward does). gflows refreshes by power iteration to a
tolerance by default; normflows' LipschitzCNN does 5 iterations per forward, so the
"5 power its/step" rows (``lipschitz_kwargs={"train_iters": 5}``, the image configs' default) run
gflows at the same budget for a like-for-like comparison.
All models run interleaved in one process, round by round, on the same inputs, in reverse order every
other round (before 2026-12-07 the order was fixed, gflows' blocks first); the script prints median
seconds per step and the ratios.

    python benchmarks/bench_residual_block.py [--batch 16] [--size 32] [--hidden 64] [--rounds 15]
        [--basis auto|escnn]   # the gflows filters: one weight per orbit (the default) or escnn's basis
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_checks import in_turn  # this folder, first on sys.path when run as a script
from bench_machine import header

from gflows.nn.lipschitz import LipschitzGConv2d, operator_norm
from gflows.transforms.residual import GResidualBlock


def certified_excess(block: GResidualBlock, hw: int) -> float:
    """``max(sigma / input_scale - c)`` over the block's convolutions in evaluation mode (the bound
    each convolution contributes to Lip(g)), every operator norm measured afresh (power iteration
    from a new random start to 1e-6), not read off the layer."""
    block.eval()
    worst = -float("inf")
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, LipschitzGConv2d):
                w, _ = m.normalised()
                sigma = operator_norm(lambda u, m=m, w=w: m.conv(u, w), (1, m.in_channels, hw, hw), tol=1e-6,
                                      generator=torch.Generator().manual_seed(1))
                # a filter after an unscaled LipSwish carries its 1 / 1.1 (input_scale)
                worst = max(worst, sigma / m.input_scale - m.coeff)
    block.train()
    return worst


def gflows_block(group: str, shape, hidden: int, memory_saving: bool, train_iters: int | None = None,
                 basis: str = "auto"):
    order = {"trivial": 1, "c4": 4, "d4": 8}[group]
    lip = {"train_iters": train_iters} if train_iters else None
    return GResidualBlock(group, shape, hidden_fields=hidden // order, memory_saving=memory_saving,
                          lipschitz_kwargs=lip, basis=basis)


def normflows_block(shape, hidden: int, reduce_memory: bool = True):
    import normflows as nf

    net = nf.nets.LipschitzCNN([shape[0], hidden, hidden, shape[0]], [3, 1, 3], lipschitz_const=0.98,
                               init_zeros=False)
    return nf.flows.Residual(net, reduce_memory=reduce_memory, n_exact_terms=2)


def step_fn(model, kind: str):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(x):
        if kind == "normflows":
            z, ld = model.inverse(x)  # normflows: inverse is the data -> noise direction
        else:
            z, ld = model(x)
        loss = (0.5 * z.pow(2).flatten(1).sum(1) - ld).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--basis", default="auto", choices=["auto", "escnn"])
    a = p.parse_args()
    torch.manual_seed(0)
    shape = (3, a.size, a.size)
    models = {
        "gflows d4": (gflows_block("d4", shape, a.hidden, False, basis=a.basis), "gflows"),
        "gflows trivial": (gflows_block("trivial", shape, a.hidden, False, basis=a.basis), "gflows"),
        "gflows d4 (memory saving)": (gflows_block("d4", shape, a.hidden, True, basis=a.basis), "gflows"),
        "gflows trivial (memory saving)": (gflows_block("trivial", shape, a.hidden, True, basis=a.basis),
                                           "gflows"),
        "gflows d4 (5 power its/step)": (gflows_block("d4", shape, a.hidden, True, 5, a.basis), "gflows"),
        "gflows trivial (5 power its/step)": (gflows_block("trivial", shape, a.hidden, True, 5, a.basis),
                                              "gflows"),
        "gflows trivial (5 its, no saving)": (gflows_block("trivial", shape, a.hidden, False, 5, a.basis),
                                              "gflows"),
        "gflows trivial (1 it, no saving)": (gflows_block("trivial", shape, a.hidden, False, 1, a.basis),
                                             "gflows"),
        "gflows d4 (1 it, no saving)": (gflows_block("d4", shape, a.hidden, False, 1, a.basis), "gflows"),
        "normflows Residual+LipschitzCNN": (normflows_block(shape, a.hidden), "normflows"),
        "normflows (no memory saving)": (normflows_block(shape, a.hidden, False), "normflows"),
    }
    steps = {k: step_fn(m, kind) for k, (m, kind) in models.items()}
    x = torch.randn(a.batch, *shape)
    for s in steps.values():  # warm-up: basis expansion, first power iterations
        s(x)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(a.rounds):
        torch.manual_seed(r)  # same roulette draws for the gflows blocks within a round
        for k, s in in_turn(steps.items(), r):
            t0 = time.perf_counter()
            s(x)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(header())
    print(f"# batch {a.batch}, image {shape}, hidden channels {a.hidden}, rounds {a.rounds}, basis {a.basis}")
    for k, v in med.items():
        model = models[k][0]
        params = sum(p.numel() for p in model.parameters())
        bound = ""
        if k.startswith("gflows"):
            bound = f"   certified: max sigma - c = {certified_excess(model, a.size):+.1e}"
        print(f"{k:34s} {v * 1e3:9.1f} ms/step   params {params}{bound}")
    print(f"ratio d4 / trivial                          {med['gflows d4'] / med['gflows trivial']:.3f}")
    print(f"ratio d4 / trivial (memory saving)          "
          f"{med['gflows d4 (memory saving)'] / med['gflows trivial (memory saving)']:.3f}")
    nf_t = med["normflows Residual+LipschitzCNN"]
    print(f"ratio gflows trivial / normflows            {med['gflows trivial'] / nf_t:.3f}")
    saving = med['gflows trivial (memory saving)']
    print(f"ratio gflows trivial (mem. saving) / normflows {saving / nf_t:.3f}")
    five_d4, five_tr = med["gflows d4 (5 power its/step)"], med["gflows trivial (5 power its/step)"]
    print(f"ratio d4 / trivial (5 power its/step)       {five_d4 / five_tr:.3f}")
    print(f"ratio gflows trivial (5 its, saving) / normflows {five_tr / nf_t:.3f}")
    nf_plain = med["normflows (no memory saving)"]
    for k in ("gflows trivial (5 its, no saving)", "gflows trivial (1 it, no saving)",
              "gflows d4 (1 it, no saving)"):
        print(f"ratio {k[7:]} / normflows {med[k] / nf_t:.3f}   "
              f"/ normflows (no saving) {med[k] / nf_plain:.3f}")


if __name__ == "__main__":
    main()
