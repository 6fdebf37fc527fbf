"""``bn_add_relu_route``: a ResNet block's tail, ``relu(batch_norm(x) + residual) * masks[task]``, in one pass.
It runs through ``bn_relu_route_on`` (``bn_relu_route.py``) with the residual."""
from __future__ import annotations

import torch

from .bn_relu_route import bn_relu_route_on
from .checks import check_inputs, check_residual
from .route import select_route

__all__ = ["bn_add_relu_route"]


def bn_add_relu_route(x: torch.Tensor, residual: torch.Tensor, masks: torch.Tensor, task, weight=None, bias=None,
                      running_mean=None, running_var=None, training: bool = True, momentum: float = 0.1,
                      eps: float = 1e-5, stats: str = "batch", backend: str = "auto") -> torch.Tensor:
    """``relu(batch_norm(x) + residual) * masks[task]`` in one pass; arguments as ``bn_relu_route``, and
    ``residual`` of x's shape, dtype and device (any strides). Both x and the residual get gradients;
    the backward gates on the output (no mask and no residual are kept for it)."""
    check_inputs(x, masks, weight, bias, running_mean, running_var, training, momentum, eps, stats)
    check_residual(residual, x)
    route = select_route(masks, task, x.shape[0], x.device)
    return bn_relu_route_on(x, route, weight, bias, running_mean, running_var, training, momentum, eps, stats,
                            backend, residual=residual)
