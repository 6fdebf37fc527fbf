"""TaskBatchNorm2d: ``nn.BatchNorm2d`` that keeps per-task running statistics (``nn/task_stats.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.checks import check_positive_int
from ..ops.route import check_task_ids
from .router import TaskConditioned
from .state import CheckedStateLoad
from .task_stats import TaskStats

__all__ = ["TaskBatchNorm2d"]


class TaskBatchNorm2d(CheckedStateLoad, TaskStats, nn.BatchNorm2d, TaskConditioned):
    """``nn.BatchNorm2d`` for an unrouted layer of a routed model (a ResNet's ``bn3`` and shortcut
    BatchNorm), whose input still differs by task: with ``task_stats=True``, training normalises
    each task's samples with their own batch statistics and updates that task's row (and the shared
    statistics, as ``nn.BatchNorm2d``); eval normalises each sample with its task's row. Same
    state_dict as ``nn.BatchNorm2d`` plus the per-task buffers."""

    def __init__(self, num_features: int, *, num_tasks: int, task_stats: bool = True, **batchnorm_kwargs):
        super().__init__(check_positive_int(num_features, "num_features"), **batchnorm_kwargs)
        self.num_tasks = check_positive_int(num_tasks, "num_tasks")
        self.active_task = None
        self._init_task_stats(task_stats)

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor:
        task = self._checked(x, task)
        if not self.task_stats:
            return super().forward(x)
        return self._task_batch_norm(x, task)

    def _checked(self, x: torch.Tensor, task):
        """The input checked and, with ``task_stats``, the task (``active_task`` when None): before any
        update, so that a bad input or task changes no running statistics."""
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(f"x has {x.shape[1]} channels (dim 1) but the layer has {self.num_features}")
        if not self.task_stats:
            return None
        return check_task_ids(self.active_task if task is None else task, self.num_tasks, x.shape[0], x.device)

    def _task_batch_norm(self, x: torch.Tensor, task) -> torch.Tensor:
        if isinstance(task, torch.Tensor) and task.dim() == 0:
            task = int(task)
        if not self.training:
            return self._eval_one_task(x, task) if isinstance(task, int) else self._per_sample_eval(x, task)
        if isinstance(task, int):
            F._verify_batch_size(x.size())  # before any update: a rejected batch changes no state
            self._update_task_row(task, *self._batch_stats(x))
            return nn.BatchNorm2d.forward(self, x)  # the batch's normalisation and the shared statistics
        self._check_group_sizes(x, task)
        y = self._grouped(x, task, self._train_one_task)
        with torch.no_grad():  # after the rows, which date their update by the batch count before this batch
            nn.BatchNorm2d.forward(self, x)  # the shared statistics, as nn.BatchNorm2d keeps them
        return y

    @staticmethod
    def _batch_stats(x: torch.Tensor):
        """Per-channel mean, biased variance and value count of ``x`` (float32, float64 for float64 x:
        a count above 65504 is not a half)."""
        mean, var = torch.batch_norm_update_stats(x.detach(), None, None, 0.0)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return mean.to(dtype), var.to(dtype), torch.full_like(mean, x.numel() // x.shape[1], dtype=dtype)

    def _train_one_task(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self._update_task_row(task, *self._batch_stats(x))
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def _eval_one_task(self, x: torch.Tensor, task: int) -> torch.Tensor:
        mean, var = self._task_rows(task)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_tasks={self.num_tasks}" + (", task_stats=True" if self.task_stats else "")
