"""Builders of image flows from a few settings.

Multiscale models follow Residual Flows / Glow: at each scale ``blocks_per_scale`` blocks, each
followed by ActNorm, and a squeeze between scales; residual models may end, as Residual Flows' do,
with ``fc_blocks`` fully-connected G-residual blocks
(:class:`~gflows.transforms.residual.GFCResidualBlock`). Every layer is equivariant for the grid-exact
elements of the group: after ``s`` squeezes the blocks' networks map between the squeezed tensors'
true representations (on the coarse grid for subgroups of D4, see :mod:`gflows.transforms.reshape`)
and ActNorm shares its parameters over the ``4^s`` sub-pixels of each channel. With ``factor_out``
whole fields, or half of every field's sub-pixels (:class:`~gflows.transforms.reshape.HalvingSqueeze`),
leave for the base between scales (:class:`~gflows.transforms.reshape.FactorOut`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gflows.flow import Compose, Flow, Inverse, Transform
from gflows.groups import Group, get_group
from gflows.transforms.autoregressive import GIAF
from gflows.transforms.butterfly import Butterfly
from gflows.transforms.coupling import GCoupling
from gflows.transforms.dequantization import VariationalDequantize
from gflows.transforms.elementwise import ActNorm, Dequantize, Logit
from gflows.transforms.invconv import GInvConv1x1
from gflows.transforms.reshape import FactorOut, HalvingSqueeze, Squeeze
from gflows.transforms.residual import GFCResidualBlock, GResidualBlock

__all__ = ["FLOW_KINDS", "g_residual_flow", "image_flow", "image_model"]

FLOW_KINDS = ("residual", "coupling", "iaf", "glow_butterfly")


def _block(kind: str, group, shape, level: int, index: int, hidden_fields: int, kw: dict) -> list[Transform]:
    if kind == "residual":
        return [GResidualBlock(group, shape, hidden_fields, squeeze_levels=level, **kw)]
    if kind == "coupling":
        return [_coupling(group, shape, level, index, hidden_fields, kw)]
    if kind == "iaf":
        if level:
            raise ValueError("iaf models are single-scale: set n_scales=1")
        return [GIAF(group, shape, n_blocks=shape[0], hidden_fields=hidden_fields, **kw)]
    if kind == "glow_butterfly":
        # Butterfly channel mixing commutes with pixel moves but not with the sub-pixel
        # permutations a squeeze brings in: this model is equivariant only at scale 0.
        return [Butterfly(shape), _coupling(group, shape, level, index, hidden_fields, kw)]
    raise ValueError(f"unknown flow kind {kind!r}: expected one of {FLOW_KINDS}")


def _coupling(group, shape, level: int, index: int, hidden_fields: int, kw: dict) -> GCoupling:
    """Block ``index``'s coupling: the fields' two halves in turn, or, where there is one field (a
    one-channel image), the two sides of the mirrored checkerboard in turn (exact for all of D4)."""
    one_field = shape[0] // 4**level < 2
    split = {"mask": "mirrored", "parity": index % 2} if one_field else {"swap": bool(index % 2)}
    return GCoupling(group, shape, squeeze_levels=level, hidden_fields=hidden_fields, **split, **kw)


def image_flow(
    kind: str,
    group: str | Group,
    event_shape: Sequence[int],
    n_scales: int = 1,
    blocks_per_scale: int | Sequence[int] = 2,
    hidden_fields: int | Sequence[int] = 8,
    actnorm: bool = True,
    fc_blocks: int = 0,
    fc_hidden: int = 128,
    squeeze_first: bool = False,
    invconv: bool = False,
    factor_out: bool | str = False,
    split_prior: bool = False,
    scale_kernel_sizes: Sequence[Sequence[int]] | None = None,
    **block_kwargs,
) -> Compose:
    """A multiscale transform of ``kind`` in :data:`FLOW_KINDS` (see the module docstring).

    Args:
        kind: ``'residual'``, ``'coupling'``, ``'iaf'`` or ``'glow_butterfly'``.
        group: symmetry group; ``'trivial'`` gives the ordinary model through the same code.
        event_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2^(n_scales - 1)``.
        n_scales: number of scales (``n_scales - 1`` squeezes).
        blocks_per_scale: blocks per scale, or one count per scale, the finest first (``[3, 6, 6]``).
        hidden_fields: regular fields per hidden layer of each block's network, or one count per scale.
        actnorm: ActNorm after each block.
        fc_blocks: fully-connected G-residual blocks after the last scale (``kind='residual'`` only),
            with ``fc_hidden`` hidden units and the log-det / Lipschitz options of ``block_kwargs``.
        squeeze_first: squeeze before the first scale too, as Glow does, so that every block runs
            at half the resolution or less (``H`` and ``W`` divisible by ``2^n_scales``).
        invconv: a G-equivariant invertible 1x1 convolution (:class:`GInvConv1x1`, Glow's channel
            mixing) before every block.
        factor_out: Glow's split (:class:`FactorOut`): after each scale but the last part of the
            tensor is factored out to the base, so later scales run on fewer channels. ``True`` or
            ``'fields'``: half the fields (rounded up; couplings keep at least two) go on, whole
            fields, so on RGB 12, 32 and 128 channels at three scales. ``'half'``: half of every
            field's sub-pixels go on (:class:`HalvingSqueeze`: two squeezed fields of each field's
            next squeeze stay), Glow's 12, 24 and 48 channels; a boundary after fields of one channel
            (scale 0 without ``squeeze_first``) squeezes without a split. Equivariant either way.
        split_prior: with ``factor_out``, Glow's learned prior of the leaving part: it is Gaussian
            with mean and log-scale from a zero-initialised 3x3 G-convolution of the part that stays
            (Glow's ``split2d``), i.e. an affine :class:`GCoupling` of the leaving part on the kept
            one, with a one-convolution conditioner, just before the split (with ``'half'``: of the
            leaving pixels on the kept ones, ``mask='halving'``, before the :class:`HalvingSqueeze`).
            Without it the leaving part meets the base as it is.
        scale_kernel_sizes: the blocks' ``kernel_sizes`` per scale, the finest first, overriding
            ``block_kwargs``' (e.g. 1x1 last convolutions at the coarse scales, where 3x3 ones over
            their many channels cost most).
        **block_kwargs: passed to every block.
    """
    blocks, scale_kernel_sizes = _checked(kind, n_scales, blocks_per_scale, fc_blocks, factor_out,
                                          split_prior, scale_kernel_sizes)
    shape, first = tuple(int(s) for s in event_shape), int(bool(squeeze_first))
    conv_only = ("kernel_sizes", "padding_mode", "basis", "relax", "relax_to", "activation")  # not fc blocks
    fc_kwargs = {k: v for k, v in block_kwargs.items() if k not in conv_only}
    widths = _per_scale(hidden_fields, n_scales, "hidden_fields", 1)
    plan = _Plan(kind, group, first + n_scales - 1, blocks, widths, actnorm, fc_blocks,
                 fc_hidden, invconv, {True: "fields"}.get(factor_out, factor_out), split_prior,
                 block_kwargs, fc_kwargs, scale_kernel_sizes, first)
    layers: list[Transform] = []
    if first:
        layers.append(Squeeze(shape))
        shape = layers[0].out_shape
    return Compose(layers + _scales(plan, first, first, shape))


def _checked(kind: str, n_scales: int, blocks_per_scale: int | Sequence[int], fc_blocks: int,
             factor_out: bool | str, split_prior: bool, scale_kernel_sizes: Sequence[Sequence[int]] | None,
             ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...] | None]:
    """:func:`image_flow`'s settings checked, each mistake named; the blocks of each scale and
    ``scale_kernel_sizes`` as tuples."""
    if kind not in FLOW_KINDS:
        raise ValueError(f"unknown flow kind {kind!r}: expected one of {FLOW_KINDS}")
    if fc_blocks and kind != "residual":
        raise ValueError(f"fc_blocks are residual blocks: only for kind='residual', not {kind!r}")
    if n_scales < 1:
        raise ValueError(f"n_scales must be >= 1, got {n_scales}")
    if factor_out not in (False, True, "fields", "half"):
        raise ValueError(f"unknown factor_out {factor_out!r}: expected false, true, 'fields' or 'half'")
    if split_prior and not factor_out:
        raise ValueError("split_prior is the prior of the fields that factor_out lets leave: "
                         "set factor_out=True or 'half'")
    blocks = _per_scale(blocks_per_scale, n_scales, "blocks_per_scale", 0)
    if not sum(blocks):
        raise ValueError(f"blocks_per_scale must be one count >= 1 or {n_scales} counts >= 0 (one per "
                         f"scale, not all zero), got {blocks_per_scale!r}")
    if scale_kernel_sizes is None:
        return blocks, None
    sizes = tuple(tuple(int(k) for k in ks) for ks in scale_kernel_sizes)
    if len(sizes) != n_scales or not all(sizes):
        raise ValueError(f"scale_kernel_sizes needs one non-empty list of kernel sizes per scale "
                         f"({n_scales}), got {[list(ks) for ks in sizes]}")
    return blocks, sizes


def _per_scale(value: int | Sequence[int], n_scales: int, name: str, least: int) -> tuple[int, ...]:
    """One count for every scale, or one per scale (the finest first), each at least ``least``."""
    counts = (int(value),) * n_scales if isinstance(value, int) else tuple(int(v) for v in value)
    if len(counts) != n_scales or min(counts) < least:
        raise ValueError(f"{name} must be one count >= {max(least, 1)} or {n_scales} counts >= {least} "
                         f"(one per scale, the finest first), got {value!r}")
    return counts


@dataclass(frozen=True)
class _Plan:
    """The settings of :func:`image_flow` that every scale uses (``last``: the last scale's index,
    counting the first squeeze; ``factor_out``: ``False``, ``'fields'`` or ``'half'``)."""

    kind: str
    group: str | Group
    last: int
    blocks_per_scale: tuple[int, ...]
    hidden_fields: tuple[int, ...]
    actnorm: bool
    fc_blocks: int
    fc_hidden: int
    invconv: bool
    factor_out: bool | str
    split_prior: bool
    block_kwargs: dict
    fc_kwargs: dict
    scale_kernel_sizes: tuple[tuple[int, ...], ...] | None
    first: int


def _scales(p: _Plan, scale: int, level: int, shape: tuple[int, ...]) -> list[Transform]:
    """Layers of scales ``scale..p.last`` on ``shape``, whose fields carry ``level`` squeezes (the
    scale's index unless :class:`HalvingSqueeze` kept the level)."""
    layers: list[Transform] = []
    field_size = 4**level  # the sub-pixels of one original channel after ``level`` squeezes
    block_kwargs = p.block_kwargs
    if p.scale_kernel_sizes is not None:
        block_kwargs = {**block_kwargs, "kernel_sizes": p.scale_kernel_sizes[scale - p.first]}
    for i in range(p.blocks_per_scale[scale - p.first]):
        if p.invconv:
            layers.append(GInvConv1x1(p.group, shape, squeeze_levels=level))
        layers += _block(p.kind, p.group, shape, level, i, p.hidden_fields[scale - p.first], block_kwargs)
        if p.actnorm:
            layers.append(ActNorm(shape, field_size=field_size))
    if scale == p.last:
        for _ in range(p.fc_blocks):
            layers.append(GFCResidualBlock(p.group, shape, p.fc_hidden, squeeze_levels=level, **p.fc_kwargs))
            if p.actnorm:
                layers.append(ActNorm(shape, field_size=field_size))
        return layers
    if p.factor_out == "half" and level:
        sq = HalvingSqueeze(shape, level)
        kept, inner_level = sq.kept_channels, level
    else:
        sq = Squeeze(shape)
        fields = shape[0] // field_size
        # couplings split their fields in two: they need two at every scale
        keep = max(-(-fields // 2), 1 if p.kind in ("residual", "iaf") else 2)
        kept, inner_level = (keep if p.factor_out == "fields" else fields) * 4 * field_size, level + 1
    layers.append(sq)
    if kept >= sq.out_shape[0]:
        return layers + _scales(p, scale + 1, inner_level, sq.out_shape)
    inner = _scales(p, scale + 1, inner_level, (kept, *sq.out_shape[1:]))
    # FactorOut needs a shape-preserving map: undo the inner scales' own squeezes (those nested in
    # their FactorOuts already are)
    undo = [Inverse(t) for t in reversed(inner) if isinstance(t, Squeeze)]  # HalvingSqueeze too
    if p.split_prior:
        kw = {k: p.block_kwargs[k] for k in ("basis", "relax", "relax_to", "scale_bound")
              if k in p.block_kwargs}
        if isinstance(sq, HalvingSqueeze):  # the leaving pixels given the kept ones, before the squeeze
            layers.insert(-1, GCoupling(p.group, shape, mask="halving", squeeze_levels=level,
                                        kernel_sizes=(3,), **kw))
        else:
            layers.append(GCoupling(p.group, sq.out_shape, split=kept, squeeze_levels=level + 1,
                                    kernel_sizes=(3,), **kw))
    return layers + [FactorOut(Compose(inner + undo), sq.out_shape)]


def image_model(kind: str, group: str | Group, event_shape: Sequence[int] = (3, 32, 32),
                alpha: float = 0.05, levels: int = 256, dequantization: str = "uniform",
                dequant_blocks: int = 4, dequant_hidden: int = 32, dequant_squeeze: int = 1,
                **kwargs) -> Flow:
    """Flow on images of ``levels`` grey levels (8-bit by default): dequantisation, logit(alpha),
    then :func:`image_flow`.

    ``-flow.log_prob(x) / (D ln 2)`` is then the bits per dimension of integer images ``x``,
    counting every log-det of the preprocessing and the ``levels`` bins: exactly with uniform
    dequantisation, and as an unbiased one-sample estimate of the variational bound with
    ``dequantization='variational'`` (:class:`VariationalDequantize`: ``dequant_blocks`` couplings
    with ``dequant_hidden`` hidden channels, ``dequant_hidden // |G|`` regular fields, on the
    image squeezed ``dequant_squeeze`` times).
    """
    shape = tuple(event_shape)
    if dequantization == "uniform":
        dequantize = Dequantize(shape, levels)
    elif dequantization == "variational":
        g = get_group(group)
        dequantize = VariationalDequantize(g, shape, levels, dequant_blocks, g.regular_fields(dequant_hidden),
                                           squeeze_levels=dequant_squeeze)
    else:
        raise ValueError(f"unknown dequantization {dequantization!r}: expected 'uniform' or 'variational'")
    return Flow(Compose(dequantize, Logit(shape, alpha), image_flow(kind, group, shape, **kwargs)))


def g_residual_flow(
    group: str | Group,
    event_shape: Sequence[int],
    n_blocks: int = 4,
    hidden_fields: int = 8,
    actnorm: bool = True,
    **block_kwargs,
) -> Flow:
    """A single-scale G-residual flow: ``n_blocks`` x (G-residual block, ActNorm).

    Every layer commutes with the grid-exact elements of ``group`` acting on the pixels, and the
    standard-normal base is invariant, so ``log_prob`` is G-invariant.
    """
    return Flow(image_flow("residual", group, event_shape, 1, n_blocks, hidden_fields, actnorm,
                           **block_kwargs))
