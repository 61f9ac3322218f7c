"""The training engine on a toy objective (maximum likelihood of a Gaussian through an ActNorm
flow): it trains, resumes exactly, keeps an EMA, skips and restores non-finite steps, stops at
its time budget."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from gflows.flow import Flow
from gflows.nn.equivariant import GConv2d, symmetry_breaking_sq_norm
from gflows.training.checkpoint import load_checkpoint, save_checkpoint
from gflows.training.engine import Engine, StepLoss, load_trained
from gflows.training.records import read_metrics
from gflows.transforms.coupling import GCoupling
from gflows.transforms.elementwise import ActNorm

TRAINER = dict(steps=30, max_minutes=None, lr=0.05, warmup_steps=1, schedule="constant", weight_decay=0.0,
               relax_penalty=0.0, grad_clip=100.0, ema_decay=0.9, log_every=10, ckpt_every=10,
               max_bad_steps=2, max_restores=1, eval_at_end=True)


class Toy:
    """Fit N(3, 0.5^2) data; ``poison(step)`` makes a step's loss NaN."""

    loss_name, label = "nll", "toy"

    def __init__(self, poison=lambda step: False):
        self.model = Flow(ActNorm((1, 2, 2)))
        self.poison, self.calls = poison, 0

    def prepare(self, dd):
        pass

    def loss(self, step, dd):
        self.calls += 1
        g = torch.Generator().manual_seed(step)
        x = 3 + 0.5 * torch.randn(32, 1, 2, 2, generator=g)
        loss = -self.model.log_prob(x).mean()
        if self.poison(self.calls):
            loss = loss * float("nan")
        return StepLoss(loss, loss.detach(), {"calls": float(self.calls)})

    resume_keys = ("seed",)

    def checkpoint_info(self):
        return {"what": "toy"}

    def check_checkpoint(self, state, path):
        if state["what"] != "toy":
            raise ValueError("not a toy checkpoint")

    def finish(self, model, run_dir, wb):
        return {"bias": float(model.transform.bias.mean())}


def config(tmp_path, **trainer):
    return OmegaConf.create({"trainer": TRAINER | trainer, "run_dir": str(tmp_path / "run"), "resume": True,
                             "seed": 0, "device": "cpu", "wandb": {"mode": "disabled", "project": "t"}})


def test_trains_and_reports_with_the_ema(tmp_path):
    torch.manual_seed(0)
    result = Engine(Toy(), config(tmp_path, steps=200)).fit()
    # ActNorm maps x to (x + bias) e^{log_scale}: the fit moves bias towards -3
    assert result["step"] == 200 and result["bias"] < -2.5
    entropy = 4 * (0.5 * math.log(2 * math.pi * 0.25) + 0.5)  # the data's NLL under the true density
    assert abs(result["train_nll"] - entropy) < 0.5
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 201))
    assert {"nll", "lr", "grad_norm", "calls"} <= set(rows[0])
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["what"] == "toy" and set(state["ema"]) == {"transform.bias", "transform.log_scale"}
    restored = load_trained(Toy(), tmp_path / "run")  # EMA weights
    assert torch.equal(restored.transform.bias, state["ema"]["transform.bias"])


def test_resume_is_exact(tmp_path):
    Engine(Toy(), config(tmp_path / "a", steps=10)).fit()
    Engine(Toy(), config(tmp_path / "a", steps=30)).fit()
    Engine(Toy(), config(tmp_path / "b", steps=30)).fit()
    a, b = (load_checkpoint(tmp_path / d / "run" / "checkpoint.pt") for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    with pytest.raises(ValueError, match="not a toy"):
        other = Toy()
        other.checkpoint_info = lambda: {"what": "other"}
        Engine(other, config(tmp_path / "c", steps=1)).fit()
        Engine(Toy(), config(tmp_path / "c", steps=2)).fit()


def test_resume_with_other_data_settings_is_refused_by_name(tmp_path):
    Engine(Toy(), config(tmp_path, steps=2)).fit()
    other = config(tmp_path, steps=4)
    other.seed = 1
    with pytest.raises(ValueError, match=r"trained with seed=0 \(now 1\).*another run_dir"):
        Engine(Toy(), other).fit()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["settings"] == {"seed": 0} and state["step"] == 2
    del state["settings"]  # a checkpoint from before settings were kept resumes as it did
    save_checkpoint(state, tmp_path / "run" / "checkpoint.pt")
    assert Engine(Toy(), other).fit()["step"] == 4


def test_non_finite_steps_are_skipped_restored_then_fatal(tmp_path):
    out = Engine(Toy(poison=lambda n: n in (12, 13)), config(tmp_path, steps=15, eval_at_end=False)).fit()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert out["step"] == 15 and state["restores"] == 1 and state["lr_scale"] == 0.5
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 16))
    with pytest.raises(RuntimeError, match="training diverged"):
        Engine(Toy(poison=lambda n: True), config(tmp_path / "x", steps=5)).fit()


def test_time_budget_stops_with_a_checkpoint(tmp_path, capsys):
    out = Engine(Toy(), config(tmp_path, max_minutes=0, eval_at_end=False)).fit()
    assert out["step"] == 0 and "trainer.max_minutes=0 reached at step 0" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 0


class FakeClock:
    """``time.time`` for the engine, one second later at every call."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        self.now += 1.0
        return self.now


def test_time_clock_anneals_to_zero_at_the_budget_and_counts_resumes(tmp_path, monkeypatch, capsys):
    import gflows.training.engine as engine

    monkeypatch.setattr(engine, "time", FakeClock())
    cfg = config(tmp_path, steps=10_000, max_minutes=1, schedule="cosine", schedule_clock="time",
                 warmup_steps=1, eval_at_end=False)
    out = Engine(Toy(), cfg).fit()
    assert 5 < out["step"] < 60 and "trainer.max_minutes=1 reached" in capsys.readouterr().out
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] < 0.05 * lrs[0]
    seconds = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["seconds"]
    assert 55 <= seconds <= 65
    # the budget is the run's, not the invocation's: a resume has nothing left to train
    assert Engine(Toy(), cfg).fit()["step"] == out["step"]
    # under the steps clock a resume gets a new budget
    again = Engine(Toy(), config(tmp_path, steps=10_000, max_minutes=1, eval_at_end=False)).fit()
    assert again["step"] > out["step"]


def test_time_clock_without_a_budget_is_refused(tmp_path):
    with pytest.raises(ValueError, match="set trainer.max_minutes > 0"):
        Engine(Toy(), config(tmp_path, schedule="cosine", schedule_clock="time"))


class Relaxed(Toy):
    """A flow with a relaxed G-coupling whose free part starts away from zero; the data loss does
    not see the free part (scaled by 0), so only the penalty moves it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        coupling = GCoupling("d4", (2, 4, 4), hidden_fields=1, kernel_sizes=(3,), relax=0.5)
        with torch.no_grad():
            for m in coupling.modules():
                if isinstance(m, GConv2d) and m.relax:
                    m.free_weight.normal_()
        self.model = Flow(coupling)

    def loss(self, step, dd):
        loss = 0.0 * self.model.log_prob(torch.randn(4, 2, 4, 4)).mean()
        return StepLoss(loss, loss.detach(), {})

    def finish(self, model, run_dir, wb):
        return {}


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_relax_penalty_shrinks_only_the_symmetry_breaking_part(tmp_path, penalty):
    obj = Relaxed()
    start = float(symmetry_breaking_sq_norm(obj.model).sqrt())
    Engine(obj, config(tmp_path, steps=20, lr=0.1, relax_penalty=penalty, ema_decay=None)).fit()
    norms = [r["symmetry_breaking_norm"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    if penalty:
        assert norms[-1] < 0.5 * start and norms[0] < start
    else:
        assert norms == pytest.approx([start] * 20, rel=1e-6)


def test_relax_penalty_errors(tmp_path):
    with pytest.raises(ValueError, match="has none"):
        Engine(Toy(), config(tmp_path, relax_penalty=0.1))
    with pytest.raises(ValueError, match=">= 0"):
        Engine(Relaxed(), config(tmp_path, relax_penalty=-1.0))


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_ema_decay_outside_the_unit_interval_is_named(tmp_path, decay):
    with pytest.raises(ValueError, match=f"trainer.ema_decay must lie in \\[0, 1\\].*got {decay}"):
        Engine(Toy(), config(tmp_path, ema_decay=decay))


@pytest.mark.parametrize(("key", "value"), [
    ("steps", 0), ("batch_size", 0), ("log_every", 0), ("ckpt_every", -1), ("max_bad_steps", 0),
    ("warmup_steps", -1), ("steps", 2.5), ("batch_size", True), ("max_restores", -1)])
def test_counts_that_are_not_whole_numbers_in_range_are_named(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"trainer.{key} must be a whole number >= ., got {value!r}"):
        Engine(Toy(), config(tmp_path, **{key: value}))


@pytest.mark.parametrize("budget", [-1.5, "soon"])
def test_a_negative_budget_is_named(tmp_path, budget):
    with pytest.raises(ValueError, match=f"trainer.max_minutes must be a number >= 0.*got {budget!r}"):
        Engine(Toy(), config(tmp_path, max_minutes=budget))


class ResidualToy(Toy):
    """A G-residual block fitted to Gaussian data: Lipschitz layers under the engine."""

    def __init__(self):
        from gflows.transforms.residual import GResidualBlock

        torch.manual_seed(0)
        block = GResidualBlock("c4", (1, 4, 4), hidden_fields=2, memory_saving=False,
                               lipschitz_kwargs={"train_iters": 1})
        self.model, self.calls, self.poison = Flow(block), 0, lambda step: False

    def loss(self, step, dd):
        self.calls += 1
        g = torch.Generator().manual_seed(step)
        x = 1 + 2 * torch.randn(16, 1, 4, 4, generator=g)
        torch.manual_seed(step)  # the roulette, the probes and the refresh noise
        loss = -self.model.log_prob(x).mean()
        return StepLoss(loss, loss.detach(), {})

    def finish(self, model, run_dir, wb):
        return {}


@pytest.mark.parametrize("compile_flag", [False, True])
def test_lipschitz_layers_refresh_in_the_next_pass_resume_exactly_and_stay_certified(tmp_path, compile_flag):
    """The engine marks the Lipschitz layers stale after each step (fused Adam leaves no version
    bump for them to notice) and they refresh in the next forward pass, or it refreshes them at once
    for compiled passes. Every step refreshes once; a resumed run equals an uninterrupted one (with
    the eager refresh, the checkpoint's estimates are taken as they were saved, fresh, instead of
    refreshed again on loading); after training every normalised filter's true operator norm is
    within the bound."""
    from gflows.nn.lipschitz import LipschitzGConv2d

    kw = {"lr": 0.01, "ema_decay": None, "eval_at_end": False, "compile": compile_flag}
    Engine(ResidualToy(), config(tmp_path / "a", steps=4, **kw)).fit()
    Engine(ResidualToy(), config(tmp_path / "a", steps=8, **kw)).fit()
    toy = ResidualToy()
    engine = Engine(toy, config(tmp_path / "b", steps=8, **kw))
    engine.fit()
    a, b = (load_checkpoint(tmp_path / d / "run" / "checkpoint.pt") for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    convs = [m for m in toy.model.modules() if isinstance(m, LipschitzGConv2d)]
    refreshes = []
    original = LipschitzGConv2d.update
    LipschitzGConv2d.update = lambda self, *a, **k: refreshes.append(1) or original(self, *a, **k)
    try:
        Engine(toy, config(tmp_path / "b", steps=10, **kw)).fit()  # resumes: two more steps
    finally:
        LipschitzGConv2d.update = original
    assert len(refreshes) == 2 * len(convs)
    stale = [m._seen != m._state() for m in convs]
    assert stale == [not compile_flag] * len(convs)
    toy.model.eval()
    for conv in convs:
        with torch.no_grad():
            w, _ = conv.normalised()  # evaluation mode: refreshed to the tolerance
        shape = (conv.in_channels, 4, 4)
        dense = torch.autograd.functional.jacobian(
            lambda u, conv=conv, w=w, shape=shape: conv.conv(u.view(1, *shape), w).flatten(),
            torch.zeros(math.prod(shape)))
        assert float(torch.linalg.matrix_norm(dense, ord=2)) <= conv.coeff * conv.input_scale + 1e-3
