"""Pure-PyTorch BatchNorm + ReLU + route: the ground truth every kernel is tested against.

All backends share one interface: ``route`` is the bool mask already selected for the batch,
``[C]`` (one task per batch) or ``[N, C]`` (a task per sample). ``momentum`` is the factor of
the running-stat update (the module turns ``momentum=None`` into the cumulative average).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bn_relu_route_reference", "route_view", "update_running_stats", "unbiased_var", "channel_stats"]


def route_view(route: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``route`` shaped to broadcast against ``x`` ([N or 1, C, 1, ...]), in x's dtype."""
    lead = route.shape[0] if route.dim() == 2 else 1
    return route.reshape((lead, x.shape[1]) + (1,) * (x.dim() - 2)).to(x.dtype)


def unbiased_var(var: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected variance; a channel with a single value keeps its biased variance (0)."""
    return var * (count / (count - 1).clamp_min(1))


def update_running_stats(running_mean, running_var, mean, var, count, momentum: float) -> None:
    """nn.BatchNorm's update, ``r = (1 - m) r + m stat``, skipping channels that saw no value."""
    with torch.no_grad():
        seen = count > 0
        new_mean = running_mean * (1 - momentum) + mean.to(running_mean.dtype) * momentum
        new_var = running_var * (1 - momentum) + unbiased_var(var, count).to(running_var.dtype) * momentum
        running_mean.copy_(torch.where(seen, new_mean, running_mean))
        running_var.copy_(torch.where(seen, new_var, running_var))


def channel_stats(x, route=None):
    """Per-channel mean, biased variance and value count of ``x`` (float32, float64 for float64 x),
    over the samples routed through each channel (``route`` bool [C] or [N, C]; None: all)."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    r = torch.ones((), dtype=xf.dtype, device=x.device) if route is None else route_view(route, xf)
    dims = [0] + list(range(2, x.dim()))
    count = (r.expand_as(xf)).sum(dims)
    safe = count.clamp_min(1)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    mean = (xf * r).sum(dims) / safe
    var = ((xf - mean.view(shape)).square() * r).sum(dims) / safe
    return mean, var, count


def _routed_batch_norm(x, route, weight, bias, running_mean, running_var, momentum, eps):
    """Batch norm whose per-channel statistics use only the samples routed through the channel."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    mean, var, count = channel_stats(xf, route)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    centered = xf - mean.view(shape)
    xhat = centered * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        xhat = xhat * weight.to(xf.dtype).view(shape)
    if bias is not None:
        xhat = xhat + bias.to(xf.dtype).view(shape)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
    return xhat.to(x.dtype)


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """F.batch_norm for any mix of floating dtypes (it takes only x's dtype, or float32 for half x)."""
    params = [t for t in (running_mean, running_var, weight, bias) if t is not None]
    reduced = x.dtype in (torch.float16, torch.bfloat16)
    if all(t.dtype == x.dtype or (reduced and t.dtype == torch.float32) for t in params):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cast = (lambda t: None if t is None else t.to(acc))
    rm, rv = cast(running_mean), cast(running_var)
    y = F.batch_norm(x.to(acc), rm, rv, cast(weight), cast(bias), training, momentum, eps)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return y.to(x.dtype)


def bn_relu_route_reference(x, route, weight=None, bias=None, running_mean=None, running_var=None,
                            training=True, momentum=0.1, eps=1e-5, routed_stats=False):
    """``relu(batch_norm(x)) * route``; updates the running stats in place when training."""
    if training and routed_stats:
        y = _routed_batch_norm(x, route, weight, bias, running_mean, running_var, momentum, eps)
    else:
        y = _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.relu(y) * route_view(route, x)
