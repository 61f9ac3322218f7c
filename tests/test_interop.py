import pytest
import torch
import zuko
from nflows.distributions import StandardNormal as NflowsNormal
from nflows.flows import Flow as NflowsFlow
from nflows.transforms import CompositeTransform, PointwiseAffineTransform

import gflows
from gflows.interop import to_nflows, to_zuko

SHAPE = (2, 4, 4)


def parts(group):
    torch.manual_seed(0)
    act = gflows.ActNorm(SHAPE)
    act(torch.randn(8, *SHAPE) * 2 + 1)
    return act.eval(), gflows.GResidualBlock(group, SHAPE, 2).eval()


@pytest.mark.parametrize("group", ["trivial", "d4"])
def test_nflows_mixed_flow_matches_gflows(group):
    act, res = parts(group)
    native = PointwiseAffineTransform(shift=0.3, scale=1.7)
    flow = NflowsFlow(CompositeTransform([native, to_nflows(act), to_nflows(res)]), NflowsNormal(SHAPE))
    reference = gflows.Flow(gflows.Compose(_Affine(0.3, 1.7), act, res))
    x = torch.randn(3, *SHAPE)
    with gflows.logdet_mode(res, "exact"):
        assert torch.allclose(flow.log_prob(x), reference.log_prob(x), atol=1e-4)
        samples = flow.sample(2)
    assert samples.shape == (2, *SHAPE)


@pytest.mark.parametrize("group", ["trivial", "d4"])
def test_zuko_mixed_flow_matches_gflows(group):
    act, res = parts(group)
    native = zuko.lazy.UnconditionalTransform(
        torch.distributions.AffineTransform, torch.tensor(0.3), torch.tensor(1.7), buffer=True
    )
    base = zuko.lazy.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(SHAPE), torch.ones(SHAPE), buffer=True
    )
    flow = zuko.lazy.Flow([native, to_zuko(act), to_zuko(res)], base)
    reference = gflows.Flow(gflows.Compose(_Affine(0.3, 1.7), act, res))
    x = torch.randn(3, *SHAPE)
    with gflows.logdet_mode(res, "exact"):
        assert torch.allclose(flow().log_prob(x), reference.log_prob(x), atol=1e-4)
        xs, lq = flow().rsample_and_log_prob((2,))
        assert xs.shape == (2, *SHAPE)
        assert torch.allclose(reference.log_prob(xs), lq, atol=1e-4)
    assert {id(p) for p in res.parameters()} <= {id(p) for p in flow.parameters()}


class _Affine(gflows.Transform):
    """z = shift + scale * x, the gflows twin of the native layers above."""

    def __init__(self, shift, scale):
        super().__init__()
        self.shift, self.scale, self.event_shape = shift, scale, SHAPE

    def forward(self, x, context=None):
        ld = torch.log(torch.tensor(self.scale)) * x[0].numel()
        return self.shift + self.scale * x, ld.expand(x.shape[0])

    def inverse(self, z, context=None):
        ld = -torch.log(torch.tensor(self.scale)) * z[0].numel()
        return (z - self.shift) / self.scale, ld.expand(z.shape[0])


@pytest.mark.parametrize("kind", ["coupling", "iaf", "butterfly", "squeeze", "logit"])
def test_every_layer_wraps_into_nflows_and_zuko(kind):
    from helpers import perturb

    torch.manual_seed(0)
    layer = {
        "coupling": lambda: perturb(gflows.GCoupling("d4", SHAPE, hidden_fields=2, kernel_sizes=(3, 3)), 0.1),
        "iaf": lambda: perturb(gflows.GIAF("d4", SHAPE, hidden_fields=2, kernel_sizes=(3, 3)), 0.1),
        "butterfly": lambda: perturb(gflows.Butterfly(SHAPE), 0.1),
        "squeeze": lambda: gflows.Squeeze(SHAPE),
        "logit": lambda: gflows.Logit(SHAPE),
    }[kind]()
    x = torch.rand(3, *SHAPE) * 0.8 + 0.1
    z, ld = layer(x)
    nz, nld = to_nflows(layer)(x)
    assert torch.allclose(nz, z) and torch.allclose(nld, ld)
    assert torch.allclose(to_nflows(layer).inverse(z)[0], x, atol=1e-5)
    zt = to_zuko(layer)()
    zz, zld = zt.call_and_ladj(x)
    assert torch.allclose(zz, z) and torch.allclose(zld, ld)
    assert torch.allclose(zt.inv(z), x, atol=1e-5)
