"""Adam's parameter groups with the steerable filters' learning rates equalised
(gflows/training/optim.py) and the filter step they are scaled by."""

import pytest
import torch
from test_training_engine import Toy, config

from gflows.flow import Flow
from gflows.nn.equivariant import GConv2d
from gflows.training.engine import Engine, StepLoss
from gflows.training.optim import param_groups
from gflows.transforms.coupling import GCoupling


def brute_force_step(conv: GConv2d) -> float:
    """sqrt(||B||_F^2 / entries), B expanded one unit basis weight at a time by escnn itself."""
    w = conv.r2conv.weights
    sq = sum(float(conv.r2conv.basisexpansion(e).double().pow(2).sum()) for e in torch.eye(w.numel()))
    return (sq / (conv.out_channels * conv.in_channels * conv.kernel_size ** 2)) ** 0.5


@pytest.mark.parametrize("group, fields", [("trivial", (4, "regular")), ("flip", (2, "regular")),
                                           ("c4", (1, "regular")), ("d4", (1, "regular")),
                                           ("d4", (2, "regular"))])
def test_filter_step_is_the_basis_norm_per_entry(group, fields):
    conv = GConv2d(group, fields, fields, 3, basis="escnn")
    assert conv.filter_step() == pytest.approx(brute_force_step(conv), rel=1e-6)
    # The estimate used where no dense basis is kept is unbiased, not exact: 16 sign draws.
    conv.dense_basis = None
    assert conv.filter_step() == pytest.approx(brute_force_step(conv), rel=0.15)


@pytest.mark.parametrize("group", ["trivial", "flip", "d4"])
def test_filter_step_of_the_orbit_basis_is_one(group):
    assert GConv2d(group, (2, "regular"), (2, "regular"), 3, basis="orbit").filter_step() == 1.0


def test_d4_filters_move_less_per_unit_step_than_trivial_ones():
    """The reason for equalising: escnn's D4 basis filters are normalised over whole orbits."""
    trivial = GConv2d("trivial", (8, "regular"), (8, "regular"), 3, basis="escnn").filter_step()
    d4 = GConv2d("d4", (1, "regular"), (1, "regular"), 3, basis="escnn").filter_step()
    assert trivial == pytest.approx(1.0, abs=1e-6)
    assert 0.3 < d4 < 0.5


def coupling(basis="escnn") -> torch.nn.Module:
    torch.manual_seed(0)
    return GCoupling("d4", (2, 4, 4), hidden_fields=1, kernel_sizes=(3, 3), basis=basis)


def test_param_groups_cover_every_parameter_once():
    model = coupling()
    everything = {id(p) for p in model.parameters()}
    plain = param_groups(model)
    assert len(plain) == 1 and plain[0]["lr_multiple"] == 1.0
    assert [id(p) for p in plain[0]["params"]] == [id(p) for p in model.parameters()]
    groups = param_groups(model, equalise_filter_lr=True)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(everything)
    convs = [m for m in model.modules() if isinstance(m, GConv2d)]
    scale_of = {id(p): g["lr_multiple"] for g in groups for p in g["params"]}
    for m in convs:
        assert scale_of[id(m.basis_weights)] == pytest.approx(1 / m.filter_step(), rel=1e-5)
        assert scale_of[id(m.basis_weights)] > 1.5
    others = everything - {id(m.basis_weights) for m in convs}
    assert others and all(scale_of[i] == 1.0 for i in others)


def test_orbit_basis_needs_no_scaling():
    groups = param_groups(coupling("orbit"), equalise_filter_lr=True)
    assert [g["lr_multiple"] for g in groups] == [1.0]


class D4Toy(Toy):
    def __init__(self):
        super().__init__()
        self.model = Flow(coupling())

    def loss(self, step, dd):
        g = torch.Generator().manual_seed(step)
        loss = -self.model.log_prob(torch.randn(8, 2, 4, 4, generator=g)).mean()
        return StepLoss(loss, loss.detach(), {})

    def finish(self, model, run_dir, wb):
        return {}


@pytest.mark.parametrize("equalise", [False, True])
def test_engine_applies_the_scales_and_resumes_with_them(tmp_path, equalise):
    cfg = config(tmp_path, steps=3, lr=1e-3, ema_decay=None, equalise_filter_lr=equalise)
    engine = Engine(D4Toy(), cfg)
    engine.fit()
    assert (len(engine.opt.param_groups) > 1) == equalise
    for pg in engine.opt.param_groups:
        assert pg["lr"] == pytest.approx(1e-3 * pg["lr_multiple"])
    assert any(pg["lr_multiple"] > 1.5 for pg in engine.opt.param_groups) == equalise
    again = Engine(D4Toy(), config(tmp_path, steps=5, lr=1e-3, ema_decay=None, equalise_filter_lr=equalise))
    again.fit()
    assert again.step == 5
    scales = [pg["lr_multiple"] for pg in engine.opt.param_groups]
    assert [pg["lr_multiple"] for pg in again.opt.param_groups] == scales


def test_resuming_with_the_other_setting_is_refused_by_name(tmp_path):
    Engine(D4Toy(), config(tmp_path, steps=2, lr=1e-3, ema_decay=None)).fit()
    with pytest.raises(ValueError, match="equalise_filter_lr"):
        Engine(D4Toy(), config(tmp_path, steps=4, lr=1e-3, ema_decay=None, equalise_filter_lr=True)).fit()
