"""Task masks: how they are drawn, checked, and turned into a route for one batch."""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["make_masks", "check_masks", "check_sharing_ratio", "check_positive_int", "check_task_ids",
           "select_route", "active_per_task"]


def active_per_task(num_channels: int, sharing_ratio: float) -> int:
    """Channels each task keeps: round(σ·C) rounded half up, at least 1."""
    return max(1, int(math.floor(sharing_ratio * num_channels + 0.5)))


def check_sharing_ratio(sharing_ratio) -> float:
    if isinstance(sharing_ratio, bool) or not isinstance(sharing_ratio, numbers.Real):
        raise TypeError(f"sharing_ratio must be a real number in [0, 1], got {sharing_ratio!r}")
    sharing_ratio = float(sharing_ratio)
    if not 0.0 <= sharing_ratio <= 1.0:
        raise ValueError(f"sharing_ratio must be in [0, 1], got {sharing_ratio}")
    return sharing_ratio


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def make_masks(num_tasks: int, num_channels: int, sharing_ratio: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Random fixed task masks, bool ``[num_tasks, num_channels]``.

    ``sharing_ratio`` σ is the fraction of channels each task keeps (σ = 1: every
    channel shared; σ = 0: channels split into disjoint balanced groups, one per task).
    The same ``generator`` state gives the same masks on every machine.
    """
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    num_channels = check_positive_int(num_channels, "num_channels")
    sharing_ratio = check_sharing_ratio(sharing_ratio)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (masks are drawn on the CPU)")

    masks = torch.zeros(num_tasks, num_channels, dtype=torch.bool)
    if sharing_ratio == 0.0:
        if num_tasks > num_channels:
            raise ValueError(
                f"sharing_ratio=0 splits the channels into disjoint groups, one per task: "
                f"num_tasks={num_tasks} is more than num_channels={num_channels}")
        perm = torch.randperm(num_channels, generator=generator)
        owner = torch.arange(num_channels) % num_tasks  # balanced: sizes differ by at most 1
        masks[owner, perm] = True
        return masks
    keep = active_per_task(num_channels, sharing_ratio)
    order = torch.rand(num_tasks, num_channels, generator=generator).argsort(dim=1)
    masks.scatter_(1, order[:, :keep], True)
    return masks


def check_masks(masks, num_channels: int | None = None) -> torch.Tensor:
    """Validate user masks: a bool ``[T, C]`` tensor with at least one channel per task."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.dim() != 2:
        raise ValueError(f"masks must have shape [num_tasks, num_channels], got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        if masks.dtype.is_floating_point or masks.dtype.is_complex:
            if not bool(((masks == 0) | (masks == 1)).all()):
                raise ValueError("masks must be binary (0/1 or bool)")
        masks = masks != 0
    if masks.shape[0] < 1 or masks.shape[1] < 1:
        raise ValueError(f"masks must have at least one task and one channel, got {tuple(masks.shape)}")
    if num_channels is not None and masks.shape[1] != num_channels:
        raise ValueError(f"masks have {masks.shape[1]} channels but num_channels={num_channels}")
    empty = (~masks.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"masks: every task needs at least one active channel; "
                         f"task(s) {empty[:8].tolist()} have none")
    return masks


def check_task_ids(task, num_tasks: int, batch_size: int, device: torch.device | None = None):
    """The active task, checked against ``num_tasks``: an int, or a LongTensor ``[N]`` of per-sample
    ids (a 0-d tensor is accepted as one task for the batch, e.g. while compiling)."""
    if task is None:
        raise ValueError("task is not set: call set_active_task(model, task) or pass task=")
    if isinstance(task, torch.Tensor) and task.dim() == 0 and not task.is_floating_point() \
            and task.dtype != torch.bool and not torch.compiler.is_compiling():
        task = int(task)
    if isinstance(task, bool) or isinstance(task, float):
        raise TypeError(f"task must be an int or an integer LongTensor, got {type(task).__name__}")
    if isinstance(task, numbers.Integral):
        if not 0 <= task < num_tasks:
            raise IndexError(f"task {task} is out of range for {num_tasks} tasks")
        return int(task)
    if not isinstance(task, torch.Tensor):
        raise TypeError(f"task must be an int or an integer LongTensor, got {type(task).__name__}")
    if task.dtype.is_floating_point or task.dtype.is_complex or task.dtype == torch.bool:
        raise TypeError(f"task must be an integer tensor (torch.long), got dtype {task.dtype}")
    if task.dim() == 0:
        return task.long()
    if task.dim() != 1 or task.shape[0] != batch_size:
        raise ValueError(f"per-sample task must have shape [{batch_size}] (one id per sample), "
                         f"got {tuple(task.shape)}")
    if device is not None and task.device != device:
        raise ValueError(f"task is on {task.device} but the input is on {device}")
    if task.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(task)).tolist()  # one device sync for both bounds
        if lo < 0 or hi >= num_tasks:
            raise IndexError(f"task ids must be in [0, {num_tasks}), got values in [{lo}, {hi}]")
    return task.long()


def select_route(masks: torch.Tensor, task, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The channels each sample is routed through: bool ``[C]`` for one task per batch,
    ``[N, C]`` for a per-sample task tensor. Checks the task against ``masks``."""
    task = check_task_ids(task, masks.shape[0], batch_size, device)
    if isinstance(task, int):
        return masks[task]
    if task.dim() == 0:  # index_select, not masks[task]: inductor cannot compile a 0-d index
        return masks.index_select(0, task.reshape(1).to(masks.device)).squeeze(0)
    if task.device != masks.device:
        raise ValueError(f"task is on {task.device} but masks are on {masks.device}")
    return masks.index_select(0, task)
