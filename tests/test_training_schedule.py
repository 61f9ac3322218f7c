"""The learning-rate schedule of the engine, with the settings of both trainer configs."""

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gflows.training.schedule import cosine_decay, learning_rate

ROOT = Path(__file__).resolve().parents[1]


def trainer_config(data: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("config", [f"data={data}", "trainer.lr=0.01", "trainer.warmup_steps=10",
                                  "trainer.steps=110", *overrides])


@pytest.mark.parametrize("data", ["cifar10", "phi4"])
def test_warmup_then_constant(data):
    cfg = trainer_config(data, "trainer.schedule=constant")
    assert learning_rate(cfg.trainer, 0) == pytest.approx(0.001)
    assert learning_rate(cfg.trainer, 4) == pytest.approx(0.005)
    assert [learning_rate(cfg.trainer, s) for s in (9, 50, 109)] == pytest.approx([0.01] * 3)


@pytest.mark.parametrize("data", ["cifar10", "phi4"])
def test_cosine_decays_to_zero_at_the_last_step(data):
    cfg = trainer_config(data, "trainer.schedule=cosine")
    assert learning_rate(cfg.trainer, 4) == pytest.approx(0.005 * 0.5 * (1 + math.cos(math.pi * 4 / 110)))
    assert learning_rate(cfg.trainer, 55) == pytest.approx(0.005)
    assert learning_rate(cfg.trainer, 110) == pytest.approx(0.0, abs=1e-12)
    lrs = [learning_rate(cfg.trainer, s) for s in range(10, 111)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_unknown_schedule_is_named():
    cfg = trainer_config("cifar10", "trainer.schedule=linear")
    with pytest.raises(ValueError, match="unknown trainer.schedule 'linear'"):
        learning_rate(cfg.trainer, 0)


def test_cosine_decay_factor():
    assert [cosine_decay(p) for p in (0.0, 0.25, 0.5, 1.0, 2.0)] == pytest.approx(
        [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.0, 0.0], abs=1e-12
    )


@pytest.mark.parametrize("data", ["cifar10", "phi4"])
def test_time_clock_anneals_over_the_budget(data):
    cfg = trainer_config(data, "trainer.schedule=cosine", "trainer.schedule_clock=time",
                         "trainer.max_minutes=2")
    # the wall clock leads: a quarter of the budget at step 20 of 110
    assert learning_rate(cfg.trainer, 20, seconds=30.0) == pytest.approx(0.01 * cosine_decay(0.25))
    # the steps lead: step 55 of 110 after a tenth of the budget
    assert learning_rate(cfg.trainer, 55, seconds=12.0) == pytest.approx(0.005)
    assert learning_rate(cfg.trainer, 30, seconds=120.0) == pytest.approx(0.0, abs=1e-12)
    steps_clock = trainer_config(data, "trainer.schedule=cosine", "trainer.max_minutes=2")
    lr = learning_rate(steps_clock.trainer, 20, seconds=120.0)
    assert lr == pytest.approx(0.01 * cosine_decay(20 / 110))


@pytest.mark.parametrize(("overrides", "match"), [
    (["trainer.schedule_clock=wall"], "unknown trainer.schedule_clock 'wall'"),
    (["trainer.schedule_clock=time"], "set trainer.max_minutes > 0"),
    (["trainer.schedule_clock=time", "trainer.max_minutes=0"], "set trainer.max_minutes > 0"),
])
def test_bad_clock_is_named(overrides, match):
    cfg = trainer_config("phi4", *overrides)
    with pytest.raises(ValueError, match=match):
        learning_rate(cfg.trainer, 0)
