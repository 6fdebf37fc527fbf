"""Per-task BatchNorm statistics (``task_stats=True``): the buffers, their update counts, the
grouping of per-sample tasks, and the loading of state_dicts saved without them.

Mixed into a BatchNorm-like module (``running_mean``, ``running_var``, ``num_batches_tracked``,
``momentum``, ``masks``, ``num_tasks``). With σ < 1 each task's inputs to a layer differ, so a
task keeps its own running statistics: ``task_running_mean``/``task_running_var`` ``[T, C]``,
``task_num_batches_tracked`` ``[T]`` (so ``momentum=None`` averages each task's own batches) and
``task_last_batch`` ``[T]`` (the layer's ``num_batches_tracked`` at each task's last update).
The shared ``running_mean``/``running_var`` keep their ``nn.BatchNorm`` meaning.

With a momentum m, a row decays per training batch of the layer, not per batch of its task: a
task last seen g batches ago moves its row by ``1 - (1 - m)**g``, as if its statistics had been
observed at every batch, held between its own. Each row is then as recent as the shared statistics
(with one task, or a task in every batch, exactly ``nn.BatchNorm``'s rule). Decaying per own batch
instead, a task of T gets 1/T of the updates and its row lags the weights by T times as many steps
and keeps part of the initial (0, 1): on digits (10 tasks, 15 epochs) that kept 2 % of the initial
variance in a layer whose true variance was 0.5 %, and ``model.eval()`` fell to the majority class.
The factor, the row update and the counts are one ``update_task_running_stats`` call (one launch on
a GPU, nothing read back to the host; traceable by ``torch.compile``).
"""
from __future__ import annotations

import warnings

import torch

from ..ops.bn_relu_route import update_task_rows
from ..ops.route import task_groups

__all__ = ["TaskStats", "TASK_BUFFERS", "task_stats_from_shared"]

TASK_BUFFERS = ("task_running_mean", "task_running_var", "task_num_batches_tracked", "task_last_batch")
_SHARED = ("running_mean", "running_var", "num_batches_tracked", "num_batches_tracked")  # the source of each


def task_stats_from_shared(state_dict, num_tasks: int, prefix: str = "") -> dict:
    """Per-task buffers for a state_dict saved without them: every task's row a copy of the shared stats."""
    rows = {}
    for key, source in zip(TASK_BUFFERS, _SHARED):
        value = state_dict[prefix + source]
        counted = source == "num_batches_tracked"  # a count: 0-dim (or [1] in some older files)
        rows[prefix + key] = value.reshape(()).repeat(num_tasks) if counted else value.repeat(num_tasks, 1)
    return rows


class TaskStats:
    """Per-task running statistics for a BatchNorm-like module; see the module docstring."""

    task_stats = False

    def _init_task_stats(self, task_stats) -> None:
        if not isinstance(task_stats, bool):
            raise TypeError(f"task_stats must be a bool, got {type(task_stats).__name__}")
        if task_stats and not self.track_running_stats:
            raise ValueError("task_stats=True keeps per-task running statistics: it needs track_running_stats=True")
        self.task_stats = task_stats
        if task_stats:
            rows = (self.num_tasks, 1)
            self.register_buffer("task_running_mean", self.running_mean.detach().repeat(rows))
            self.register_buffer("task_running_var", self.running_var.detach().repeat(rows))
            self.register_buffer("task_num_batches_tracked",
                                 self.num_batches_tracked.detach().repeat(self.num_tasks))
            self.register_buffer("task_last_batch", self.num_batches_tracked.detach().repeat(self.num_tasks))

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if self.task_stats:
            self.task_running_mean.zero_()
            self.task_running_var.fill_(1)
            self.task_num_batches_tracked.zero_()
            self.task_last_batch.zero_()

    def _update_task_row(self, task: int, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """Counts a training batch of ``task`` and moves its row towards the batch statistics by
        ``1/n`` for ``momentum=None``, else ``1 - (1 - m)**g`` (module docstring)."""
        update_task_rows(self.task_running_mean, self.task_running_var, self.task_num_batches_tracked,
                         self.task_last_batch, self.num_batches_tracked, task, mean, var, count, self.momentum)

    def _task_rows(self, task: int):
        """``task``'s running mean and variance: contiguous row views, updated in place."""
        return self.task_running_mean[task], self.task_running_var[task]

    def _per_sample_eval(self, x: torch.Tensor, task: torch.Tensor, route: torch.Tensor | None = None,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
        """Eval with a task per sample in one broadcast pass, each sample normalised with its task's row
        (no grouping, no host read: traceable). With ``route`` ([N, C] bool) the fused layer's
        ``relu(· + residual) * route``; masked values are selected away before they enter anything."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        per_sample, per_channel = x.shape[:2] + (1,) * (x.dim() - 2), (1, x.shape[1]) + (1,) * (x.dim() - 2)
        mean = self.task_running_mean[task].to(dtype).reshape(per_sample)
        scale = torch.rsqrt(self.task_running_var[task].to(dtype) + self.eps).reshape(per_sample)
        if self.weight is not None:
            scale = scale * self.weight.to(dtype).reshape(per_channel)
        keep = None if route is None else route.reshape(per_sample)
        y = ((x.to(dtype) if keep is None else torch.where(keep, x.to(dtype), mean)) - mean) * scale
        if self.bias is not None:
            y = y + self.bias.to(dtype).reshape(per_channel)
        if keep is None:
            return y.to(x.dtype)
        if residual is not None:
            y = y + torch.where(keep, residual.to(dtype), 0)
        return torch.where(keep, y.relu(), 0).to(x.dtype)

    @staticmethod
    def _grouped(x: torch.Tensor, task: torch.Tensor, run, *others: torch.Tensor) -> torch.Tensor:
        """``run(x_group, t, *other_groups)`` on the samples of each present task ``t`` (``others``: more
        per-sample tensors, grouped alike), reassembled in x's order."""
        if x.shape[0] == 0:
            return x * 0
        order, groups = task_groups(task)
        sizes = [n for _, n in groups]
        parts = zip(*(t.index_select(0, order).split(sizes) for t in (x, *others)))
        y = torch.cat([run(part, t, *rest) for (part, *rest), (t, _) in zip(parts, groups)])
        return y.index_select(0, order.argsort())

    @staticmethod
    def _check_group_sizes(x: torch.Tensor, task: torch.Tensor) -> None:
        """Training: every task group needs more than one value per channel (checked before any update)."""
        per_sample = x[0].numel() // max(x.shape[1], 1) if x.shape[0] else 0
        counts = torch.bincount(task)
        if per_sample == 1 and bool(((counts == 1)).any()):
            lonely = (counts == 1).nonzero().flatten()[:8].tolist()
            raise ValueError(f"Expected more than 1 value per channel when training: with task_stats=True each "
                             f"task's samples are normalised together, and task(s) {lonely} have a single "
                             f"sample of input size {tuple(x.shape[1:])}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [prefix + name for name in TASK_BUFFERS]
        shared = [prefix + name for name in _SHARED]
        if self.task_stats and not any(k in state_dict for k in keys) and all(k in state_dict for k in shared):
            warnings.warn(f"{prefix or 'module '}state_dict has no per-task statistics (saved without "
                          f"task_stats): every task starts from the shared running statistics", stacklevel=2)
            state_dict.update(task_stats_from_shared(state_dict, self.num_tasks, prefix))
        last, count = prefix + "task_last_batch", prefix + "num_batches_tracked"
        if self.task_stats and keys[0] in state_dict and last not in state_dict and count in state_dict:
            # Saved before task_last_batch existed: every row counts as updated at the last batch.
            state_dict[last] = state_dict[count].reshape(()).repeat(self.num_tasks)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
