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
