"""Every layer and model is an ordinary module: pickle, torch.save of the whole module, deepcopy and
a spawned worker process all give the same log-density."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.multiprocessing as mp
from families import FAMILIES, make

import gflows
from gflows.models.image import image_model
from gflows.transforms.conditioner import Conditioner


def log_prob(t, x, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        z, ladj = t(x)
    return ladj - 0.5 * z.flatten(1).pow(2).sum(1)


def torch_roundtrip(t):
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pickle_save_and_deepcopy_give_the_same_log_prob(name, dtype):
    t = make(name, dtype)
    x = torch.randn(3, *t.event_shape, dtype=dtype)
    ref = log_prob(t, x)
    for clone in (pickle.loads(pickle.dumps(t)), torch_roundtrip(t), copy.deepcopy(t)):
        assert torch.equal(log_prob(clone, x), ref)
        assert next(clone.parameters()).dtype == dtype


def test_copies_train_on_their_own():
    t = make("coupling")
    clone = copy.deepcopy(t)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    x = torch.randn(3, *t.event_shape)
    assert not torch.equal(log_prob(clone, x), log_prob(t, x))


def test_whole_image_model_pickles():
    torch.manual_seed(0)
    flow = image_model("coupling", "d4", (3, 4, 4), n_scales=2, blocks_per_scale=1, hidden_fields=1,
                       squeeze_first=True, invconv=True)
    x = torch.randint(0, 256, (2, 3, 4, 4)).float()
    flow.train()
    flow.log_prob(x)  # ActNorm initialisation
    flow.eval()
    torch.manual_seed(1)
    ref = flow.log_prob(x)
    clone = torch_roundtrip(flow)
    torch.manual_seed(1)  # the same dequantisation noise
    assert torch.equal(clone.log_prob(x), ref)


def test_compiled_wrapper_pickles_without_compiling():
    t = make("butterfly")
    clone = pickle.loads(pickle.dumps(gflows.Compiled(t)))
    assert isinstance(clone, gflows.Compiled) and torch.equal(
        next(clone.transform.parameters()), next(t.parameters()))


def _worker(module, x, queue):
    queue.put(log_prob(module, x).tolist())  # a list: the worker exits before its tensors are read


def test_spawned_worker_gets_the_same_log_prob():
    # The reference first: torch.multiprocessing moves the module's tensors to shared memory, so a
    # worker's Lipschitz refresh would write the parent's estimate, and the parent's next refresh
    # would start from there (a different warm start: equal only to the power iteration's
    # tolerance). Refreshed before it is sent, the module is fresh in the worker too, which then
    # computes what the parent did, to float64 round-off.
    t = make("residual", torch.float64)
    x = torch.randn(2, *t.event_shape, dtype=torch.float64)
    ref = log_prob(t, x)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(t, x, queue))
    proc.start()
    got = queue.get(timeout=120)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), ref, rtol=1e-12, atol=0)


def _as_if_pickled_before(module: torch.nn.Module, buffers: tuple[str, ...], attrs: tuple[str, ...]):
    """``module`` unpickled from a state that lacks later-added buffers and attributes."""
    state = module.__getstate__()
    state["_buffers"] = {k: v for k, v in state["_buffers"].items() if k not in buffers}
    for name in attrs:
        state.pop(name, None)
    old = type(module).__new__(type(module))
    old.__setstate__(state)
    return old


def test_layers_pickled_before_their_cached_masks_and_flags_still_load():
    """Pickles of a checkerboard coupling without its cached masks, of its conditioner without its
    joint bounds, and of a convolution without its identity-bias flag, rebuild them (or fall back to
    the general path) and compute the same map."""
    torch.manual_seed(0)
    layers = [m for m in make("lattice_coupling", torch.float64).modules() if isinstance(m, gflows.GCoupling)]
    coupling = layers[0]
    assert "mask_b" in coupling._buffers  # a checkerboard coupling
    x = torch.randn(3, *coupling.event_shape, dtype=torch.float64)
    old = _as_if_pickled_before(coupling, ("mask_a", "mask_b_bool"), ())
    assert torch.equal(old(x)[0], coupling(x)[0]) and torch.equal(old(x)[1], coupling(x)[1])
    # a plain affine conditioner: the one that bounds (s, t) with the joint bounds
    conditioner = next(m for m in make("coupling", torch.float64).modules() if isinstance(m, Conditioner))
    assert conditioner.affine and not (conditioner.sign_symmetric or conditioner.final_tanh)
    xa = torch.randn(3, conditioner.net.in_channels, 4, 4, dtype=torch.float64)
    old = _as_if_pickled_before(conditioner, ("bounds",), ())
    assert all(torch.equal(a, b) for a, b in zip(old(xa), conditioner(xa), strict=True))
    conv = gflows.nn.GConv2d("trivial", (2, "scalar"), (3, "scalar"), 3, bias=True)
    assert conv.identity_bias
    torch.nn.init.normal_(conv.r2conv.bias)
    y = torch.randn(2, 2, 5, 5)
    old = _as_if_pickled_before(conv, (), ("identity_bias",))
    assert not old.identity_bias and torch.allclose(old(y), conv(y), atol=1e-6)


@pytest.mark.parametrize("kind", ["residual", "coupling"])
def test_layers_pickled_before_the_folded_activation_scale_still_load(kind):
    """A residual block or a coupling pickled before LipSwish's 1 / 1.1 moved into the next filter
    has neither ``scaled`` nor ``input_scale``: the class defaults divide in the activation, the
    same map."""
    torch.manual_seed(0)
    if kind == "residual":
        layer = gflows.GResidualBlock("c4", (1, 4, 4), hidden_fields=2)
    else:
        layer = gflows.GCoupling("c4", (2, 4, 4), hidden_fields=2, zero_init=False)
    layer = layer.to(torch.float64).eval()
    old = copy.deepcopy(layer)
    for m in old.modules():
        m.__dict__.pop("scaled", None)
        m.__dict__.pop("input_scale", None)
    acts = [m for m in old.modules() if isinstance(m, gflows.nn.LipSwish)]
    assert acts and all(a.scaled for a in acts)
    assert any(m.input_scale != 1.0 for m in layer.modules() if isinstance(m, gflows.nn.GConv2d))
    x = torch.randn(3, *layer.event_shape, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)  # the same refresh noise in both power iterations
        y = layer(x)
        torch.manual_seed(1)
        y_old = old(x)
    assert torch.allclose(y_old[0], y[0], rtol=1e-12, atol=1e-12)
    assert not torch.equal(y[0], x)  # the layer acts
