"""The Task Routing Layer and the switch that selects the active task in a whole model."""
from __future__ import annotations

import contextlib
import numbers

import torch
from torch import nn

from ..ops.reference import route_select
from ..ops.route import select_route, task_id_bounds
from .masks import build_masks, check_sharing_ratio
from .state import CheckedStateLoad

__all__ = ["TaskConditioned", "TaskRouter", "set_active_task", "active_task"]


class TaskConditioned:
    """Mixin for modules whose forward depends on the active task (routers, fused BN, heads).

    ``set_active_task`` sets ``active_task`` on every such module of a model; each module's own
    ``set_active_task(task)`` sets it on that module alone (as loops written for the authors'
    ``TaskRouter`` call it on every module that has ``active_task``).
    """

    active_task = None

    def set_active_task(self, task):
        self.active_task = check_task(task)
        return self


def check_task(task):
    """Type check for a task id, done when it is set (range is checked against each layer's masks)."""
    if task is None or (isinstance(task, numbers.Integral) and not isinstance(task, bool)):
        return task
    if isinstance(task, torch.Tensor) and not (task.is_floating_point() or task.is_complex()
                                               or task.dtype == torch.bool):
        if task.dim() > 1:
            raise ValueError(f"task tensor must be 0-d or [N], got shape {tuple(task.shape)}")
        if task.numel() and not torch.compiler.is_compiling():
            task_id_bounds(task)  # read once here, so that no routed layer syncs with the device
        return task
    raise TypeError(f"task must be an int, an integer LongTensor [N] or None, got {task!r}")


class TaskRouter(CheckedStateLoad, nn.Module, TaskConditioned):
    """Task Routing Layer: ``y = x * masks[active_task]`` over the channel dim (dim 1); a masked
    channel is exactly 0 (selected, not multiplied: NaN and inf in ``x`` there give 0 too).

    ``active_task`` is one int for the whole batch or a LongTensor ``[N]`` of per-sample ids.
    Masks are a bool buffer (saved, moved by ``.to()``, never trained).
    """

    def __init__(self, num_channels: int, num_tasks: int | None = None, sharing_ratio: float = 0.5,
                 seed: int | None = None, masks: torch.Tensor | None = None):
        super().__init__()
        self.sharing_ratio = check_sharing_ratio(sharing_ratio)
        masks = build_masks(num_channels, num_tasks, self.sharing_ratio, seed, masks)
        self.num_channels = masks.shape[1]
        self.num_tasks = masks.shape[0]
        self.register_buffer("masks", masks)
        self.active_task = None

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"x must be [N, C, *], got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_channels:
            raise ValueError(f"x has {x.shape[1]} channels but the router has {self.num_channels}")
        route = select_route(self.masks, self.active_task if task is None else task, x.shape[0], x.device)
        return route_select(x, route)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_tasks={self.num_tasks}, sharing_ratio={self.sharing_ratio}"


def check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return model


def set_active_task(model: nn.Module, task) -> nn.Module:
    """Set the active task (int, or LongTensor ``[N]`` per sample) on every task-conditioned module."""
    check_model(model)
    task = check_task(task)
    for module in model.modules():
        if isinstance(module, TaskConditioned):
            module.active_task = task
    return model


@contextlib.contextmanager
def active_task(model: nn.Module, task):
    """Context manager: ``task`` is active inside the block, the previous tasks are restored after."""
    check_model(model)
    task = check_task(task)
    saved = [(m, m.active_task) for m in model.modules() if isinstance(m, TaskConditioned)]
    try:
        for module, _ in saved:
            module.active_task = task
        yield model
    finally:
        for module, previous in saved:
            module.active_task = previous
