"""The staged op (statistics -> normalize; backward: reduce -> apply) of every backend.

The native and Triton families are ``torch.library`` ops (``schemas.py``); the reference backend's
stages are the pure-PyTorch functions below, with the same semantics (a channel no sample of
``x`` goes through gets no statistics unless ``all_channels`` asks for them, and no gradient).
"""
from __future__ import annotations

import types

import torch

from .backends import BACKENDS, family_op
from .reference import route_view
from .schemas import stats_dtype

__all__ = ["stage_ops", "STAGES"]

STAGES = ("channel_stats", "normalize_relu_route", "backward_reduce", "backward_apply")


def _dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape((1, x.shape[1]) + (1,) * (x.dim() - 2))


def _used(route: torch.Tensor) -> torch.Tensor:
    return route.any(0) if route.dim() == 2 else route


def _affine(t, x, fill: float) -> torch.Tensor:
    return x.new_full((x.shape[1],), fill) if t is None else t.to(x.dtype)


def channel_stats(x, route, routed_stats: bool, all_channels: bool):
    xf = x.to(stats_dtype(x))
    dims = _dims(xf)
    wanted = _used(route) if routed_stats or not all_channels else torch.ones_like(_used(route))
    values = route_view(route, xf).expand_as(xf) if routed_stats else torch.ones_like(xf)
    count = values.sum(dims) * wanted
    safe = count.clamp_min(1)
    mean = (xf * values).sum(dims) / safe * wanted
    var = ((xf - _per_channel(mean, xf)).square() * values).sum(dims) / safe * wanted
    return mean, var, count


def _pre_activation(x, mean, invstd, weight, bias):
    xf = x.to(mean.dtype)
    xmu = xf - _per_channel(mean, xf)
    scale = invstd * _affine(weight, mean, 1.0)
    return xmu, xmu * _per_channel(scale, xf) + _per_channel(_affine(bias, mean, 0.0), xf), scale


def normalize_relu_route(x, route, mean, invstd, weight, bias):
    _, pre, _ = _pre_activation(x, mean, invstd, weight, bias)
    return (pre.relu() * route_view(route, pre)).to(x.dtype)


def _routed_grad(grad_y, route, pre):
    return grad_y.to(pre.dtype) * route_view(route, pre) * (pre > 0)


def backward_reduce(grad_y, x, route, mean, invstd, weight, bias):
    xmu, pre, _ = _pre_activation(x, mean, invstd, weight, bias)
    g = _routed_grad(grad_y, route, pre)
    return g.sum(_dims(g)), (g * xmu).sum(_dims(g))


def backward_apply(grad_y, x, route, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count, training: bool,
                   routed_stats: bool):
    xmu, pre, scale = _pre_activation(x, mean, invstd, weight, bias)
    g = _routed_grad(grad_y, route, pre)
    through = route_view(route, pre).expand_as(pre).bool() & _per_channel(_used(route), pre)
    if training:
        m = count.clamp_min(1)
        g = g - _per_channel(sum_dy / m, pre) - xmu * _per_channel(invstd.square() * sum_dy_xmu / m, pre)
        if not routed_stats:  # batch statistics: every sample of a used channel entered its mean and variance
            through = _per_channel(_used(route), pre).expand_as(pre)
    return torch.where(through, g * _per_channel(scale, pre), 0).to(x.dtype)


_REFERENCE = types.SimpleNamespace(channel_stats=channel_stats, normalize_relu_route=normalize_relu_route,
                                   backward_reduce=backward_reduce, backward_apply=backward_apply)


def stage_ops(backend: str) -> types.SimpleNamespace:
    """The four stage callables of a resolved backend name (``reference``, ``cpu``, ``cuda``, ``triton``, ...)."""
    family = BACKENDS[backend].family
    if family is None:
        return _REFERENCE
    return types.SimpleNamespace(**{name: family_op(family, name) for name in STAGES})
