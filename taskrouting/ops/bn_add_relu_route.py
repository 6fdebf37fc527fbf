"""``bn_add_relu_route``: a ResNet block's tail, ``relu(batch_norm(x) + residual) * masks[task]``, in one pass."""
from __future__ import annotations

import torch

from .backends import BACKENDS, family_op, resolve_backend
from .bn_relu_route import update_running_stats_of
from .checks import check_inputs, check_residual
from .reference import bn_add_relu_route_reference, channel_stats
from .route import select_route
from .schemas import NATIVE_ADD_KERNELS

__all__ = ["bn_add_relu_route", "bn_add_relu_route_on"]


def bn_add_relu_route(x: torch.Tensor, residual: torch.Tensor, masks: torch.Tensor, task, weight=None, bias=None,
                      running_mean=None, running_var=None, training: bool = True, momentum: float = 0.1,
                      eps: float = 1e-5, stats: str = "batch", backend: str = "auto") -> torch.Tensor:
    """``relu(batch_norm(x) + residual) * masks[task]`` in one pass; arguments as ``bn_relu_route``, and
    ``residual`` of x's shape, dtype and device (any strides). Both x and the residual get gradients;
    the backward gates on the output (no mask and no residual are kept for it)."""
    check_inputs(x, masks, weight, bias, running_mean, running_var, training, momentum, eps, stats)
    check_residual(residual, x)
    route = select_route(masks, task, x.shape[0], x.device)
    return bn_add_relu_route_on(x, residual, route, weight, bias, running_mean, running_var, training, momentum,
                                eps, stats, backend)


def bn_add_relu_route_on(x, residual, route, weight, bias, running_mean, running_var, training, momentum, eps,
                         stats, backend, also_update=None):
    """``bn_add_relu_route`` on a selected ``route`` and checked inputs (``also_update`` as ``bn_relu_route_on``)."""
    name = resolve_backend(backend, x)
    routed = stats == "routed"
    if name == "reference":
        y = bn_add_relu_route_reference(x, residual, route, weight, bias, running_mean, running_var, training,
                                        momentum, eps, routed)
        if training and also_update is not None:
            also_update(*channel_stats(x.detach(), route if routed else None))
        return y
    family = BACKENDS[name].family
    if family == "native" and not NATIVE_ADD_KERNELS.get(x.device.type, False):
        raise RuntimeError(f"backend={name!r}: the compiled extension has no bn_add_relu_route kernel for "
                           f"{x.device.type} tensors (built from older sources?): rebuild it, or use "
                           f"backend='reference'")
    track = training and (running_mean is not None or also_update is not None)
    y, mean, invstd, var, count = family_op(family, "bn_add_relu_route")(
        x, residual, route, weight, bias, running_mean, running_var, training, float(eps), routed,
        track and not routed)
    if track and running_mean is not None:
        update_running_stats_of(running_mean, running_var, mean, var, count, float(momentum))
    if track and also_update is not None:
        also_update(mean, var, count)
    return y
