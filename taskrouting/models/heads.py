"""TaskHeads: one binary classification head per task, with its own embedding, batched over tasks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.router import TaskConditioned
from ..ops.checks import check_positive_int
from ..ops.route import check_task_ids, task_groups

__all__ = ["TaskHeads"]


class TaskHeads(nn.Module, TaskConditioned):
    """Per task ``t``: ``Linear(in_features, embedding_dim) → ReLU → Linear(embedding_dim, 1)``;
    returns one logit per sample, shape ``[N]``.

    The T heads are stacked tensors (``weight1 [T, E, F]``, ``bias1 [T, E]``, ``weight2 [T, E]``,
    ``bias2 [T]``), so no forward costs O(T): one task per batch (int) reads that task's slice;
    a per-sample LongTensor ``[N]`` groups the samples by task and runs the U distinct tasks of
    the batch as one padded ``bmm`` (extra memory: U weight slices and a ``[U, max group, F]``
    copy of ``x``; under ``torch.compile``, N weight slices, one per sample). Without autograd on
    the CPU, large heads run one group at a time on views of the weights instead: copying U slices
    costs more there than U small matmuls. The backward, as for any stacked parameter, writes a
    dense ``[T, ...]`` gradient (zero for absent tasks). Initialised like ``nn.Linear``.
    """

    #: Without autograd on the CPU, per-sample tasks loop over the task groups (weight views, no
    #: copy) when one task's first layer has at least this many bytes.
    LOOP_MIN_SLICE_BYTES = 256 * 1024

    def __init__(self, in_features: int, num_tasks: int, embedding_dim: int = 256, device=None, dtype=None):
        super().__init__()
        for value, name in ((in_features, "in_features"), (num_tasks, "num_tasks"),
                            (embedding_dim, "embedding_dim")):
            check_positive_int(value, name)
        self.in_features, self.num_tasks, self.embedding_dim = in_features, num_tasks, embedding_dim
        factory = {"device": device, "dtype": dtype}
        self.weight1 = nn.Parameter(torch.empty(num_tasks, embedding_dim, in_features, **factory))
        self.bias1 = nn.Parameter(torch.empty(num_tasks, embedding_dim, **factory))
        self.weight2 = nn.Parameter(torch.empty(num_tasks, embedding_dim, **factory))
        self.bias2 = nn.Parameter(torch.empty(num_tasks, **factory))
        self.active_task = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for every task."""
        for params, fan_in in (((self.weight1, self.bias1), self.in_features),
                               ((self.weight2, self.bias2), self.embedding_dim)):
            for p in params:
                nn.init.uniform_(p, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def _task(self, task, x: torch.Tensor):
        """The task as an int, or a checked LongTensor ``[N]`` of per-sample ids."""
        task = check_task_ids(task, self.num_tasks, x.shape[0], x.device)
        if isinstance(task, torch.Tensor) and task.dim() == 0:  # only while compiling
            task = task.expand(x.shape[0])
        return task

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [N, {self.in_features}], got {shape}")
        task = self._task(self.active_task if task is None else task, x)
        if isinstance(task, int):
            hidden = F.relu(F.linear(x, self.weight1[task], self.bias1[task]))
            return hidden @ self.weight2[task] + self.bias2[task]
        if torch.compiler.is_compiling():
            return self._per_sample_gathered(x, task)
        if self._loops(x):
            return self._per_sample_looped(x, task)
        return self._per_sample_grouped(x, task)

    def _loops(self, x: torch.Tensor) -> bool:
        """Whether per-sample tasks run one task group at a time (see the class docstring)."""
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return (not grad and x.device.type == "cpu"
                and self.weight1[0].numel() * self.weight1.element_size() >= self.LOOP_MIN_SLICE_BYTES)

    def _per_sample_looped(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Each present task's samples through that task's weights, read in place (no slice copied)."""
        order, groups = task_groups(task)
        out = x.new_empty(x.shape[0])
        for (t, _), rows in zip(groups, order.split([n for _, n in groups])):
            hidden = F.relu(F.linear(x[rows], self.weight1[t], self.bias1[t]))
            out[rows] = hidden @ self.weight2[t] + self.bias2[t]
        return out

    def _per_sample_gathered(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Each sample with its own copy of its task's weights (extra memory N·E·F); static
        shapes, so ``torch.compile`` captures it without a graph break."""
        hidden = F.relu(torch.baddbmm(self.bias1[task].unsqueeze(1), x.unsqueeze(1),
                                      self.weight1[task].transpose(1, 2))).squeeze(1)
        return (hidden * self.weight2[task]).sum(1) + self.bias2[task]

    def _per_sample_grouped(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """The U distinct tasks of the batch as one padded bmm: U weight copies, not N."""
        tasks, group, counts = torch.unique(task, return_inverse=True, return_counts=True)
        width = int(counts.max()) if counts.numel() else 0
        # Slot of each sample inside its group: its rank among the samples of its task.
        order = group.argsort(stable=True)
        rank = torch.arange(x.shape[0], device=x.device) - (counts.cumsum(0) - counts)[group[order]]
        slot = group * width + torch.empty_like(rank).scatter_(0, order, rank)
        padded = x.new_zeros(tasks.numel() * width, x.shape[1]).index_copy(0, slot, x)
        padded = padded.view(tasks.numel(), width, x.shape[1])
        hidden = F.relu(torch.baddbmm(self.bias1[tasks].unsqueeze(1), padded,
                                      self.weight1[tasks].transpose(1, 2)))
        logits = torch.baddbmm(self.bias2[tasks].view(-1, 1, 1), hidden, self.weight2[tasks].unsqueeze(2))
        return logits.flatten()[slot]

    def extract(self, task: int, in_index: torch.Tensor | None = None) -> nn.Sequential:
        """Task ``task``'s head as dense ``Linear → ReLU → Linear → Flatten(0)`` (output ``[N]``),
        reading only the input features ``in_index`` (all when None)."""
        with torch.no_grad():
            weight1 = self.weight1[task] if in_index is None else self.weight1[task][:, in_index]
            first = nn.Linear(weight1.shape[1], self.embedding_dim, device=weight1.device, dtype=weight1.dtype)
            second = nn.Linear(self.embedding_dim, 1, device=weight1.device, dtype=weight1.dtype)
            first.weight.copy_(weight1)
            first.bias.copy_(self.bias1[task])
            second.weight.copy_(self.weight2[task].unsqueeze(0))
            second.bias.copy_(self.bias2[task].view(1))
        return nn.Sequential(first, nn.ReLU(), second, nn.Flatten(0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_tasks={self.num_tasks}, embedding_dim={self.embedding_dim}"
