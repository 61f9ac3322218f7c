"""CIFAR-10 subset benchmarks of issue #5, each in one run on this machine.

``efficiency``: data efficiency of equivariance. G-residual flow with D4 against the same model with
the trivial group, at (nearly) equal parameter count (the D4 hidden width is chosen to match) and an
equal number of steps, both through the library's training loop on the 5,085-image subset and
evaluated (EMA weights, 10 exact log-det terms plus the Russian roulette) on the 1,017 test images.

``residual``: the same for the gflows residual flow and normflows' residual flow of the same layout
(squeezes, 3 levels x 4 blocks of ``LipschitzCNN`` 3-1-3 with ActNorm), then each one's sampling rate
(the fixed-point inverse) and seconds per 1,000 test images with the trained weights.

``glow``: the same wall clock for a gflows model (``--flow``, ``--group``) and normflows' Glow
(3 levels x 4 GlowBlocks, hidden 128, LU 1x1 convolutions, affine coupling: 812k parameters),
trained on the subset with Adam at the same batch size, then test bits/dim of each. Glow models
``x / 256`` with uniform dequantisation, so its bits/dim is ``-log p(x / 256) / (D ln 2) + 8``; gflows
counts its logit and dequantisation log-dets itself: the two figures measure the same thing.
``gflows``: ``glow``'s gflows half alone, for an A/B of its settings against a Glow of the same session.

``steps``: seconds per training step and images per second of the gflows image models and of
normflows' Glow and residual flow, interleaved, on ``--device`` (cpu or cuda). ``evaluation``: seconds
per 1,000 test images of the flagship and of normflows' residual flow, interleaved. ``check``: one
batch's density on ``--device`` against the CPU with the same weights (``benchmarks/gpu_check.sh``).

    python benchmarks/bench_cifar.py efficiency --steps 150 --power-iters 5 \
        --override flow.squeeze_first=true --override flow.invconv=true
    python benchmarks/bench_cifar.py steps --group flip --hidden 128 --scales 3 --blocks 4 --batch 16 \
        --steps 10
    python benchmarks/bench_cifar.py evaluation --group flip --hidden 128 --scales 3 --blocks 4 \
        --batch 16 --steps 20 --eval-images 256 --rounds 3
    python benchmarks/bench_cifar.py residual --minutes 15 --flow g_residual --group flip --hidden 128 \
        --scales 3 --blocks 4 --ema 0.99 --batch 16 --lr 3e-3 --schedule cosine \
        --override flow.squeeze_first=true --override flow.invconv=true --override flow.fc_blocks=0
    python benchmarks/bench_cifar.py glow --minutes 15 --flow g_coupling --group flip --hidden 128 \
        --scales 3 --blocks 4 --ema 0.99 --batch 16 --lr 4e-3 --schedule cosine --gflows-steps 3000
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_machine import header  # this folder, first on sys.path when run as a script
from hydra import compose, initialize_config_dir

from gflows.data.cifar10 import load_cifar10
from gflows.models.config import image_model_from_config
from gflows.training.run import run
from gflows.training.schedule import cosine_decay


def build_model(cfg):
    return image_model_from_config(cfg.flow, cfg.data.shape, cfg.data.alpha)

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(flow: str, group: str, hidden: int, a, run_dir: str, *extra: str):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", [
            f"flow={flow}", f"group={group}", f"flow.hidden_channels={hidden}",
            f"flow.n_scales={a.scales}", f"flow.blocks_per_scale={a.blocks}",
            f"data.root={a.data}", "data.verify=false", "wandb.mode=disabled",
            f"trainer.batch_size={a.batch}", f"trainer.warmup_steps={a.warmup}", f"trainer.lr={a.lr}",
            "trainer.eval_orbit=false", "trainer.eval_batch_size=128",
            "sample.n=16", f"run_dir={run_dir}", f"seed={a.seed}", f"device={a.device}", *extra, *a.override,
        ])


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def efficiency(a) -> None:
    tmp = tempfile.mkdtemp()
    extra = [f"trainer.steps={a.steps}", f"trainer.ckpt_every={a.steps}", "trainer.ema_decay=0.99",
             f"flow.fc_blocks={a.fc_blocks}", f"flow.fc_hidden={a.fc_hidden}",
             f"flow.block.lipschitz_kwargs.train_iters={a.power_iters}",
             # the settings of its recorded figures (the config's defaults until 2026-12-05)
             "flow.block.basis=escnn", "flow.block.memory_saving=true", "flow.block.activation=lipswish"]
    trivial = cfg_for("g_residual", "trivial", a.hidden_trivial, a, f"{tmp}/trivial", *extra)
    target = n_params(build_model(trivial))
    # D4 hidden width (a multiple of |D4| = 8) whose parameter count is closest to the trivial one.
    def params_d4(h: int) -> int:
        return n_params(build_model(cfg_for("g_residual", "d4", h, a, tmp, *extra)))

    # The count grows with the width: bisect for the first multiple of 8 at or above the target, then
    # take it or the one below, whichever is closer (a handful of model builds instead of 63).
    lo, hi = 1, 64
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if params_d4(8 * mid) < target else (lo, mid)
    hidden_d4 = min({8 * max(1, lo - 1), 8 * lo}, key=lambda h: abs(params_d4(h) - target))
    d4 = cfg_for("g_residual", "d4", hidden_d4, a, f"{tmp}/d4", *extra)
    print(f"# {a.steps} steps, batch {a.batch}, {a.scales} scales x {a.blocks} blocks + {a.fc_blocks} FC "
          f"blocks of {a.fc_hidden}, lr {a.lr}, {a.power_iters} power iterations per training step, "
          f"seed {a.seed}, {a.threads} threads, overrides {a.override}")
    rows = []
    for name, cfg in (("trivial", trivial), ("d4", d4)):
        t0 = time.time()
        out = run(cfg)
        params = n_params(build_model(cfg))
        rows.append((name, cfg.flow.hidden_channels, params, time.time() - t0, out["test_bpd"]))
    print(f"{'group':8s} {'hidden ch':>9s} {'params':>8s} {'wall s':>8s} {'test bpd':>9s}")
    for r in rows:
        print(f"{r[0]:8s} {r[1]:9d} {r[2]:8d} {r[3]:8.0f} {r[4]:9.4f}")
    print(f"test bpd trivial - d4: {rows[0][4] - rows[1][4]:+.4f} (goal: >= +0.1)")


def _normflows_multiscale(level_blocks, levels: int = 3):
    """normflows' multiscale layout for 3x32x32 images (its Glow example's): at level ``i`` (0 the
    coarsest) ``level_blocks(c)`` on ``c = 3 * 2**(levels + 1 - i)`` channels, then a squeeze."""
    import normflows as nf

    ch, q0, merges, flows = 3, [], [], []
    for i in range(levels):
        flows.append([*level_blocks(ch * 2 ** (levels + 1 - i)), nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            shape = (ch * 2 ** (levels - i), 32 // 2 ** (levels - i), 32 // 2 ** (levels - i))
        else:
            shape = (ch * 2 ** (levels + 1), 32 // 2**levels, 32 // 2**levels)
        q0.append(nf.distributions.DiagGaussian(shape))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def normflows_glow(levels: int = 3, blocks: int = 4, hidden: int = 128):
    """normflows' multiscale Glow for 3x32x32 images (its examples' construction, unconditional)."""
    import normflows as nf

    return _normflows_multiscale(lambda c: [nf.flows.GlowBlock(c, hidden, split_mode="channel", scale=True)
                                            for _ in range(blocks)], levels)


def normflows_residual(levels: int = 3, blocks: int = 4, hidden: int = 128, coeff: float = 0.98):
    """normflows' residual flow in the same layout (Chen et al. 2019's image blocks): per block
    ``Residual(LipschitzCNN [c, hidden, hidden, c], kernels 3-1-3, Lipschitz coeff)`` with the
    unbiased Russian-roulette log-det (2 exact terms, memory-saving backward) and an ActNorm."""
    import normflows as nf

    def level(c):
        out = []
        for _ in range(blocks):
            net = nf.nets.LipschitzCNN([c, hidden, hidden, c], [3, 1, 3], lipschitz_const=coeff)
            # ActNorm first in the sampling direction, so that the data -> noise pass meets the residual
            # block first and its per-image log-det sets the shape normflows accumulates in
            out += [nf.flows.ActNorm((c, 1, 1)), nf.flows.Residual(net, reduce_memory=True, n_exact_terms=2)]
        return out

    return _normflows_multiscale(level, levels)


def glow_bpd(model, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bits/dim of 8-bit images ``x`` under a density on ``[0, 1]`` (uniform dequantisation; the noise
    drawn on the CPU, the density on the model's device)."""
    u = (x.float() + torch.rand(x.shape, generator=generator)) / 256
    u = u.to(next(model.parameters()).device)
    return -model.log_prob(u, None) / (x[0].numel() * math.log(2)) + 8


@torch.no_grad()
def _zero_subnormals(items) -> None:
    """Sets every subnormal float of the tensors in ``items`` (tensors or dicts of them) to zero."""
    tiny = torch.finfo(torch.float32).tiny
    for item in items:
        for t in item.values() if isinstance(item, dict) else (item,):
            if torch.is_tensor(t) and t.dtype == torch.float32 and t.dim():
                t.masked_fill_(t.abs() < tiny, 0.0)


def train_normflows(model, a, train_x: torch.Tensor, test_x: torch.Tensor, label: str = "glow") -> dict:
    """Train a normflows image model for ``--minutes`` as the gflows trainer would (Adam, warm-up,
    cosine over the time budget, hflip, clipping at 1, non-finite steps skipped); test bits/dim."""
    lr0 = a.nf_lr or a.lr
    opt = torch.optim.Adam(model.parameters(), lr=lr0, weight_decay=1e-5)
    g = torch.Generator().manual_seed(a.seed)
    # Glow's steps on this CPU slowed from about 0.07 s to 0.09-0.2 s over its first few thousand
    # steps (2026-12-05): the weight decay drives thousands of weights of its couplings' last
    # convolutions into subnormal floats, which the convolutions' backward crawls through.
    # set_flush_denormal reaches only this thread, not the intra-op pool's, so subnormal weights and
    # Adam moments are also zeroed every 50 steps (restores 0.094 s to 0.077 s; gflows' trainer has
    # no weight decay and is left as it is). Either can only make the baseline faster.
    flush = torch.set_flush_denormal(True)
    step, t0 = 0, time.time()
    while time.time() - t0 < 60 * a.minutes:
        idx = torch.randint(len(train_x), (a.batch,), generator=g)
        x = train_x[idx]
        flip = torch.rand(len(x), generator=g) < 0.5
        x[flip] = torch.flip(x[flip], (-1,))
        lr = lr0 * min(1.0, (step + 1) / a.warmup)
        if a.schedule == "cosine":  # decay to zero at the end of the model's own time budget
            lr *= cosine_decay((time.time() - t0) / (60 * a.minutes))
        for pg in opt.param_groups:
            pg["lr"] = lr
        loss = glow_bpd(model, x, g).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the gflows trainer
        if torch.isfinite(loss):
            opt.step()
        step += 1
        if step % 50 == 0:
            _zero_subnormals([*model.parameters(), *opt.state.values()])
        if step % 100 == 0:
            bpd = float(loss.detach())
            print(f"  {label} step {step} bpd {bpd:.3f} {time.time() - t0:.0f} s", flush=True)
    seconds = time.time() - t0
    if flush:
        torch.set_flush_denormal(False)
    model.eval()
    t1 = time.time()
    with torch.no_grad():
        bpd = torch.cat([glow_bpd(model, test_x[i : i + 128], g) for i in range(0, len(test_x), 128)])
    return {"steps": step, "seconds": seconds, "test_bpd": float(bpd.mean()), "params": n_params(model),
            "eval_s_per_1000": (time.time() - t1) * 1000 / len(test_x)}


def train_glow(a, train_x: torch.Tensor, test_x: torch.Tensor) -> dict:
    torch.manual_seed(a.seed)
    return train_normflows(normflows_glow(), a, train_x, test_x, "glow")


def train_gflows(a):
    """Train the gflows model of ``--flow`` and ``--group`` for ``--minutes`` through the library's
    trainer (or reuse ``--gflows-run``); its test bits/dim with the raw and the EMA weights, and the
    model carrying the better of the two."""
    import json

    from gflows.training.checkpoint import load_checkpoint
    from gflows.training.images import evaluate

    run_dir = Path(a.gflows_run or f"{tempfile.mkdtemp()}/gflows")
    # without --gflows-steps the cosine anneals over the time budget, as normflows' models' does
    clock = "steps" if a.gflows_steps else "time"
    cfg = cfg_for(a.flow, a.group, a.hidden, a, str(run_dir), f"trainer.steps={a.gflows_steps or 10000000}",
                  f"trainer.schedule={a.schedule}", f"trainer.schedule_clock={clock}",
                  "trainer.ckpt_every=1000000", f"trainer.max_minutes={a.minutes}",
                  f"trainer.ema_decay={a.ema}", "trainer.eval_at_end=false")
    if not (run_dir / "checkpoint.pt").exists():  # else evaluate the finished run in --gflows-run
        run(cfg)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state = load_checkpoint(run_dir / "checkpoint.pt")
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    test_x, _ = load_cifar10(a.data, "test", verify=False, download=False)
    torch.manual_seed(a.seed)
    t0 = time.time()
    raw = evaluate(model, test_x, 128)["test_bpd"]
    eval_s = (time.time() - t0) * 1000 / len(test_x)
    ema_weights = {**state["model"], **state["ema"]}
    model.load_state_dict(ema_weights)
    ema = evaluate(model, test_x, 128)["test_bpd"]
    if raw < ema:
        model.load_state_dict(state["model"])
    print(f"gflows test bits/dim: raw weights {raw:.4f}, EMA ({a.ema}) {ema:.4f}; the better one is compared")
    gf = {"steps": state["step"], "seconds": rows[-1]["seconds"], "test_bpd": min(raw, ema), "raw_bpd": raw,
          "params": n_params(model), "eval_s_per_1000": eval_s}
    return gf, model, test_x


def _table(a, rows, n_test: int) -> None:
    print(f"# {a.minutes} min of training each, batch {a.batch}, lr {a.lr} (normflows {a.nf_lr or a.lr}; "
          f"{a.schedule}), seed {a.seed}; "
          f"test bits/dim on {n_test} images")
    print(f"{'model':44s} {'params':>9s} {'steps':>7s} {'s/step':>7s} {'test bpd':>9s}")
    for label, r in rows:
        print(f"{label:44s} {r['params']:9d} {r['steps']:7d} {r['seconds'] / max(1, r['steps']):7.3f} "
              f"{r['test_bpd']:9.4f}")


def _gflows_label(a) -> str:
    return f"gflows {a.flow} {a.group} ({a.scales}x{a.blocks}, {a.hidden} ch)"


def gflows(a) -> None:
    """``glow``'s gflows half alone: an A/B of its settings, each against the Glow of the same session."""
    gf, _, test_x = train_gflows(a)
    _table(a, ((_gflows_label(a), gf),), len(test_x))


def glow(a) -> None:
    gf, _, test_x = train_gflows(a)
    train_x, _ = load_cifar10(a.data, "train", verify=False, download=False)
    gl = train_glow(a, train_x, test_x)
    name = _gflows_label(a)
    _table(a, ((name, gf), ("normflows Glow (3x4, 128, LU)", gl)), len(test_x))
    print(f"gflows - Glow: {gf['test_bpd'] - gl['test_bpd']:+.4f} bits/dim (goal: gflows <= 3.90)")


def _sampling_rate(fn, n: int, rounds: int) -> float:
    """Samples per second of ``fn(n)`` (median of ``rounds`` calls after one warm-up call)."""
    fn(n)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(n)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def residual(a) -> None:
    """The gflows residual flow (``--flow g_residual`` and its overrides) against normflows' residual
    flow of the same layout and width, ``--minutes`` each; then, with the trained weights, test
    evaluation time and sampling rate (the fixed-point inverse) of each."""
    gf, model, test_x = train_gflows(a)
    train_x, _ = load_cifar10(a.data, "train", verify=False, download=False)
    torch.manual_seed(a.seed)
    nr_model = normflows_residual(a.scales, a.blocks, a.hidden)
    nr = train_normflows(nr_model, a, train_x, test_x, "normflows residual")
    name = _gflows_label(a)
    label = f"normflows residual flow ({a.scales}x{a.blocks}, {a.hidden} ch)"
    _table(a, ((name, gf), (label, nr)), len(test_x))
    print(f"gflows - normflows residual: {gf['test_bpd'] - nr['test_bpd']:+.4f} bits/dim "
          f"(raw weights: {gf['raw_bpd'] - nr['test_bpd']:+.4f}; goal: <= -0.5)")
    model.eval()
    torch.manual_seed(a.seed)
    with torch.no_grad():
        rates = {
            f"{name}: sample": _sampling_rate(model.sample, a.sample_batch, a.sample_rounds),
            f"{name}: sample_and_log_prob": _sampling_rate(model.sample_and_log_prob, a.sample_batch,
                                                          a.sample_rounds),
            f"{label}: sample (returns log q)": _sampling_rate(nr_model.sample, a.sample_batch,
                                                                a.sample_rounds),
        }
    print(f"# sampling in evaluation mode, batches of {a.sample_batch}, median of {a.sample_rounds}; test "
          "evaluation in batches of 128, each model's eval-mode log-det (gflows: n_exact_terms_eval exact "
          "terms plus the roulette; normflows: 20 exact terms plus the roulette)")
    for k, v in rates.items():
        print(f"{k:80s} {v:8.2f} samples/s")
    print(f"{name + ': test evaluation':80s} {gf['eval_s_per_1000']:8.2f} s per 1,000 images")
    print(f"{label + ': test evaluation':80s} {nr['eval_s_per_1000']:8.2f} s per 1,000 images")


# SiLU conditioners, 1x1 output convolutions at the coarse scales
_COUPLING_1X1 = ["flow=g_coupling", "flow.block.activation=silu",
                 "flow.scale_kernel_sizes=[[3,1,3],[3,1,1],[3,1,1]]"]
STEP_VARIANTS = {
    # the flagship of the 15-minute protocol (RESULTS.md): escnn's basis, memory saving, 5 iterations
    # (the config's defaults until 2026-12-05)
    "g_residual (protocol)": ["flow=g_residual", "flow.squeeze_first=true", "flow.invconv=true",
                              "flow.fc_blocks=0", "flow.block.basis=escnn", "flow.block.memory_saving=true",
                              "flow.block.lipschitz_kwargs.train_iters=5", "flow.block.activation=lipswish"],
    # the same model with the fast residual step: orbit basis, no memory saving, 1 iteration per step
    # (the config's defaults since 2026-12-05, spelled out), and LipSwish (its recorded figures)
    "g_residual (fast step)": ["flow=g_residual", "flow.squeeze_first=true", "flow.invconv=true",
                               "flow.fc_blocks=0", "flow.block.basis=auto", "flow.block.memory_saving=false",
                               "flow.block.lipschitz_kwargs.train_iters=1", "flow.block.activation=lipswish"],
    # the fast step with tanh between the convolutions: the config's defaults since 2026-12-05 20:00
    "g_residual (fast step, tanh)": ["flow=g_residual", "flow.squeeze_first=true", "flow.invconv=true",
                                     "flow.fc_blocks=0", "flow.block.activation=tanh"],
    # the fast step with one exact series term (then Geometric(1/2) more): what the terms cost
    "g_residual (fast step, 1 exact term)": [
        "flow=g_residual", "flow.squeeze_first=true", "flow.invconv=true", "flow.fc_blocks=0",
        "flow.block.basis=auto", "flow.block.memory_saving=false",
        "flow.block.lipschitz_kwargs.train_iters=1", "flow.block.n_exact_terms=1",
        "flow.block.activation=lipswish"],
    "g_coupling": ["flow=g_coupling"],
    "g_coupling (silu, 1x1 coarse outputs)": _COUPLING_1X1,
    # the README's best coupling model: the same with 3, 6 and 6 blocks at the three scales
    "g_coupling (silu, 1x1 coarse outputs, 3-6-6)": [*_COUPLING_1X1, "flow.blocks_per_scale=[3,6,6]"],
    # Glow's split with its learned prior: one of the three fields leaves after the first scale
    "g_coupling (factor_out, split_prior)": ["flow=g_coupling", "flow.factor_out=true",
                                             "flow.split_prior=true"],
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _variant_cfg(name: str, a):
    """The Hydra config of the gflows image model ``STEP_VARIANTS[name]`` with ``--group`` and
    ``--hidden`` (``a.device`` its device), in a fresh run_dir."""
    flow, *overrides = STEP_VARIANTS[name]
    return cfg_for(flow.split("=")[1], a.group, a.hidden, a, tempfile.mkdtemp(), *overrides)


def steps(a) -> None:
    """Seconds per training step (forward with the Lipschitz refresh, backward, clipping, Adam) of the
    gflows image models of ``STEP_VARIANTS`` with ``--group`` and ``--hidden``, and of normflows'
    Glow and residual flow, interleaved round by round on the subset's batches, on ``--device``;
    medians, and images per second."""
    from gflows.nn.lipschitz import lipschitz_layers
    from gflows.training.distributed import setup
    from gflows.training.images import ImageTask

    dd = setup(a.device)
    train_x, _ = load_cifar10(a.data, "train", verify=False, download=False)
    fns = {}
    for name in STEP_VARIANTS:
        task = ImageTask(_variant_cfg(name, a))
        task.prepare(dd)
        # as the engine: fused Adam, the parameter and Lipschitz-layer lists kept, not walked per
        # step; the Lipschitz layers marked stale, to refresh in the next step's forward pass
        params, lipschitz = list(task.model.parameters()), lipschitz_layers(task.model)
        opt = torch.optim.Adam(params, lr=a.lr, fused=True)

        def step(i, task=task, opt=opt, params=params, lipschitz=lipschitz):
            out = task.loss(i, dd)
            opt.zero_grad()
            out.surrogate.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            for m in lipschitz:
                m.mark_stale()

        fns[f"gflows {name} {a.group}"] = (step, n_params(task.model))
    g = torch.Generator().manual_seed(a.seed)
    baselines = {"normflows Glow (3x4, 128, LU)": normflows_glow(),
                 f"normflows residual ({a.scales}x{a.blocks}, {a.hidden} ch)":
                     normflows_residual(a.scales, a.blocks, a.hidden)}
    for label, model in baselines.items():
        model.to(a.device)
        params = list(model.parameters())
        opt = torch.optim.Adam(params, lr=a.lr, fused=True)

        def nf_step(i, model=model, params=params, opt=opt):
            loss = glow_bpd(model, train_x[torch.randint(len(train_x), (a.batch,), generator=g)], g).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        fns[label] = (nf_step, n_params(model))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(a.steps + 2):
        for k, (f, _) in fns.items():
            _sync(a.device)
            t0 = time.perf_counter()
            f(i)
            _sync(a.device)
            if i >= 2:  # the first steps: data-dependent initialisation, first power iterations
                times[k].append(time.perf_counter() - t0)
    glow_s = statistics.median(times["normflows Glow (3x4, 128, LU)"])
    print(f"# {a.device}, batch {a.batch}, {a.scales}x{a.blocks}, {a.hidden} hidden channels, median of "
          f"{a.steps} interleaved steps")
    for k, (_, params) in fns.items():
        med = statistics.median(times[k])
        print(f"{k:48s} {params:9d} params {med:7.3f} s/step {a.batch / med:8.1f} images/s  "
              f"{med / glow_s:5.2f}x Glow's")


def evaluation(a) -> None:
    """Seconds per 1,000 test images of the flagship (fast step) and of normflows' residual flow of
    the same layout, each after ``--steps`` training steps (gflows: or trained, ``--gflows-run``), in
    evaluation mode (gflows: ``n_exact_terms_eval`` exact terms plus the roulette, the Lipschitz bound
    refreshed to its tolerance once before the timing; normflows: 20 exact terms plus the roulette),
    batches of 128 of the first ``--eval-images`` test images; rounds interleaved, medians."""
    from gflows.training.distributed import setup
    from gflows.training.images import ImageTask, evaluate

    dd = setup(a.device)
    train_x, _ = load_cifar10(a.data, "train", verify=False, download=False)
    test_x, _ = load_cifar10(a.data, "test", verify=False, download=False)
    test_x = test_x[: a.eval_images]
    task = ImageTask(_variant_cfg("g_residual (fast step)", a))
    task.prepare(dd)
    opt = torch.optim.Adam(task.model.parameters(), lr=a.lr)
    torch.manual_seed(a.seed)
    nf = normflows_residual(a.scales, a.blocks, a.hidden).to(a.device)
    nf_opt = torch.optim.Adam(nf.parameters(), lr=a.lr)
    g = torch.Generator().manual_seed(a.seed)
    if a.gflows_run:  # a trained flagship (its EMA weights), the same settings
        from gflows.training.checkpoint import load_checkpoint

        state = load_checkpoint(Path(a.gflows_run) / "checkpoint.pt")
        task.model.load_state_dict({**state["model"], **state["ema"]})
    for i in range(a.steps):  # away from the initialisation (zero-initialised layers act)
        if not a.gflows_run:
            out = task.loss(i, dd)
            opt.zero_grad()
            out.surrogate.backward()
            opt.step()
        loss = glow_bpd(nf, train_x[torch.randint(len(train_x), (a.batch,), generator=g)], g).mean()
        nf_opt.zero_grad()
        loss.backward()
        nf_opt.step()
    task.model.eval()
    nf.eval()
    t0 = time.perf_counter()
    evaluate(task.model, test_x[:2], 2)  # the certified refresh of the Lipschitz bound, timed apart
    print(f"gflows: certified refresh of the Lipschitz bounds (and 2 images) "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    def nf_eval():
        with torch.no_grad():
            bpd = [glow_bpd(nf, test_x[i : i + 128], g) for i in range(0, len(test_x), 128)]
            return float(torch.cat(bpd).mean())

    fns = {"gflows g_residual (fast step) " + a.group: lambda: evaluate(task.model, test_x, 128)["test_bpd"],
           f"normflows residual ({a.scales}x{a.blocks}, {a.hidden} ch)": nf_eval}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.rounds):
        for k, f in fns.items():
            _sync(a.device)
            t0 = time.perf_counter()
            bpd = f()
            _sync(a.device)
            times[k].append((time.perf_counter() - t0) * 1000 / len(test_x))
            print(f"  {k}: {times[k][-1]:.1f} s per 1,000 images (test bits/dim {bpd:.3f})", flush=True)
    trained = f"gflows trained in {a.gflows_run}, normflows" if a.gflows_run else "both"
    print(f"# {a.device}, {len(test_x)} test images in batches of 128, {trained} after {a.steps} training "
          f"steps, median of {a.rounds} interleaved rounds")
    ref = statistics.median(times[list(fns)[1]])
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:48s} {med:7.1f} s per 1,000 images  {med / ref:5.2f}x normflows'")


def _inner(model, x: torch.Tensor, with_density: bool) -> torch.Tensor:
    """The flow past its dequantisation (which draws noise on the model's device) at the dequantised
    images ``x`` in ``[0, 1]``: the latents, or with ``with_density`` their log-density."""
    y, ladj = x, torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for t in model.transform.transforms[1:]:
        y, ld = t(y)
        ladj = ladj + ld
    return model.base.log_prob(y) + ladj if with_density else y


def check(a) -> None:
    """One batch on ``--device`` against the CPU, same weights (perturbed away from the
    zero-initialised identity, so that every layer acts), past the dequantisation (the same noise on
    both): the coupling model's log-density, which is exact, and the residual flagship's latents
    (its log-det estimate draws random numbers, which differ between devices; its latents agree only
    to its iterations' tolerance, 1e-6 to 1e-5 relative between two copies on the CPU)."""
    import copy

    test_x, _ = load_cifar10(a.data, "test", verify=False, download=False)
    x = (test_x[:8].float() + torch.rand(test_x[:8].shape, generator=torch.Generator().manual_seed(0))) / 256
    a_cpu = argparse.Namespace(**{**vars(a), "device": "cpu"})
    for name in ("g_coupling", "g_residual (fast step)"):
        torch.manual_seed(a.seed)
        model = build_model(_variant_cfg(name, a_cpu))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.eval()
        other = copy.deepcopy(model).to(a.device)
        density = name == "g_coupling"
        with torch.no_grad():
            ref, dev = _inner(model, x, density), _inner(other, x.to(a.device), density).cpu()
        err = float((dev - ref).abs().max() / ref.abs().max())
        print(f"{name} {a.group}: {'log p' if density else 'z'} on {a.device} against the CPU, "
              f"max |difference| / max |value| {err:.2e} ({'ok' if err < 1e-4 else 'DIFFERS'})")


PARTS = {"efficiency": efficiency, "glow": glow, "gflows": gflows, "residual": residual, "steps": steps,
         "evaluation": evaluation, "check": check}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("part", choices=list(PARTS))
    p.add_argument("--device", default="cpu", help="steps, check: cpu or cuda")
    p.add_argument("--steps", type=int, default=300, help="efficiency: steps of each model; steps, "
                   "evaluation: timed steps, steps before the timing")
    p.add_argument("--eval-images", type=int, default=256, help="evaluation: test images timed")
    p.add_argument("--rounds", type=int, default=3, help="evaluation: interleaved timing rounds")
    p.add_argument("--minutes", type=float, default=15.0, help="glow: wall clock of each model")
    p.add_argument("--flow", default="g_coupling", help="glow: the gflows model")
    p.add_argument("--group", default="d4", help="glow: its group")
    p.add_argument("--hidden", type=int, default=64, help="glow: its hidden channels")
    p.add_argument("--ema", type=float, default=0.999, help="glow: gflows' EMA decay")
    p.add_argument("--gflows-run", default=None, help="glow, residual, evaluation: a run_dir whose "
                   "finished gflows run to evaluate instead of training again (same settings)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                   help="glow: learning-rate schedule of both models after the warm-up (cosine: to zero "
                   "at --gflows-steps for gflows, at the end of the time budget for Glow)")
    p.add_argument("--gflows-steps", type=int, default=0, help="glow, residual: gflows' trainer.steps "
                   "(0: the cosine anneals over --minutes, trainer.schedule_clock=time)")
    p.add_argument("--sample-batch", type=int, default=16, help="residual: samples per sampling call")
    p.add_argument("--sample-rounds", type=int, default=3, help="residual: timed sampling calls")
    p.add_argument("--nf-lr", type=float, default=0.0, help="glow, residual: normflows' learning rate "
                   "(0: --lr; its residual flow diverges at lr 3e-3)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--scales", type=int, default=2)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--hidden-trivial", type=int, default=32, help="efficiency: trivial model width")
    p.add_argument("--fc-blocks", type=int, default=0, help="efficiency: final FC blocks (their dense "
                   "matrices do not depend on the group and would dominate the parameter count)")
    p.add_argument("--fc-hidden", type=int, default=64, help="efficiency: final FC blocks' width")
    p.add_argument("--power-iters", type=int, default=5, help="efficiency: power iterations per training "
                   "step (flow.block.lipschitz_kwargs.train_iters; evaluation refreshes to the tolerance)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a further Hydra override of the gflows models (repeatable): flow.squeeze_first=true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-subset"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(header())
    PARTS[a.part](a)


if __name__ == "__main__":
    main()
