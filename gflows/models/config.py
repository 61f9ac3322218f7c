"""Config -> model: the flows that ``configs/flow/*.yaml`` name, for images and for lattices.

A flow config has ``name``, ``domain`` (``image`` or ``lattice``), ``kind``, ``group`` and
``hidden_channels`` (the width: ``hidden_channels // |G|`` regular fields), plus the keyword
arguments of its builder (:func:`~gflows.models.image.image_model`, with the per-block ones under
``block``; :func:`~gflows.models.lattice.lattice_flow`, :func:`~gflows.models.lattice.residual_lattice_flow`,
:func:`~gflows.models.lattice.realnvp_baseline`). A key the builder does not take is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gflows.flow import Flow
from gflows.groups import get_group
from gflows.models.image import FLOW_KINDS, image_model
from gflows.models.lattice import lattice_flow, realnvp_baseline, residual_lattice_flow

__all__ = ["DOMAINS", "LATTICE_KINDS", "image_model_from_config", "lattice_model_from_config"]

LATTICE_KINDS = ("coupling", "residual", "realnvp")
DOMAINS = {"image": FLOW_KINDS, "lattice": LATTICE_KINDS}
_DESCRIPTION = ("name", "domain", "kind", "group", "hidden_channels")


def _plain(value: Any) -> Any:
    """OmegaConf containers as tuples and dicts (the builders take plain values)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(_plain(v) for v in value)
    return value


def _settings(flow: Mapping, domain: str) -> dict[str, Any]:
    """The builder's keyword arguments of ``flow``, after checking its domain and kind."""
    if flow["domain"] not in DOMAINS:
        raise ValueError(f"unknown flow domain {flow['domain']!r}: expected one of {sorted(DOMAINS)}")
    if flow["domain"] != domain:
        raise ValueError(f"flow={flow['name']} is a{'n' if flow['domain'] == 'image' else ''} "
                         f"{flow['domain']} flow, not a{'n' if domain == 'image' else ''} {domain} flow")
    if flow["kind"] not in DOMAINS[domain]:
        raise ValueError(f"unknown flow kind {flow['kind']!r} for {domain} flows: expected one of "
                         f"{DOMAINS[domain]}")
    return {k: _plain(v) for k, v in flow.items() if k not in _DESCRIPTION}


def _call(builder: Callable[..., Flow], name: str, *args, **kwargs) -> Flow:
    try:
        return builder(*args, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        key = str(e).split("argument")[-1].strip(" '")
        raise ValueError(f"flow={name}: unknown setting {key!r} for {builder.__name__}") from None


def _hidden_fields(flow: Mapping, group) -> int | tuple[int, ...]:
    """``flow.hidden_channels`` (one width, or one per scale for image models) as regular fields of
    ``group``, a bad width named by its key."""
    width = _plain(flow["hidden_channels"])
    try:
        if isinstance(width, tuple):
            return tuple(group.regular_fields(w) for w in width)
        return group.regular_fields(width)
    except ValueError as e:
        raise ValueError(f"flow.hidden_channels: {e}") from None


def image_model_from_config(flow: Mapping, shape: Sequence[int], alpha: float, levels: int = 256) -> Flow:
    """The image model of ``flow`` (``cfg.flow``) on images of ``shape`` with ``levels`` grey levels
    (8-bit by default) and logit ``alpha``.

    >>> import torch
    >>> flow = {"name": "tiny", "domain": "image", "kind": "coupling", "group": "flip",
    ...         "hidden_channels": 8, "n_scales": 1, "blocks_per_scale": 2, "block": {}}
    >>> model = image_model_from_config(flow, (3, 8, 8), alpha=0.05)
    >>> model.log_prob(torch.randint(0, 256, (2, 3, 8, 8)).float()).shape
    torch.Size([2])
    """
    kw = _settings(flow, "image")
    group = get_group(flow["group"])
    block = kw.pop("block", {}) or {}
    return _call(image_model, flow["name"], flow["kind"], group, tuple(shape), alpha=alpha, levels=levels,
                 hidden_fields=_hidden_fields(flow, group), **kw, **block)


def lattice_model_from_config(flow: Mapping, L: int) -> Flow:
    """The lattice sampler of ``flow`` (``cfg.flow``) on ``L x L`` sites."""
    kw = _settings(flow, "lattice")
    width = _plain(flow["hidden_channels"])
    if isinstance(width, tuple):
        raise ValueError(f"flow.hidden_channels: a lattice flow has one width, got {list(width)} "
                         "(one per scale is for image models)")
    if flow["kind"] == "realnvp":
        return _call(realnvp_baseline, flow["name"], L, hidden=int(width), **kw)
    group = get_group(flow["group"])
    builder = residual_lattice_flow if flow["kind"] == "residual" else lattice_flow
    return _call(builder, flow["name"], L, hidden_fields=_hidden_fields(flow, group),
                 group=group, **kw)
