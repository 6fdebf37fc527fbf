"""``bn_relu_route``: the fused BatchNorm + ReLU + route op as users call it, on any backend."""
from __future__ import annotations

import torch

from .backends import BACKENDS, family_op, resolve_backend
from .checks import check_inputs
from .recompute import note_output
from .reference import (
    bn_add_relu_route_reference,
    bn_relu_route_reference,
    channel_stats,
    update_running_stats,
    update_task_running_stats,
)
from .route import select_route
from .schemas import NATIVE_ADD_KERNELS, NATIVE_TASK_UPDATE, NATIVE_UPDATE

__all__ = ["bn_relu_route", "bn_relu_route_on", "combine_stats", "update_task_rows", "update_running_stats_of"]


def update_running_stats_of(running_mean, running_var, mean, var, count, momentum: float) -> None:
    """One compiled kernel where there is one (a handful of tiny eager ops cost ~25 µs), else PyTorch."""
    if NATIVE_UPDATE.get(running_mean.device.type, False) and running_mean.is_contiguous() \
            and running_var.is_contiguous():
        torch.ops.taskrouting.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)


def update_task_rows(task_mean, task_var, task_count, task_last, batches, task: int, mean, var, count,
                     momentum) -> None:
    """``update_task_running_stats``: one compiled call where there is one (on a GPU: one launch, no host
    read), else the same in PyTorch ops."""
    args = (task_mean, task_var, task_count, task_last, batches, task, mean, var, count, momentum)
    if NATIVE_TASK_UPDATE.get(task_mean.device.type, False) and task_mean.is_contiguous() \
            and task_var.is_contiguous():
        torch.ops.taskrouting.update_task_running_stats(*args)
    else:
        update_task_running_stats(*args)


def bn_relu_route(x: torch.Tensor, masks: torch.Tensor, task, weight=None, bias=None,
                  running_mean=None, running_var=None, training: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, stats: str = "batch",
                  backend: str = "auto") -> torch.Tensor:
    """``relu(batch_norm(x)) * masks[task]`` in one pass, skipping channels no sample uses.

    ``task``: an int (one task for the batch) or a LongTensor ``[N]`` (one per sample).
    ``training=True`` normalizes with batch statistics and, if running stats are given,
    updates them in place with factor ``momentum`` (like ``F.batch_norm``).
    ``stats="routed"`` computes each channel's statistics over its routed samples only.
    """
    check_inputs(x, masks, weight, bias, running_mean, running_var, training, momentum, eps, stats)
    route = select_route(masks, task, x.shape[0], x.device)
    return bn_relu_route_on(x, route, weight, bias, running_mean, running_var, training, momentum, eps, stats,
                            backend)


def bn_relu_route_on(x, route, weight, bias, running_mean, running_var, training, momentum, eps, stats,
                     backend, also_update=None, residual=None):
    """``bn_relu_route`` on an already selected ``route`` (bool [C] or [N, C]) and checked inputs; with a
    ``residual`` (checked: x's shape, dtype and device), ``bn_add_relu_route``.

    ``also_update``: a function that a training call also gives the batch statistics
    ``(mean, var, count)`` it updates ``running_mean``/``running_var`` with (a task's row update).
    """
    name = resolve_backend(backend, x)
    routed = stats == "routed"
    if name == "reference":
        common = (route, weight, bias, running_mean, running_var, training, momentum, eps, routed)
        y = bn_relu_route_reference(x, *common) if residual is None else \
            bn_add_relu_route_reference(x, residual, *common)
        if training and also_update is not None:
            also_update(*channel_stats(x.detach(), route if routed else None))
        return y
    family = BACKENDS[name].family
    track = training and (running_mean is not None or also_update is not None)
    common = (route, weight, bias, running_mean, running_var, training, float(eps), routed, track and not routed)
    if residual is None:
        y, mean, invstd, var, count = family_op(family, "bn_relu_route")(x, *common)
        note_output(y, family, x, route, mean, invstd, weight, bias)
    else:  # y is not noted for recompute: it could be rebuilt only with the residual
        if family == "native" and not NATIVE_ADD_KERNELS.get(x.device.type, False):
            raise RuntimeError(f"backend={name!r}: the compiled extension has no bn_add_relu_route kernel for "
                               f"{x.device.type} tensors (built from older sources?): rebuild it, or use "
                               f"backend='reference'")
        y, mean, invstd, var, count = family_op(family, "bn_add_relu_route")(x, residual, *common)
    if track and running_mean is not None:
        update_running_stats_of(running_mean, running_var, mean, var, count, float(momentum))
    if track and also_update is not None:
        also_update(mean, var, count)
    return y


def combine_stats(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor):
    """Merge per-process channel statistics ``[P, C]`` (Chan et al.) into ``[C]`` mean, var, count."""
    total = count.sum(0)
    safe = total.clamp_min(1)
    merged_mean = (mean * count).sum(0) / safe
    m2 = (var * count).sum(0) + ((mean - merged_mean).square() * count).sum(0)
    return merged_mean, m2 / safe, total
