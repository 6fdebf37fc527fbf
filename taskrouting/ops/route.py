"""The active task of a batch, checked, and turned into its route: the channels each sample uses."""
from __future__ import annotations

import numbers

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["check_task_ids", "select_route", "task_groups", "task_id_bounds"]

# task tensor -> (version, min id, max id): every routed layer of a model checks the same task tensor,
# and reading its bounds from a GPU is a host sync (and impossible during CUDA-graph capture)
_BOUNDS = WeakIdKeyDictionary()


def task_id_bounds(task: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of an integer task tensor, read from its device once per tensor version
    (``set_active_task`` reads it when the task is set, so the layers' checks read nothing)."""
    try:
        version = task._version
    except RuntimeError:  # an inference tensor keeps no version counter: nothing can be cached
        version = None
    cached = _BOUNDS.get(task) if version is not None else None
    if cached is not None and cached[0] == version:
        return cached[1], cached[2]
    if task.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("task ids cannot be read from the GPU during CUDA-graph capture: set the task "
                           "before capturing (set_active_task(model, task) reads and checks it once)")
    lo, hi = torch.stack(torch.aminmax(task.reshape(-1))).tolist()  # one device sync for both bounds
    if version is not None:
        _BOUNDS[task] = (version, lo, hi)
    return lo, hi


def check_task_ids(task, num_tasks: int, batch_size: int, device: torch.device | None = None):
    """The active task, checked against ``num_tasks``: an int, or a LongTensor ``[N]`` of per-sample
    ids (a 0-d tensor is accepted as one task for the batch, e.g. while compiling)."""
    if task is None:
        raise ValueError("task is not set: call set_active_task(model, task) or pass task=")
    if isinstance(task, torch.Tensor) and task.dim() == 0 and not task.is_floating_point() \
            and task.dtype != torch.bool and not task.is_complex() and not torch.compiler.is_compiling():
        task = task_id_bounds(task)[0]
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
        lo, hi = task_id_bounds(task)
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


def task_groups(task: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Per-sample tasks as groups: the sample order that sorts them by task, and each present task with its
    group size (a host read: the group sizes decide the shapes)."""
    order = task.argsort(stable=True)
    tasks, counts = torch.unique_consecutive(task[order], return_counts=True)
    return order, list(zip(tasks.tolist(), counts.tolist()))
