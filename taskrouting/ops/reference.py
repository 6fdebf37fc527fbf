"""Pure-PyTorch BatchNorm + ReLU + route: the ground truth every kernel is tested against.

All backends share one interface: ``route`` is the bool mask already selected for the batch,
``[C]`` (one task per batch) or ``[N, C]`` (a task per sample). ``momentum`` is the factor of
the running-stat update (the module turns ``momentum=None`` into the cumulative average).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import output_strides

__all__ = ["bn_relu_route_reference", "bn_relu_route_backward_reference", "bn_add_relu_route_reference",
           "bn_add_relu_route_backward_reference", "route_view", "route_select",
           "update_running_stats", "update_task_running_stats", "unbiased_var", "channel_stats"]


def route_view(route: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``route`` shaped to broadcast against ``x`` ([N or 1, C, 1, ...]), in x's dtype."""
    lead = route.shape[0] if route.dim() == 2 else 1
    return route.reshape((lead, x.shape[1]) + (1,) * (x.dim() - 2)).to(x.dtype)


def route_select(y: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
    """``y`` on routed channels, exactly 0 on masked ones whatever ``y`` holds (NaN * 0 would be NaN),
    with zero gradient there too."""
    lead = route.shape[0] if route.dim() == 2 else 1
    keep = route.reshape((lead, y.shape[1]) + (1,) * (y.dim() - 2))
    return torch.where(keep, y, y.new_zeros(()))


def unbiased_var(var: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected variance; a channel with a single value keeps its biased variance (0)."""
    return var * (count / (count - 1).clamp_min(1))


def update_running_stats(running_mean, running_var, mean, var, count, momentum) -> None:
    """nn.BatchNorm's update, ``r = (1 - m) r + m stat``, skipping channels that saw no value
    (``momentum``: a float, or a 0-dim tensor as ``update_task_running_stats`` passes)."""
    with torch.no_grad():
        seen = count > 0
        new_mean = running_mean * (1 - momentum) + mean.to(running_mean.dtype) * momentum
        new_var = running_var * (1 - momentum) + unbiased_var(var, count).to(running_var.dtype) * momentum
        running_mean.copy_(torch.where(seen, new_mean, running_mean))
        running_var.copy_(torch.where(seen, new_var, running_var))


def update_task_running_stats(task_mean, task_var, task_count, task_last, batches, task: int, mean, var, count,
                              momentum) -> None:
    """Task ``task``'s row moved towards the batch statistics by ``1/n`` (``momentum`` None) or
    ``1 - (1 - momentum)**gap``, its counts advanced (``nn/task_stats.py``); tensor ops, no host read."""
    with torch.no_grad():
        n, batch = task_count[task] + 1, batches.reshape(()) + 1
        if momentum is None:
            factor = n.to(torch.float64).reciprocal()
        else:
            gap = (batch - task_last[task]).to(torch.float64)
            factor = 1 - torch.pow(torch.tensor(1.0 - momentum, dtype=torch.float64, device=gap.device), gap)
        update_running_stats(task_mean[task], task_var[task], mean, var, count, factor.to(task_var.dtype))
        task_count[task] = n
        task_last[task] = batch


def channel_stats(x, route=None):
    """Per-channel mean, biased variance and value count of ``x`` (float32, float64 for float64 x),
    over the samples routed through each channel (``route`` bool [C] or [N, C]; None: all)."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if route is None:
        route = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
    dims = [0] + list(range(2, x.dim()))
    count = route_view(route, xf).expand_as(xf).sum(dims)
    safe = count.clamp_min(1)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    mean = route_select(xf, route).sum(dims) / safe  # select, not multiply: unrouted values are never read
    var = route_select((xf - mean.view(shape)).square(), route).sum(dims) / safe
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


def _routed_values(x, route, training, routed_stats):
    """``x`` with the values of samples outside a channel selected away (0) where they enter nothing: eval and
    routed statistics, per-sample routes. Their output is 0 either way, but a NaN there would reach grad_weight
    as NaN * 0; the kernels never read them."""
    if route.dim() == 2 and (routed_stats or not training):
        return route_select(x, route)
    return x


def _cut_unrouted(route, x, weight, bias):
    """``x``, ``weight``, ``bias`` with the channels no sample is routed through detached: those
    channels output 0 whatever ``x`` holds, so their gradient is exactly 0 (a NaN in ``x`` there
    would otherwise reach grad_weight as NaN * 0)."""
    used = route if route.dim() == 1 else route.any(0)

    def cut(t, shape):
        if t is None or not t.requires_grad:
            return t
        return torch.where(used.view(shape), t, t.detach())
    return cut(x, (1, x.shape[1]) + (1,) * (x.dim() - 2)), cut(weight, (-1,)), cut(bias, (-1,))


def bn_relu_route_reference(x, route, weight=None, bias=None, running_mean=None, running_var=None,
                            training=True, momentum=0.1, eps=1e-5, routed_stats=False):
    """``relu(batch_norm(x)) * route``, exactly 0 on masked channels (NaN and inf in ``x`` included);
    updates the running stats in place when training."""
    strides = output_strides(x)
    y = _normalized(x, route, weight, bias, running_mean, running_var, training, momentum, eps, routed_stats)
    return _restride(route_select(F.relu(y), route), strides)


def _normalized(x, route, weight, bias, running_mean, running_var, training, momentum, eps, routed_stats):
    """batch_norm(x) (routed statistics if asked), with grad_x in the kernels' layout and no gradient
    through channels no sample uses; updates the running stats in place when training."""
    x = _GradInKernelLayout.apply(x)
    x, weight, bias = _cut_unrouted(route, x, weight, bias)
    x = _routed_values(x, route, training, routed_stats)
    if training and routed_stats:
        return _routed_batch_norm(x, route, weight, bias, running_mean, running_var, momentum, eps)
    return _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def bn_add_relu_route_reference(x, residual, route, weight=None, bias=None, running_mean=None, running_var=None,
                                training=True, momentum=0.1, eps=1e-5, routed_stats=False):
    """``relu(batch_norm(x) + residual) * route`` as a user's unfused ResNet computes it (in x's dtype),
    exactly 0 on masked channels whatever x or the residual hold there; grad_residual in x's layout."""
    strides = output_strides(x)
    residual = _GradInKernelLayout.apply(residual, strides)
    y = _normalized(x, route, weight, bias, running_mean, running_var, training, momentum, eps, routed_stats)
    return _restride(route_select(F.relu(y + residual), route), strides)


def _restride(t: torch.Tensor, strides) -> torch.Tensor:
    """``t`` with ``strides``; a copy only where PyTorch chose others (e.g. batch_norm of a
    permuted or a channels-last 3-D input)."""
    if t.stride() == strides:
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


class _GradInKernelLayout(torch.autograd.Function):
    """Identity on x whose backward gives grad_x the strides every backend returns for x."""

    @staticmethod
    def forward(ctx, x, strides=None):
        ctx.strides = output_strides(x) if strides is None else strides
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _restride(grad, ctx.strides), None


def bn_relu_route_backward_reference(grad_y, x, route, weight, bias, mean, invstd, training: bool, eps: float,
                                     routed_stats: bool, output_mask):
    """The op's backward (grad_x, grad_weight, grad_bias) as differentiable PyTorch ops, so that a
    second backward through it is exact: autograd of the reference forward, with ``create_graph``.
    In training the statistics are recomputed from ``x`` (they depend on it); in eval ``mean`` and
    ``invstd`` are the running statistics, constants. Outputs not in ``output_mask`` are empty."""
    return _batch_norm_backward(lambda pre: route_select(F.relu(pre), route).to(x.dtype), grad_y, x, route, weight,
                                bias, mean, invstd, training, eps, routed_stats, output_mask)


def bn_add_relu_route_backward_reference(grad_y, y, x, route, weight, bias, mean, invstd, training: bool,
                                         eps: float, routed_stats: bool, output_mask):
    """``bn_add_relu_route``'s backward (grad_x, grad_residual, grad_weight, grad_bias) as differentiable
    PyTorch ops: g = grad_y where y > 0 (y is 0 wherever the sample is not routed) is grad_residual,
    and batch_norm's backward of g the rest. Outputs not in ``output_mask`` are empty."""
    g = torch.where(y > 0, grad_y, grad_y.new_zeros(()))
    grad_x, grad_weight, grad_bias = _batch_norm_backward(
        lambda pre: pre, g, x, route, weight, bias, mean, invstd, training, eps, routed_stats,
        [output_mask[0], output_mask[2], output_mask[3]])
    grad_residual = _restride(g, output_strides(x)) if output_mask[1] else x.new_empty(0)
    return grad_x, grad_residual, grad_weight, grad_bias


def _batch_norm_backward(output_of, grad, x, route, weight, bias, mean, invstd, training, eps, routed_stats,
                         output_mask):
    """(grad_x, grad_weight, grad_bias) of ``output_of(batch_norm(x))`` for the incoming ``grad``, with
    ``create_graph``; batch statistics recomputed from x in training, ``mean``/``invstd`` constants in eval."""
    given = (x, weight, bias)
    wanted = [t is not None and bool(need) for t, need in zip(given, output_mask)]
    with torch.enable_grad():
        # Differentiate through tensors already in the graph; the others get a fresh leaf.
        inputs = [t if t is None or t.requires_grad else t.detach().requires_grad_() for t in given]
        xi, wi, bi = inputs
        if training:
            pre = _normalized(xi, route, wi, bi, None, None, True, 0.0, eps, routed_stats)
        else:
            xi, wi, bi = _cut_unrouted(route, xi, wi, bi)
            xi = _routed_values(xi, route, False, routed_stats)
            shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
            pre = (xi.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
            if wi is not None:
                pre = pre * wi.to(mean.dtype).view(shape)
            if bi is not None:
                pre = pre + bi.to(mean.dtype).view(shape)
        out = output_of(pre)
        sources = [t for t, want in zip(inputs, wanted) if want]
        grads = iter(torch.autograd.grad(out, sources, grad.to(out.dtype), create_graph=True, allow_unused=True)
                     if sources else ())
    result = []
    for t, want in zip(inputs, wanted):
        if not want:
            result.append(x.new_empty(0))
            continue
        g = next(grads)
        result.append(torch.zeros_like(t) if g is None else g)
    return tuple(result)
