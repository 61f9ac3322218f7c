r"""Equivariant convolutional maps built on escnn's steerable convolutions.

A :class:`GConv2d` is a convolution whose filter is escnn ``R2Conv``'s expansion in a basis of
G-steerable kernels, so ``conv(g . x) = g . conv(x)`` for every element ``g`` of the group (exactly
for grid-exact elements, see :mod:`gflows.groups`). Fields are scalar (trivial representation: one
channel each, moved around by the group) or regular (``|G|`` channels each, moved and permuted).
For the trivial group both are plain channels and the layer is an ordinary convolution through
the same code path.

Every field kind here is a permutation representation, so where every element of the group maps the
grid onto itself (subgroups of D4) an equivariant filter is exactly a filter that is constant on the
orbits of ``G`` on the entries ``(out channel, in channel, kernel position)``:
``K[pi_out(g) o, pi_in(g) i, g . p] = K[o, i, p]``. ``basis='orbit'`` parametrises the filter by one
weight per orbit (a gather instead of escnn's block-wise expansion, and plain per-entry coordinates for
Adam as in an ordinary convolution). Its space is escnn's: the number of orbits equals the dimension of
escnn's basis (``frequencies_cutoff`` keeps the full band), and escnn's initial filter, constant on the
orbits, is the orbit layer's initial filter.

:class:`GConvNet` stacks them ``scalar -> regular -> ... -> regular -> scalar`` with a pointwise
activation between layers; pointwise maps commute with the permutation representations
(scalar and regular), so the stack is equivariant.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gflows.groups import Group, GroupElement, escnn_float32, get_group
from gflows.nn.gather import gather
from gflows.nn.linearised import Linearised, conjugated, is_linearisable, linear, linearise, linearise_layers
from gflows.nn.tanh import tanh
from gflows.representations import field_type, orbit_labels, permutation

__all__ = ["GConv2d", "GConvNet", "GroupAveraged", "LipSwish", "Tanh", "circular_conv2d", "circular_pad",
           "is_channels_last", "kernel_orbits", "symmetry_breaking_sq_norm"]

PADDING_MODES = ("zeros", "circular")
BASES = ("escnn", "orbit", "auto")
# Largest dense basis (entries) kept to expand a filter in one product; larger layers use escnn's.
DENSE_BASIS_LIMIT = 1 << 21


def _full_band(r: float) -> float:
    # escnn's default cut-off drops the highest angular frequencies, leaving 6 of the 9 dimensions
    # of a 3x3 kernel; 4 per unit radius keeps the whole space of equivariant grid kernels.
    return 4.0 * max(r, 1.0)


def kernel_orbits(group: Group, in_type, out_type, kernel_size: int,
                  elements: Sequence[GroupElement] | None = None) -> tuple[Tensor, Tensor]:
    """Orbits of ``group`` (or of its subgroup made of ``elements``) on filter entries and on output
    channels (for the bias).

    Returns ``(index [out, in, k, k], bias_index [out])``: the orbit of each entry of a filter from
    ``in_type`` to ``out_type`` (escnn field types of permutation representations) under
    ``(o, i, p) -> (pi_out(g) o, pi_in(g) i, g . p)``, with ``g . p`` the grid action of
    :meth:`~gflows.groups.Group.act`; a filter is equivariant exactly when it is constant on them.
    """
    if not group.grid_exact:
        raise ValueError(f"basis='orbit' needs a group whose elements map the grid onto itself "
                         f"(subgroups of D4), not {group.name}")
    o, i, k = out_type.size, in_type.size, kernel_size
    ids = torch.arange(o * i * k * k).view(o, i, k, k)
    maps, bias_maps = [], []
    for g in group.elements if elements is None else elements:
        e = group.escnn_element(g)
        so, si = permutation(out_type.representation, e), permutation(in_type.representation, e)
        inv_o, inv_i = torch.argsort(so), torch.argsort(si)
        # entry (o, i, p) of the moved filter is entry (so^-1 o, si^-1 i, g^-1 p) of the filter
        moved = group.act(g, ids[inv_o][:, inv_i])
        maps.append(moved.reshape(-1))
        bias_maps.append(inv_o)
    return orbit_labels(maps, o * i * k * k).view(o, i, k, k), orbit_labels(bias_maps, o)


class _CircularPad(torch.autograd.Function):
    """``F.pad(x, (p,) * 4, mode='circular')`` with its adjoint as a fold: the gradient of the
    padded tensor with each margin added back onto the edge it copies (two copies and four
    in-place sums), where autograd's backward of ``F.pad`` (or of slices and concatenations) builds
    a zero tensor and copies into it slice by slice (a third of a lattice sampler's training
    step on CPU before). Linear, so its forward-mode derivative pads the tangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, p: int) -> Tensor:
        return F.pad(x, (p, p, p, p), mode="circular")

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.p = inputs[1]

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        p = ctx.p
        cols = g[..., p:-p].clone()
        cols[..., :p] += g[..., -p:]
        cols[..., -p:] += g[..., :p]
        rows = cols[..., p:-p, :].clone()
        rows[..., :p, :] += cols[..., -p:, :]
        rows[..., -p:, :] += cols[..., :p, :]
        return rows, None

    @staticmethod
    def jvp(ctx, tx: Tensor, _) -> Tensor:
        return F.pad(tx, (ctx.p,) * 4, mode="circular")


def _adjoint_filter(weight: Tensor) -> Tensor:
    """The filter of a stride-1 convolution's adjoint: in and out channels swapped, the kernel
    flipped (contiguous)."""
    o, i, k, kw = weight.shape
    # reversing the flattened kernel flips both axes; the copy then the flip of its last axis
    # take 0.05 ms at 192 x 128 x 3 x 3 where flipping the transposed view takes 0.13
    return weight.transpose(0, 1).reshape(i, o, k * kw).flip(2).view(i, o, k, kw)


def circular_pad(x: Tensor, p: int) -> Tensor:
    """Periodic padding of the last two axes by ``p`` (``p`` at most the size of each axis): the
    values of ``F.pad(x, ..., 'circular')``, with a cheaper backward pass (:class:`_CircularPad`)."""
    return _CircularPad.apply(x, p) if p else x


def _engine_needs(ctx, i: int) -> bool:
    """Whether this backward pass needs the gradient of a custom function's ``i``-th input.
    ``ctx.needs_input_grad`` only says whether the input requires grad; the engine knows whether the
    pass at hand reaches it (``autograd.grad`` with respect to the input of a network needs no filter
    gradients), as built-in operators are told through their output mask."""
    if not ctx.needs_input_grad[i]:
        return False
    try:
        node = ctx.next_functions[i][0]
        return node is not None and torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):  # private API; leaves under autograd.grad are not answered
        return True


class _CircularConv(torch.autograd.Function):
    """The periodic convolution ``y = conv2d(circular_pad(x, p), w) + b``, whose input gradient is
    again a periodic convolution: ``conv2d(circular_pad(g, p), w')`` with ``w'`` the flipped filter,
    in and out channels swapped (the adjoint of a circulant operator is its correlation). One
    forward convolution instead of the backend's input-gradient convolution and a fold of the
    padding; the filter and bias gradients are the backend's, computed only when the pass needs them.
    Bilinear in ``(x, w)``: the forward-mode derivative is ``conv(tx, w) + conv(x, tw) + tb``.

    The padded input is a second (non-differentiable) output, kept for the filter gradient, and
    ``w'`` is made once per graph: a path-gradient step runs each convolution's backward twice (the
    score, then the loss), and the pads and flips were a tenth of its dispatched operators. A backward
    pass that builds a graph (second derivatives) recomputes both from ``x`` and ``w``, so that they
    are differentiated."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, p: int) -> tuple[Tensor, Tensor]:
        xp = F.pad(x, (p, p, p, p), mode="circular")
        return F.conv2d(xp, weight, bias), xp

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, p = inputs
        y, xp = output
        ctx.mark_non_differentiable(xp)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, xp, weight)
        ctx.save_for_forward(xp, weight)
        ctx.p, ctx.has_bias, ctx.out_shape, ctx.adjoint = p, bias is not None, y.shape, None

    @staticmethod
    def backward(ctx, g: Tensor | None, _):
        if g is None:
            return None, None, None, None
        x, xp, weight = ctx.saved_tensors
        p, (need_x, need_w, need_b) = ctx.p, (_engine_needs(ctx, i) for i in range(3))
        graph = torch.is_grad_enabled()
        gx = gw = gb = None
        if need_x:
            adjoint = ctx.adjoint
            if adjoint is None or graph:
                adjoint = _adjoint_filter(weight)
            if not graph:
                ctx.adjoint = adjoint
            gx = F.conv2d(F.pad(g, (p, p, p, p), mode="circular"), adjoint)
        if need_w:
            if graph:
                xp = F.pad(x, (p, p, p, p), mode="circular")
            gw = torch.ops.aten.convolution_backward(g, xp, weight, None, [1, 1], [0, 0], [1, 1], False,
                                                     [0, 0], 1, [False, True, False])[1]
        if need_b and ctx.has_bias:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None

    @staticmethod
    def jvp(ctx, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None, _) -> tuple[Tensor, None]:
        xp, weight = ctx.saved_tensors  # those of save_for_forward
        p = (ctx.p,) * 4
        terms = []
        if tx is not None:
            terms.append(F.conv2d(F.pad(tx, p, mode="circular"), weight))
        if tw is not None:
            terms.append(F.conv2d(xp, tw))
        if tb is not None:
            terms.append(tb.view(1, -1, 1, 1).expand(ctx.out_shape))
        return sum(terms[1:], terms[0]), None


def circular_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d`` of ``x`` padded periodically by half the (odd, square) kernel: a convolution
    on the torus, with a cheaper backward pass (:class:`_CircularConv`)."""
    return _CircularConv.apply(x, weight, bias, weight.shape[-1] // 2)[0]


def _orbit_mean(values: Tensor, index: Tensor) -> Tensor:
    n = int(index.max()) + 1
    flat = index.reshape(-1)
    total = torch.zeros(n, dtype=values.dtype).index_add_(0, flat, values.reshape(-1))
    return total / torch.bincount(flat, minlength=n).to(values.dtype)


def _refresh_after_load(module: GConv2d, incompatible_keys) -> None:
    module._refresh_dense_basis()


_IDENTITY_HASHED: dict[type, type] = {}


def _hash_by_identity(module: nn.Module) -> None:
    """Give ``module`` and its children identity hashing and equality, in place.

    escnn's basis expansions hash and compare their whole sampled basis (through numpy), and every
    walk of a module tree (``modules()``, ``parameters()``, ``train()``) hashes each module into a
    set: 20 ms per walk of a 16-layer D4 lattice sampler, several walks per training step. A layer's
    own copy of its expansion (see ``_build_escnn``) is never looked up by content again, so a
    subclass with ``object``'s hash serves it."""
    cls = type(module)
    if cls.__hash__ is not object.__hash__:  # nn.Module's own hash is object's
        if cls not in _IDENTITY_HASHED:
            _IDENTITY_HASHED[cls] = type(cls.__name__, (cls,), {"__hash__": object.__hash__,
                                                                 "__eq__": object.__eq__,
                                                                 "__module__": cls.__module__})
        module.__class__ = _IDENTITY_HASHED[cls]
    for child in module._modules.values():
        if child is not None:
            _hash_by_identity(child)


class GConv2d(nn.Module):
    """Steerable 2D convolution between scalar/regular fields of a group.

    Args:
        group: the symmetry group (name or :class:`~gflows.groups.Group`).
        in_fields: ``(n, kind)`` of the input, ``kind`` in ``{'scalar', 'regular'}``, or
            ``(n, 'scalar', levels)`` for scalar fields squeezed ``levels`` times (see :func:`field_type`).
        out_fields: the same for the output.
        kernel_size: odd kernel size; the output has the input's spatial size.
        padding_mode: ``'zeros'`` or ``'circular'`` (periodic lattices).
        bias: add an equivariant bias.
        basis: ``'escnn'`` (the filter is escnn's expansion in its steerable basis; parameters
            ``r2conv.weights``) or ``'orbit'`` (one weight per orbit of filter entries, subgroups of
            D4 only; parameters ``orbit_weights`` and ``orbit_bias``; see the module docstring). The
            two span the same filters and start from the same one. ``'auto'``: ``'orbit'`` where the
            group allows it, else ``'escnn'``.
        relax: relaxed equivariance (the residual pathway of Finzi et al. 2021): the filter is
            ``W = W_G + relax * V`` with ``V`` an unconstrained filter (and bias) that starts at zero,
            so the layer starts equivariant and ``relax`` sets how far training can break the
            symmetry (with Adam, ``V`` moves by about the learning rate per step, ``W`` by ``relax``
            times that). ``relax=0`` (the default) is the strict layer itself: no ``V``, the same
            parameters and outputs. Every consumer of the filter (spectral norms, export) sees the sum.
        relax_to: a subgroup ``H`` of ``group`` that the free part keeps: ``V`` is then
            ``H``-equivariant (one weight per ``H``-orbit of filter entries), so the layer is exactly
            ``H``-equivariant and only approximately ``G``-equivariant, for data with a partial
            symmetry (photographs: the mirror exact, quarter turns broken: ``group='d4',
            relax_to='flip'``). ``None`` or ``'trivial'``: ``V`` unconstrained. Needs ``relax > 0``
            and a group that maps the grid onto itself.
    """

    def __init__(
        self,
        group: str | Group,
        in_fields: tuple[int, str] | tuple[int, str, int],
        out_fields: tuple[int, str] | tuple[int, str, int],
        kernel_size: int = 3,
        padding_mode: str = "zeros",
        bias: bool = True,
        basis: str = "escnn",
        relax: float = 0.0,
        relax_to: str | Group | None = None,
    ):
        super().__init__()
        if not relax >= 0:
            raise ValueError(f"relax must be >= 0 (0: strictly equivariant), got {relax}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"unknown padding_mode {padding_mode!r}: expected one of {PADDING_MODES}")
        if basis not in BASES:
            raise ValueError(f"unknown basis {basis!r}: expected one of {BASES}")
        self.group = get_group(group)
        if basis == "auto":
            basis = "orbit" if self.group.grid_exact else "escnn"
        self.basis = basis
        self._fields = (tuple(in_fields), tuple(out_fields))
        self.kernel_size = kernel_size
        self.padding_mode = padding_mode
        with escnn_float32() as dtype:
            self._build(bias, basis)
        self.relax = float(relax)
        self.relax_to = self._checked_relax_to(relax_to)
        if self.relax:
            self._build_free(bias)
        self.to(dtype)

    def _checked_relax_to(self, relax_to: str | Group | None) -> Group | None:
        """The subgroup the free part keeps (``None``: none, ``V`` unconstrained)."""
        if relax_to is None:
            return None
        sub = get_group(relax_to)
        name = relax_to if isinstance(relax_to, str) else sub.name  # as spelled ('flip', not 'd1')
        if not self.relax:
            raise ValueError(f"relax_to={name!r} names the subgroup a relaxed layer's free part keeps: "
                             f"set relax > 0 too")
        if sub == self.group:
            raise ValueError(f"relax_to={name!r} is the layer's own group, which is the strict layer: "
                             f"set relax=0, or relax_to a proper subgroup")
        self.group.subgroup_elements(sub)  # refuses a group that is not a subgroup
        if not self.group.grid_exact:
            raise ValueError(f"relax_to needs a group whose elements map the grid onto itself "
                             f"(subgroups of D4), not {self.group.name}")
        return None if sub.name == "trivial" else sub

    def _build_free(self, bias: bool) -> None:
        """The free part ``V`` of a relaxed layer: a whole filter, or one weight per orbit of
        ``relax_to`` on its entries."""
        shape = (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        if self.relax_to is None:
            self.free_weight = nn.Parameter(torch.zeros(shape))
            self.free_bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
            return
        index, bias_index = kernel_orbits(self.group, self.in_type, self.out_type, self.kernel_size,
                                          self.group.subgroup_elements(self.relax_to))
        self.register_buffer("free_index", index, persistent=False)
        self.register_buffer("free_bias_index", bias_index, persistent=False)
        self.free_weight = nn.Parameter(torch.zeros(int(index.max()) + 1))
        self.free_bias = nn.Parameter(torch.zeros(int(bias_index.max()) + 1)) if bias else None

    def free_part(self) -> tuple[Tensor, Tensor | None]:
        """A relaxed layer's free filter ``V`` ``[out, in, k, k]`` and its bias (gathered from the
        orbit weights with ``relax_to``), before the factor ``relax``."""
        if self.relax_to is None:
            return self.free_weight, self.free_bias
        bias = None if self.free_bias is None else gather(self.free_bias, self.free_bias_index)
        return gather(self.free_weight, self.free_index), bias

    def _build(self, bias: bool, basis: str) -> None:
        self.r2conv = self._build_escnn(bias)
        # The filter is a linear function of the basis weights. For small layers (lattices) escnn's
        # block-wise expansion costs more than the convolution itself, so keep the expansion as one
        # dense matrix (not saved: the state_dict stays escnn's) and apply it with one product.
        dense = self._dense_basis() if basis == "escnn" else None
        self.register_buffer("dense_basis", dense, persistent=False)
        self.register_buffer("block_basis", self._block_basis(dense), persistent=False)
        # one bias per channel (scalar fields, the trivial group's): no expansion to apply or record
        expansion = getattr(self.r2conv, "bias_expansion", None)
        self.identity_bias = expansion is not None and \
            torch.equal(expansion, torch.eye(len(expansion), dtype=expansion.dtype))
        # A checkpoint carries escnn's sampled basis: rebuild the dense copy from the loaded one.
        self.register_load_state_dict_post_hook(_refresh_after_load)
        if basis == "orbit":
            self._to_orbit_basis()

    def _build_escnn(self, bias: bool | None):
        """escnn's field types and (unless ``bias`` is ``None``) its R2Conv for this layer."""
        from escnn import nn as enn

        self.in_type, self.out_type = (field_type(self.group, *f) for f in self._fields)
        if bias is None:
            return None
        r2conv = enn.R2Conv(
            self.in_type, self.out_type, self.kernel_size, padding=0, bias=bias, frequencies_cutoff=_full_band
        )
        # Drop escnn's cache buffers so that the state_dict is the same in every mode (see train).
        nn.Module.train(r2conv, True)
        for name in ("filter", "expanded_bias"):
            r2conv._buffers.pop(name, None)
        # escnn caches its block expansions and shares them between layers of equal field types, so
        # moving one layer (.to(float64), .cuda()) would move the others' bases too: own a copy.
        expansion = r2conv.basisexpansion
        for name, child in list(expansion._modules.items()):
            expansion._modules[name] = copy.deepcopy(child)
        _hash_by_identity(expansion)
        return r2conv

    #: layers pickled before the flag existed apply escnn's bias expansion, which is always right
    identity_bias = False
    #: a factor taken into the filter: the layer maps ``x`` to ``W (input_scale x) + b``, so that it
    #: may follow a LipSwish whose division by 1.1 was left out (``GConvNet`` sets it); the class
    #: default serves layers pickled before it existed
    input_scale = 1.0

    # escnn's field types and modules hold local functions and do not pickle: pickling (torch.save of
    # the module, copy.deepcopy, multiprocessing) keeps the field specifications and escnn's weights,
    # and unpickling rebuilds the escnn objects from the group's name.
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["in_type"] = state["out_type"] = None
        modules = state["_modules"] = state["_modules"].copy()
        if modules.get("r2conv") is not None:
            state["_r2conv_state"] = modules["r2conv"].state_dict()
            state["_r2conv_bias"] = modules["r2conv"].bias is not None
            modules["r2conv"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        r2conv_state, bias = state.pop("_r2conv_state", None), state.pop("_r2conv_bias", None)
        super().__setstate__(state)
        with escnn_float32():
            r2conv = self._build_escnn(bias)
        if r2conv is not None:
            weights = r2conv_state["weights"]
            r2conv.to(device=weights.device, dtype=weights.dtype)
            r2conv.load_state_dict(r2conv_state)
            for m in r2conv.modules():
                m.training = self.training
            self.r2conv = r2conv

    def _to_orbit_basis(self) -> None:
        index, bias_index = kernel_orbits(self.group, self.in_type, self.out_type, self.kernel_size)
        with torch.no_grad():
            w, b = self.r2conv.expand_parameters()
        weights = _orbit_mean(w, index)
        # escnn's filter must already be constant on the orbits: a failure here means the orbits
        # and escnn disagree on the group action, and the layer would not be equivariant.
        if int(index.max()) + 1 != self.r2conv.weights.numel() or \
                float((weights[index] - w).abs().max()) > 1e-5 * (float(w.abs().max()) + 1e-12):
            raise RuntimeError(f"orbits of {self.group.name} disagree with escnn's basis for "
                               f"{self.in_type} -> {self.out_type}")
        self.register_buffer("orbit_index", index, persistent=False)
        self.orbit_weights = nn.Parameter(weights)
        if b is None:
            self.orbit_bias = None
        else:
            self.register_buffer("bias_index", bias_index, persistent=False)
            self.orbit_bias = nn.Parameter(_orbit_mean(b, bias_index))
        # escnn's module, its basis and weights are no longer used: keep neither in the state_dict.
        self.r2conv = None

    @torch.no_grad()
    def filter_step(self) -> float:
        """How far a filter entry moves, RMS over the filter, when every basis weight moves by one
        in random signs (as Adam's first steps move them): ``sqrt(||B||_F^2 / entries)`` for the
        filter ``W = B w``. 1 for the orbit basis (each weight is copied to its orbit's entries) and
        for escnn's basis of the trivial group; about 0.4 for escnn's basis of D4 on regular fields,
        whose basis filters are normalised over whole orbits, so that at one learning rate Adam
        moves a D4 filter 2.5x less per step than a plain one. Where no dense basis is kept (large
        layers), ``||B||_F^2`` has an unbiased estimate from 16 random-sign expansions."""
        w = self.basis_weights
        entries = self.out_channels * self.in_channels * self.kernel_size ** 2
        if self.basis == "orbit":
            sq = float(entries)
        elif self.dense_basis is not None:
            sq = float(self.dense_basis.double().pow(2).sum())
        else:
            g = torch.Generator().manual_seed(0)
            signs = torch.randint(0, 2, (16, w.numel()), generator=g).to(w) * 2 - 1
            sq = sum(float(self.r2conv.basisexpansion(s).double().pow(2).sum()) for s in signs) / 16
        return (sq / entries) ** 0.5

    @property
    def basis_weights(self) -> nn.Parameter:
        """The filter's coordinates: ``orbit_weights`` or escnn's ``r2conv.weights`` (the filter is
        linear in them)."""
        return self.orbit_weights if self.basis == "orbit" else self.r2conv.weights

    @torch.no_grad()
    def zero_(self) -> GConv2d:
        """Set the filter and the bias to zero (a layer that starts as the zero map)."""
        if self.basis == "orbit":
            params = [self.orbit_weights, self.orbit_bias]
        else:
            params = [self.r2conv.weights, self.r2conv.bias]
        if self.relax:
            params += [self.free_weight, self.free_bias]
        for p in params:
            if p is not None:
                p.zero_()
        return self

    def _dense_basis(self) -> Tensor | None:
        n, k = self.r2conv.weights.numel(), self.kernel_size
        if n * self.out_type.size * self.in_type.size * k * k > DENSE_BASIS_LIMIT:
            return None
        eye = torch.eye(n, dtype=self.r2conv.weights.dtype, device=self.r2conv.weights.device)
        with torch.no_grad():
            dense = torch.stack([self.r2conv.basisexpansion(e) for e in eye], -1)
        return dense.reshape(self.out_type.size, self.in_type.size, k, k, n)

    def _block_basis(self, dense: Tensor | None) -> Tensor | None:
        """``[b, fo * fi * k * k]``: escnn's basis of one pair of fields, when the dense basis is that
        block repeated down the diagonal, one per (out field, in field) pair in escnn's pair-major
        order (as for uniform field types); else ``None``. The filter is then one ``[pairs, b] @
        [b, entries]`` product instead of a product with the whole, mostly zero, dense basis
        (576 x 576 for eight 8-channel fields, of which 1.2% is non-zero)."""
        if dense is None:
            return None
        n_out, n_in, k = len(self.out_type), len(self.in_type), self.kernel_size
        (o, c), n = dense.shape[:2], dense.shape[-1]
        pairs = n_out * n_in
        if o % n_out or c % n_in or n % pairs:
            return None
        fo, fi, b = o // n_out, c // n_in, n // pairs
        # [basis element, (out field, in field, fo, fi, k, k)]
        by_pair = dense.reshape(n_out, fo, n_in, fi, k * k, n).permute(5, 0, 2, 1, 3, 4).reshape(n, -1)
        block = by_pair[:b, : fo * fi * k * k]
        if not torch.equal(by_pair, torch.block_diag(*([block] * pairs))):
            return None
        return block.clone()

    def _refresh_dense_basis(self) -> None:
        if self.dense_basis is not None:
            self.dense_basis = self._dense_basis()
            self.block_basis = self._block_basis(self.dense_basis)

    def train(self, mode: bool = True) -> GConv2d:
        # escnn's R2Conv.eval() caches its expanded filter as extra buffers, which would change the
        # state_dict between modes; the filter is expanded here on every call instead.
        # Set the flags directly: nn.Module.train would recurse into R2Conv.train, which caches.
        for m in self.modules():
            m.training = mode
        return self

    @property
    def in_channels(self) -> int:
        return self.in_type.size

    @property
    def out_channels(self) -> int:
        return self.out_type.size

    def expanded(self) -> tuple[Tensor, Tensor | None]:
        """The dense filter ``[out, in, k, k]`` and bias, differentiable in the basis weights (plus
        the free part of a relaxed layer)."""
        w, b = self._equivariant_filter()
        if not self.relax:
            return w, b
        v, vb = self.free_part()
        return w + self.relax * v, (None if b is None else b + self.relax * vb)

    def _equivariant_filter(self) -> tuple[Tensor, Tensor | None]:
        if self.basis == "orbit":
            bias = None if self.orbit_bias is None else gather(self.orbit_bias, self.bias_index)
            return gather(self.orbit_weights, self.orbit_index), bias
        if self.dense_basis is None:
            return self.r2conv.expand_parameters()
        conv = self.r2conv
        bias = conv.bias
        if bias is not None and not self.identity_bias:
            bias = conv.bias_expansion @ bias
        if self.block_basis is None:
            return self.dense_basis @ conv.weights, bias
        n_out, n_in, k = len(self.out_type), len(self.in_type), self.kernel_size
        fo, fi = self.out_channels // n_out, self.in_channels // n_in
        w = conv.weights.view(n_out * n_in, -1) @ self.block_basis
        if fo == 1 or n_in == 1:  # (out field, in field, fo, fi) is already the channel order
            return w.view(self.out_channels, self.in_channels, k, k), bias
        w = w.view(n_out, n_in, fo, fi, k, k).transpose(1, 2)
        return w.reshape(self.out_channels, self.in_channels, k, k), bias

    def pad(self, x: Tensor) -> Tensor:
        p = self.kernel_size // 2
        if p == 0:
            return x
        if self.padding_mode == "circular":
            return circular_pad(x, p)
        return F.pad(x, (p, p, p, p))

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The convolution with an explicit filter (used with normalised filters)."""
        if self.kernel_size == 1 and x.device.type == "cpu" and x.dim() == 4:
            return _pointwise(x, weight, bias)
        if self.padding_mode == "zeros":  # let the kernel pad: no padded copy of the input
            return F.conv2d(x, weight, bias, padding=self.kernel_size // 2)
        return circular_conv2d(x, weight, bias)

    def applied(self) -> tuple[Tensor, Tensor | None]:
        """The filter and bias that :meth:`forward` convolves with: :meth:`expanded`, the filter
        times ``input_scale``."""
        w, b = self.expanded()
        return (w if self.input_scale == 1.0 else w * self.input_scale), b

    def adjoint(self, weight: Tensor) -> Callable[[Tensor], Tensor]:
        """The transpose of the linear map ``x -> conv(x, weight)`` (no bias), which is its exact
        vector-Jacobian product in ``x``: again a convolution with the same padding (stride 1, odd
        square kernel), with in and out channels swapped and the kernel flipped; a periodic
        convolution's adjoint is periodic."""
        adjoint = _adjoint_filter(weight)
        return lambda v: self.conv(v, adjoint)

    #: gives its Jacobian (:mod:`gflows.nn.linearised`)
    linearisable = True

    def linearise(self, x: Tensor) -> tuple[Tensor, Linearised]:
        """:meth:`forward`, and its Jacobian in ``x`` (the layer is linear: ``J t = conv(t, W)``)."""
        w, b = self.applied()
        return self.conv(x, w, b), linear(self.adjoint(w.detach()), lambda t: self.conv(t, w))

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.applied()
        return self.conv(x, w, b)


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` is a 4-D tensor stored channels-last (NHWC) and not also plainly contiguous."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution as one batched matrix product over the pixels: with its backward 1.4-2.1x
    faster than the CPU's convolution kernels at 128 channels (benchmarks/bench_pointwise.py)."""
    b, c, h, w = x.shape
    if is_channels_last(x):
        # pixels as rows [B, H, W, C] in place: one product, and the output stays channels-last
        y = x.permute(0, 2, 3, 1).reshape(b, h * w, c) @ weight.view(weight.shape[0], c).t()
        if bias is not None:
            y = y + bias
        return y.view(b, h, w, -1).permute(0, 3, 1, 2)
    mat = weight.view(1, weight.shape[0], c).expand(b, -1, -1)
    cols = x.reshape(b, c, h * w)
    if bias is None:
        y = torch.bmm(mat, cols)
    else:
        y = torch.baddbmm(bias.view(1, -1, 1).expand(b, -1, 1), mat, cols)
    return y.view(b, -1, h, w)


class LipSwish(nn.Module):
    r"""LipSwish :math:`x \sigma(\beta x) / 1.1` with :math:`\beta = \mathrm{softplus}(\rho) > 0`.

    Its Lipschitz constant is at most 1 (Chen et al. 2019, Residual Flows): that of
    :math:`x \sigma(\beta x)` is about 1.0998 for every :math:`\beta > 0`. One :math:`\beta`
    per field, shared by a field's channels, so it commutes with the group's permutation of them.

    Args:
        n_fields: number of fields.
        field_size: channels per field (1 for scalar fields, ``|G|`` for regular ones).
        scaled: ``False`` leaves out the division by 1.1 (the map is then 1.1-Lipschitz) for a
            following linear layer that folds the factor into its weights (:class:`GConvNet` does
            so for spectrally normalised convolutions): one element-wise pass fewer in the forward
            pass and in every vector-Jacobian product.
    """

    #: an upper bound on the Lipschitz constant of ``x sigmoid(beta x)``, over all ``beta > 0``
    LIPSCHITZ = 1.1
    scaled = True  # the class default serves modules pickled before the option

    def __init__(self, n_fields: int = 1, field_size: int = 1, scaled: bool = True):
        super().__init__()
        self.field_size = field_size
        self.scaled = bool(scaled)
        # softplus(0.5413) = 1: start from the plain swish.
        self.rho = nn.Parameter(torch.full((n_fields,), 0.5413))

    def _swish(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The output, and ``beta x`` and ``sigmoid(beta x)`` with fields on an axis of their own."""
        # beta broadcast without a repeated copy: over the channels as they are for one-channel
        # fields, else over a field axis of their own (every recorded operator costs in each backward)
        xf = x if self.field_size == 1 else x.unflatten(1, (-1, self.field_size))
        beta = F.softplus(self.rho).view(-1, *([1] * (xf.dim() - 2)))
        bx = beta * xf
        s = torch.sigmoid(bx)
        y = xf * s
        if self.scaled:
            y = y / self.LIPSCHITZ
        return (y if self.field_size == 1 else y.flatten(1, 2)), bx, s

    def forward(self, x: Tensor) -> Tensor:
        return self._swish(x)[0]

    #: gives its Jacobian (:mod:`gflows.nn.linearised`)
    linearisable = True

    def linearise(self, x: Tensor) -> tuple[Tensor, Linearised]:
        r""":meth:`forward`, and its Jacobian in ``x``: the product with the derivative of
        :math:`x \sigma(\beta x)`, which is :math:`\mathrm{silu}'(\beta x)`. Without a graph the
        backend's fused ``silu_backward`` applies it in one pass (autograd's product takes five);
        with one (``jvp``) the derivative is built differentiably from the forward pass's sigmoid."""
        y, bx, s = self._swish(x)
        return y, _swish_jacobian(bx, s, 1 / self.LIPSCHITZ if self.scaled else None)


def _swish_jacobian(bx: Tensor, s: Tensor, scale: float | None) -> Linearised:
    """LipSwish's Jacobian from its forward pass's ``beta x`` and ``sigmoid(beta x)`` (fields on an
    axis of their own), times ``scale``; its rows index those."""
    bx_const = bx.detach()

    def vjp(v: Tensor) -> Tensor:
        u = torch.ops.aten.silu_backward(v.reshape(bx_const.shape), bx_const).reshape(v.shape)
        return u if scale is None else u * scale

    def jvp(t: Tensor) -> Tensor:
        d = s * (1 + bx * (1 - s))
        if scale is not None:
            d = d * scale
        return (t.reshape(d.shape) * d).reshape(t.shape)

    def rows(index: Tensor | slice) -> Linearised:
        return _swish_jacobian(bx[index], s[index], scale)

    return Linearised(vjp, jvp, rows)


def _tanh_jacobian(y: Tensor) -> Linearised:
    """tanh's Jacobian from its output ``y`` (with its graph, for ``jvp``); its rows index ``y``."""
    y_const = y.detach()
    return Linearised(lambda v: torch.ops.aten.tanh_backward(v, y_const),
                      lambda t: torch.ops.aten.tanh_backward(t, y),
                      lambda index: _tanh_jacobian(y[index]))


class Tanh(nn.Tanh):
    r""":math:`\tanh`, odd and 1-Lipschitz, that gives its Jacobian (:mod:`gflows.nn.linearised`).

    Pointwise, so it commutes with every permutation of channels and pixels; the odd residual
    branches of the lattice samplers use it between convolutions without biases. float32 on the
    CPU goes through :func:`gflows.nn.tanh.tanh` (the logistic form for large tensors, faster
    there with its backward, exactly odd, absolute error below ``2e-7``).
    """

    def forward(self, x: Tensor) -> Tensor:
        return tanh(x)

    #: gives its Jacobian (:mod:`gflows.nn.linearised`)
    linearisable = True

    def linearise(self, x: Tensor) -> tuple[Tensor, Linearised]:
        r""":meth:`forward`, and its Jacobian in ``x``: the product with :math:`1 - \tanh^2 x`, by the
        backend's fused ``tanh_backward`` both ways; with a graph (``jvp``) from the output that carries
        one, whose derivative autograd knows (one recorded operator where ``t * (1 - y * y)`` takes
        three, and fewer products in the backward pass)."""
        y = tanh(x)
        return y, _tanh_jacobian(y)


class GConvNet(nn.Module):
    """``scalar -> regular -> ... -> regular -> scalar`` stack of :class:`GConv2d` and LipSwish.

    With ``squeeze_levels = L`` the input and output are scalar fields squeezed ``L`` times
    (``4^L`` channels each, see :func:`field_type`): the stack runs on the coarse grid and is
    equivariant for the squeezed tensors' true representation (grid-exact groups only).

    Args:
        group: the symmetry group.
        in_channels: input channels (scalar fields, or ``4^L`` per squeezed field).
        out_channels: output channels, likewise.
        hidden_fields: regular fields per hidden layer (``hidden_fields * |G|`` channels).
        kernel_sizes: one kernel size per convolution; ``len(kernel_sizes) - 1`` hidden layers.
        padding_mode: ``'zeros'`` or ``'circular'``.
        conv: the convolution class (a :class:`GConv2d` subclass), with ``conv_kwargs``.
        bias: biases in the convolutions.
        activation: activation factory ``(n_fields, field_size) -> nn.Module``.
        squeeze_levels: how many times the input and output scalar fields have been squeezed.

    With LipSwish between the convolutions, each LipSwish leaves out its division by 1.1 and the
    next convolution takes it into its filter (``input_scale``; after the spectral normalisation
    for Lipschitz convolutions): the same map, with one element-wise pass over the activations fewer
    per LipSwish in every forward pass and vector-Jacobian product, for one over the filter.
    """

    def __init__(
        self,
        group: str | Group,
        in_channels: int,
        out_channels: int,
        hidden_fields: int,
        kernel_sizes: Sequence[int] = (3, 1, 3),
        padding_mode: str = "zeros",
        conv: type[GConv2d] = GConv2d,
        conv_kwargs: dict | None = None,
        bias: bool = True,
        activation=LipSwish,
        squeeze_levels: int = 0,
    ):
        super().__init__()
        self.group = get_group(group)
        if len(kernel_sizes) < 1:
            raise ValueError("kernel_sizes must name at least one convolution")
        field_size = 4**squeeze_levels
        if in_channels % field_size or out_channels % field_size:
            raise ValueError(f"{in_channels} -> {out_channels} channels are not whole fields of {field_size} "
                             "squeezed sub-pixels")
        fields = [(in_channels // field_size, "scalar", squeeze_levels)]
        fields += [(hidden_fields, "regular")] * (len(kernel_sizes) - 1)
        fields += [(out_channels // field_size, "scalar", squeeze_levels)]
        fold = activation is LipSwish
        layers: list[nn.Module] = []
        for i, k in enumerate(kernel_sizes):
            layer = conv(self.group, fields[i], fields[i + 1], k, padding_mode, bias, **(conv_kwargs or {}))
            if fold and i > 0:
                layer.input_scale = 1 / LipSwish.LIPSCHITZ
            layers.append(layer)
            if i < len(kernel_sizes) - 1:
                layers.append(LipSwish(hidden_fields, self.group.order, scaled=False) if fold
                              else activation(hidden_fields, self.group.order))
        self.layers = nn.ModuleList(layers)
        self.in_channels, self.out_channels = in_channels, out_channels

    @property
    def linearisable(self) -> bool:
        """Whether every layer gives its Jacobian (:meth:`linearise`) and none has forward hooks,
        which :meth:`linearise` would bypass (the layers' ``forward`` is not called)."""
        return all(is_linearisable(layer) for layer in self.layers)

    def linearise(self, x: Tensor) -> tuple[Tensor, Linearised]:
        """:meth:`forward` (with its graph, as usual) and its Jacobian at ``x`` for the current
        parameters (:mod:`gflows.nn.linearised`). Needs :attr:`linearisable`."""
        if not self.linearisable:
            raise TypeError("a layer of this stack cannot give its Jacobian: "
                            f"{[type(m).__name__ for m in self.layers]}")
        return linearise_layers(self.layers, x)

    #: inputs of at least this many pixels run channels-last on CPU (see :meth:`prefers_channels_last`)
    CHANNELS_LAST_PIXELS = 256

    def prefers_channels_last(self, x: Tensor) -> bool:
        """Whether the stack runs faster on ``x`` stored channels-last (NHWC): on CPU, zero padding and
        at least :attr:`CHANNELS_LAST_PIXELS` pixels. A residual branch's training work (12 -> 128 ->
        128 -> 12 channels, batch 16) then takes 0.84x the time at 16 x 16, but 0.96-1.00x at 8 x 8
        and 1.11-1.15x at 4 x 4, where the layout's conversions and strided element-wise passes cost
        more than the convolutions gain (benchmarks/bench_step_ab.py --layout, RESULTS.md, 2026-12-06).
        A caller that converts ``x`` keeps every vector it applies the stack's Jacobian to in the same
        layout."""
        # the padding from the layers (all share it), so that stacks pickled before this method work
        return (x.device.type == "cpu" and x.dim() == 4 and self.layers[0].padding_mode == "zeros"
                and x.shape[-1] * x.shape[-2] >= self.CHANNELS_LAST_PIXELS)

    def hidden(self, x: Tensor) -> Tensor:
        """The last hidden layer's regular fields (after its activation), as the last convolution
        takes them (before its ``input_scale``), for heads that share the stack's features."""
        for layer in self.layers[:-1]:
            x = layer(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.layers[-1](self.hidden(x))

    @property
    def n_parameters(self) -> int:
        return sum(math.prod(p.shape) for p in self.parameters())


class GroupAveraged(nn.Module):
    r"""Group average :math:`\bar f(x) = \frac{1}{|H|} \sum_{h \in H} h^{-1} \cdot f(h \cdot x)` of any map
    ``f`` between scalar fields ``[B, C, H, W]`` (for example a dense network).

    ``H`` is the subgroup of grid-exact elements of ``group`` (all of it for C4, D4 and their
    subgroups; C4 / D4 inside C8 / D8), on which :meth:`~gflows.groups.Group.act` is an exact
    permutation of pixels, so :math:`\bar f(h \cdot x) = h \cdot \bar f(x)` exactly for ``h`` in ``H``.
    Each term has the Lipschitz constant of ``f`` (``h`` is an isometry), hence so has the average.
    One call of ``f`` on the ``|H|``-times larger batch.
    """

    def __init__(self, group: str | Group, net: nn.Module):
        super().__init__()
        self.group, self.net = get_group(group), net

    def _stacked(self, x: Tensor) -> Tensor:
        """``h . x`` for every grid-exact ``h``, one batch after the other."""
        return torch.cat([self.group.act(h, x) for h in self.group.grid_elements])

    def _averaged(self, ys: Tensor) -> Tensor:
        """The mean of ``h^-1 . y_h`` over the batches of ``ys`` (the order of :meth:`_stacked`)."""
        elements = self.group.grid_elements
        ys = ys.chunk(len(elements))
        return sum(self.group.act(h.inverse, y) for h, y in zip(elements, ys, strict=True)) / len(elements)

    def forward(self, x: Tensor) -> Tensor:
        return self._averaged(self.net(self._stacked(x)))

    @property
    def linearisable(self) -> bool:
        """Whether ``f`` gives its Jacobian (:func:`~gflows.nn.linearised.is_linearisable`)."""
        return is_linearisable(self.net)

    def linearise(self, x: Tensor) -> tuple[Tensor, Linearised]:
        r""":meth:`forward`, and its Jacobian :math:`\frac{1}{|H|} \sum_h h^{-1} J_f(h x)\, h`; ``h`` is a
        permutation, so its transpose is :math:`h^{-1}` and the transpose has the same form with
        :math:`J_f^T`. Needs :attr:`linearisable`."""
        y, jac = linearise(self.net, self._stacked(x))
        if jac is None:
            raise TypeError(f"{type(self.net).__name__} cannot give its Jacobian")
        b, copies = x.shape[0], len(self.group.grid_elements)

        def rows_of(index: Tensor | slice) -> Tensor:  # entry i's copies sit at i, i + b, i + 2b, ...
            if isinstance(index, slice):
                index = torch.arange(b, device=x.device)[index]
            return torch.cat([index + k * b for k in range(copies)])

        return self._averaged(y), conjugated(jac, self._stacked, self._averaged, rows_of)


def symmetry_breaking_sq_norm(module: nn.Module) -> Tensor | None:
    r""":math:`\sum \|\mathrm{relax}\, V\|^2` over the relaxed convolutions in ``module``: the squared
    norm of every filter's (and bias's) non-equivariant part :math:`W - W_G`, whose multiple is the
    Gaussian prior, or L2 penalty, on the free pathway of Finzi et al. (2021); ``None`` without
    relaxed layers."""
    terms = [(m.relax * p).square().sum() for m in module.modules() if isinstance(m, GConv2d) and m.relax
             for p in m.free_part() if p is not None]
    return torch.stack(terms).sum() if terms else None
