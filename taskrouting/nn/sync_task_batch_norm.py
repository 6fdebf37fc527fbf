"""SyncTaskBatchNorm2d: ``TaskBatchNorm2d`` (a routed ResNet's unrouted BatchNorm) with batch statistics over
every process of a group, on CPU (gloo) and CUDA alike (``nn.SyncBatchNorm`` runs on GPUs only).

Training with more than one process: per-channel statistics -> one all-reduce (``all_reduce_stats``) ->
normalise with the merged statistics; backward: the fused op's ``backward_reduce`` -> all-reduce of
``[sum_dy, sum_dy_xmu]`` -> ``backward_apply``, every channel routed and the stages' ReLU gate held open by
an infinite shift (this layer has no ReLU). Each process computes what one process computes on the whole
batch: its slice of the output and of ``grad_x``, its share of the weight and bias gradients, the same
running statistics and, with ``task_stats=True``, the same row of the batch's task (one task per batch:
per-sample tasks are refused, as in ``SyncBNReLURoute2d``). In eval mode or in one process it is
``TaskBatchNorm2d``.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops
from ..ops.bn_relu_route import update_running_stats_of
from ..ops.schemas import stats_dtype
from ..ops.stages import stage_ops
from .sync_bn_relu_route import all_reduce_stats, refuse_per_sample_tasks, world_size
from .task_batch_norm import TaskBatchNorm2d

__all__ = ["SyncTaskBatchNorm2d"]


class _SyncedBatchNorm(torch.autograd.Function):
    """Training BatchNorm whose statistics and backward sums span every process of ``group``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, update):
        stages = stage_ops(ops.resolve_backend("auto", x))
        channels, dtype = x.shape[1], stats_dtype(x)
        route = torch.ones(channels, dtype=torch.bool, device=x.device)
        if x.shape[0] == 0:  # an empty shard still joins the collectives, with nothing to add
            mean = var = count = x.new_zeros(channels, dtype=dtype)
        else:
            mean, var, count = stages.channel_stats(x, route, False, True)
        mean, var, total, _ = all_reduce_stats(mean, var, count, group)
        if x.numel() // channels <= 1 and float(total.max()) <= 1:  # a host read only when it may fail
            raise ValueError(f"Expected more than 1 value per channel when training, got {float(total.max()):.0f} "
                             f"over all {world_size(group)} processes")
        mean, var, count = mean.to(dtype), var.to(dtype), total.to(dtype)
        update(mean, var, count)
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps) if x.shape[0] else torch.empty_like(x)
        ctx.save_for_backward(x, weight, bias, route, mean, torch.rsqrt(var + eps), count)
        ctx.stages, ctx.group = stages, group
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, bias, route, mean, invstd, count = ctx.saved_tensors
        no_relu = torch.full_like(mean, float("inf"))  # as the shift, keeps the stages' ReLU gate open
        if x.shape[0] == 0:
            sum_dy = sum_dy_xmu = mean.new_zeros(x.shape[1])
        else:
            sum_dy, sum_dy_xmu = ctx.stages.backward_reduce(grad_y, x, route, mean, invstd, weight, no_relu)
        packed = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(packed, group=ctx.group)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x) if x.shape[0] == 0 else ctx.stages.backward_apply(
                grad_y, x, route, mean, invstd, weight, no_relu, *packed.chunk(2), count, True, False)
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(bias.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


class SyncTaskBatchNorm2d(TaskBatchNorm2d):
    """``TaskBatchNorm2d`` whose training batch statistics span every process of ``process_group`` (the
    default group when None); same arguments and state_dict otherwise."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor:
        if not (self.training and world_size(self.process_group) > 1):
            return super().forward(x, task)
        task = self._checked(x, task)
        refuse_per_sample_tasks(task)
        return _SyncedBatchNorm.apply(x, self.weight, self.bias, self.eps, self.process_group,
                                      functools.partial(self._update_running, task))

    def _update_running(self, task, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """The task's row (before the batch is counted, as ``TaskBatchNorm2d``), then the shared statistics."""
        if not self.track_running_stats:
            return
        if self.task_stats:
            self._update_task_row(int(task), mean, var, count)
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        update_running_stats_of(self.running_mean, self.running_var, mean, var, count, factor)
