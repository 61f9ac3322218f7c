"""End to end: the training CLI on the shared CIFAR-10 subset (tiny preset), checkpoints, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gflows.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset"
needs_data = pytest.mark.skipif(
    not (SUBSET / "cifar-10-batches-py" / "data_batch_1").exists(),
    reason=f"CIFAR-10 subset not found at {SUBSET} (../shared beside the repository)",
)
TINY = ["preset=tiny", f"data.root={SUBSET}", "data.verify=false", "wandb.mode=disabled",
        "data.limit_test=32", "sample.n=4", "trainer.eval_batch_size=32"]


def config(tmp_path, *overrides):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", [*TINY, f"run_dir={tmp_path / 'run'}", *overrides])


def cli(tmp_path, *overrides, timeout=600):
    env = {**os.environ, "WANDB_MODE": "disabled", "CI": "true"}
    args = [sys.executable, str(ROOT / "train.py"), *TINY, f"run_dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    torch.manual_seed(3)
    state = {"w": torch.randn(3), "step": 7, "rng": rng_state()}
    save_checkpoint(state, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    expected = torch.rand(2)
    set_rng_state(loaded["rng"])
    torch.manual_seed(3)  # move the stream, then restore it
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(2), expected)


def test_cli_rejects_unknown_group_and_values_before_work(tmp_path):
    t0 = time.time()
    r = cli(tmp_path, "group=d5")
    assert r.returncode != 0 and "group" in r.stderr and "d5" in r.stderr
    r = cli(tmp_path, "flow.kind=maf")
    assert r.returncode != 0 and "unknown flow kind 'maf'" in r.stderr
    assert "data: read" not in r.stdout  # stopped before reading any data
    r = cli(tmp_path, "mode=fit")
    assert r.returncode != 0 and "unknown mode 'fit'" in r.stderr
    r = cli(tmp_path, "+trainer.compile=true")
    assert r.returncode != 0 and "trainer.compile is for data=phi4" in r.stderr
    assert "data: read" not in r.stdout
    assert time.time() - t0 < 120


def assert_clean_error(r, *words):
    """One message on stderr naming ``words``, exit code 2, no Python traceback."""
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    for w in words:
        assert w in r.stderr


@pytest.mark.parametrize("download", ["false", "true"])
def test_cli_without_cifar10_says_where_to_put_it(tmp_path, download):
    # A download that fails at once: the proxy is a closed port on this machine.
    env = {**os.environ, "WANDB_MODE": "disabled", "CI": "true", "https_proxy": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "HYDRA_FULL_ERROR": "0"}
    args = [sys.executable, str(ROOT / "train.py"), "preset=tiny", "wandb.mode=disabled",
            f"data.root={tmp_path / 'empty'}", f"data.download={download}", f"run_dir={tmp_path / 'run'}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert_clean_error(r, "data.root=", "cifar-10-python.tar.gz", "cifar-10-batches-py", "data.verify=false")
    assert ("download failed" in r.stderr) == (download == "true")


def test_cli_refuses_a_lattice_flow_for_images(tmp_path):
    assert_clean_error(cli(tmp_path, "flow=realnvp"), "flow=realnvp is a lattice flow", "data=phi4",
                       "data=cifar10", "flow=g_coupling")


def test_missing_data_says_where_to_put_it(tmp_path):
    from gflows.training.run import run

    with pytest.raises(FileNotFoundError, match="put the official"):
        run(config(tmp_path, f"data.root={tmp_path / 'nothing'}"))


@needs_data
def test_train_checkpoint_resume_evaluate_sample(tmp_path):
    from gflows.training.run import run

    first = run(config(tmp_path, "trainer.steps=4", "trainer.ckpt_every=2", "trainer.eval_at_end=false"))
    assert first["step"] == 4
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # weights_only=True
    assert ckpt["step"] == 4
    second = run(config(tmp_path, "trainer.steps=6", "trainer.ckpt_every=2"))
    assert second["step"] == 6 and 0 < second["test_bpd"] < 12 and 0 < second["test_bpd_orbit"] < 12
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    result = run(config(tmp_path, "mode=eval"))
    assert abs(result["test_bpd"] - second["test_bpd"]) < 0.05  # stochastic log-det estimate
    out = run(config(tmp_path, "mode=sample"))
    assert Path(out["samples"]).stat().st_size > 0


@needs_data
def test_resume_with_other_training_data_is_refused_by_name(tmp_path):
    from gflows.training.run import run

    run(config(tmp_path, "trainer.steps=1", "trainer.eval_at_end=false"))
    with pytest.raises(ValueError, match=r"data.augment=null \(now d4\), data.limit_train=null \(now 64\)"):
        run(config(tmp_path, "trainer.steps=2", "data.augment=d4", "data.limit_train=64"))
    # settings that do not change the training data may differ
    resumed = run(config(tmp_path, "trainer.steps=2", "data.limit_test=16", "trainer.eval_at_end=false"))
    assert resumed["step"] == 2


@needs_data
def test_sigkill_then_resume_loses_at_most_one_interval(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "CI": "true"}
    args = [sys.executable, str(ROOT / "train.py"), *TINY, f"run_dir={tmp_path / 'run'}",
            "trainer.steps=200", "trainer.ckpt_every=2", "trainer.eval_at_end=false"]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and (not ckpt.exists() or load_checkpoint(ckpt)["step"] < 4):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt)["step"]
    assert killed_at >= 4
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) - killed_at <= 2  # at most one checkpoint interval lost
    r = cli(tmp_path, f"trainer.steps={killed_at + 2}", "trainer.ckpt_every=2", "trainer.eval_at_end=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resume: continuing from step {killed_at}" in r.stdout
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, killed_at + 3))  # the curve continues where it stopped


@needs_data
def test_non_finite_losses_are_skipped_then_restored_then_fatal(tmp_path, monkeypatch):
    import gflows.training.images as images
    from gflows.training.run import run

    real = images.bits_per_dim
    calls = {"n": 0}

    def poisoned(log_prob, dims):
        calls["n"] += 1
        out = real(log_prob, dims)
        return out * float("nan") if poisoned.bad(calls["n"]) else out

    # Steps 1-2 train and checkpoint, step 3 trains; calls 4 and 5 are non-finite: with
    # max_bad_steps=2 the run restores step 2 with half the learning rate, then finishes.
    poisoned.bad = lambda n: n in (4, 5)
    monkeypatch.setattr(images, "bits_per_dim", poisoned)
    out = run(config(tmp_path, "trainer.steps=4", "trainer.ckpt_every=2", "trainer.max_bad_steps=2",
                            "trainer.eval_at_end=false"))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert out["step"] == 4 and ckpt["restores"] == 1 and ckpt["lr_scale"] == 0.5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the restore cut the curve back to step 2: no step logged twice
    # Always non-finite: restores run out and the run stops with a clear message.
    poisoned.bad = lambda n: True
    with pytest.raises(RuntimeError, match="training diverged"):
        run(config(tmp_path, "trainer.steps=8", "trainer.max_bad_steps=1", "trainer.max_restores=1",
                          "trainer.eval_at_end=false"))


def test_unknown_or_missing_device_is_refused(tmp_path):
    from gflows.training.run import run

    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        run(config(tmp_path, "device=tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            run(config(tmp_path, "device=cuda"))


@needs_data
def test_time_budget_stops_with_a_checkpoint(tmp_path, capsys):
    from gflows.training.run import run

    out = run(config(tmp_path, "trainer.steps=4", "trainer.max_minutes=0", "trainer.eval_at_end=false"))
    assert out["step"] == 0 and "trainer.max_minutes=0 reached at step 0" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 0


def test_coupling_models_gather_their_filters_from_orbit_weights(tmp_path):
    """``flow.block.basis=auto``: orbit weights where the group maps the grid onto itself, escnn's
    basis for C8; an unknown basis is named."""
    from gflows.models.config import image_model_from_config
    from gflows.nn.equivariant import GConv2d

    def build_model(cfg):
        return image_model_from_config(cfg.flow, cfg.data.shape, cfg.data.alpha)

    for group, basis in [("d4", "orbit"), ("c8", "escnn")]:  # (no G-invertible 1x1 conv for C8)
        model = build_model(config(tmp_path, "flow=g_coupling", f"group={group}", "flow.n_scales=1",
                                   f"flow.invconv={group == 'd4'}"))
        convs = [m for m in model.modules() if isinstance(m, GConv2d)]
        assert convs and {c.basis for c in convs} == {basis}
    with pytest.raises(ValueError, match="unknown basis 'dense'"):
        build_model(config(tmp_path, "flow=g_coupling", "flow.block.basis=dense"))


@needs_data
def test_float64_image_training(tmp_path):
    """``data.dtype=float64``: the model and its batches in float64, end to end."""
    from gflows.training.run import run

    out = run(config(tmp_path, "flow=g_coupling", "group=flip", "flow.n_scales=1", "flow.blocks_per_scale=1",
                     "data.dtype=float64", "trainer.steps=2", "trainer.eval_orbit=false", "sample.n=1"))
    assert out["step"] == 2 and 0 < out["test_bpd"] < 12
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert all(v.dtype == torch.float64 for v in state["model"].values() if v.is_floating_point())


def test_batches_augmented_by_a_group_are_group_images():
    from gflows.groups import Group
    from gflows.training.images import batch_at

    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    plain = batch_at(x, 3, 16, 0, hflip=False)
    moved = batch_at(x, 3, 16, 0, hflip=False, augment=Group("c4"))
    c4 = Group("c4")
    assert all(any(torch.equal(c4.act(g, a), b) for g in c4.grid_elements)
               for a, b in zip(plain, moved, strict=True))
    assert not torch.equal(plain, moved)
    assert torch.equal(moved, batch_at(x, 3, 16, 0, hflip=False, augment=Group("c4")))  # resumable


def test_digits_train_evaluate_and_measure_symmetry(tmp_path, capsys):
    """data=digits (no download; its default flow, a small G-residual flow): 17 levels, bits/dim
    below the uniform model's log2(17); the D4-invariant model's log-density gaps vanish up to the
    dequantisation noise (float64, orbit basis, exact log-dets), for the residual and the coupling
    flow."""
    from gflows.training.run import run

    common = ["data=digits", "group=d4", "flow.n_scales=1", "flow.blocks_per_scale=2",
              "flow.hidden_channels=16", "flow.block.basis=auto", "data.dtype=float64",
              "trainer.steps=30", "trainer.batch_size=32", "trainer.warmup_steps=5", "sample.n=4",
              "wandb.mode=disabled", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        out = run(compose("config", common))
        assert out["step"] == 30 and 0 < out["test_bpd"] < math.log2(17)
        gaps = run(compose("config", [*common, "mode=symmetry"]))["gaps_bpd"]
        # the densities of x + u and g x + u (the same dequantisation noise u): exactly equal for the
        # identity, equal in expectation for the other elements of an invariant model
        assert len(gaps) == 10 and gaps["(rot 0 deg)"] == (0.0, 0.0)
        assert all(abs(v) < 4 * e for g, (v, e) in gaps.items() if g not in ("(rot 0 deg)", "|gap|"))
        # one grey channel: the coupling flow splits the pixels by the mirrored checkerboard
        coupled = [*common[:-1], "flow=g_coupling", "trainer.steps=10", f"run_dir={tmp_path / 'coupling'}"]
        out = run(compose("config", coupled))
        assert out["step"] == 10 and 0 < out["test_bpd"] < math.log2(17)
        gaps = run(compose("config", [*coupled, "mode=symmetry"]))["gaps_bpd"]
        assert all(abs(v) < 4 * e for g, (v, e) in gaps.items() if g not in ("(rot 0 deg)", "|gap|"))
        with pytest.raises(ValueError, match="data.augment=c4: c4 contains quarter turns"):
            run(compose("config", [*common, "data.augment=c4", "data.shape=[1,8,6]"]))
        with pytest.raises(ValueError, match="data.augment=c8: c8 has turns .* only its subgroup 'c4'"):
            run(compose("config", [*common, "data.augment=c8"]))
        with pytest.raises(ValueError, match="symmetry_group=c8: c8 has turns .* only its subgroup 'c4'"):
            run(compose("config", [*common, "mode=symmetry", "symmetry_group=c8"]))
        bad = {"trainer.batch_size=0": "trainer.batch_size must be a whole number >= 1, got 0",
               "data.limit_train=0": "data.limit_train must be a whole number >= 1",
               "data.limit_train=5000": "data.limit_train=5000: digits has only 1500 train images",
               "data.dtype=float16": "unknown data.dtype 'float16'",
               "sample.n=0": "sample.n must be a whole number >= 1",
               "data.levels=3": "data.levels=3, but the digits train images hold values up to 16"}
        for override, message in bad.items():
            with pytest.raises(ValueError, match=message):
                run(compose("config", [*common, override, f"run_dir={tmp_path / 'bad'}"]))
        assert not (tmp_path / "bad" / "checkpoint.pt").exists()  # refused before any step
    assert "log-density gaps" in capsys.readouterr().out


@needs_data
def test_variational_dequantisation_trains_resumes_and_samples(tmp_path):
    """``flow.dequantization=variational``: the noise flow is part of the model's state (checkpoint,
    resume), evaluation reports the bound, and sampling returns integer images."""
    from gflows.training.run import run

    settings = ("flow=g_coupling", "group=flip", "flow.n_scales=1", "flow.blocks_per_scale=1",
                "flow.dequantization=variational", "flow.dequant_blocks=2", "flow.dequant_hidden=4",
                "trainer.eval_orbit=false", "sample.n=2")
    run(config(tmp_path, *settings, "trainer.steps=2", "trainer.eval_at_end=false"))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert any(k.startswith("transform.transforms.0.couplings.") for k in state["model"])
    out = run(config(tmp_path, *settings, "trainer.steps=3"))
    assert out["step"] == 3 and 0 < out["test_bpd"] < 12
    assert Path(run(config(tmp_path, *settings, "mode=sample"))["samples"]).stat().st_size > 0
    with pytest.raises(ValueError, match="unknown dequantization 'none'"):
        run(config(tmp_path / "other", *settings, "flow.dequantization=none"))
