"""SyncBNReLURoute1d/2d/3d: the fused layer with batch statistics over every process of a group.

Training with more than one process, the op runs in its stages with one collective between them:
forward ``channel_stats`` -> all-reduce of ``[count·mean, M2 + count·mean², count, used]``
(float64, so the merged variance loses nothing to cancellation) -> ``normalize_relu_route``;
backward ``backward_reduce`` -> all-reduce of ``[sum_dy, sum_dy_xmu]`` -> ``backward_apply``. Every
process then computes what one process computes on the concatenated batch: its slice of the
output and of ``grad_x``, and its share of the weight and bias gradients (DDP sums them), and the
same running statistics. With ``task_stats=True`` the task's row is updated from the same merged
statistics (one task per batch; per-sample tasks are refused, since each process would hold other
task groups). In eval mode, with one process, or outside ``torch.distributed``, it is the plain
fused layer. Within ``recompute_outputs`` (``memory_efficient``) its output is noted for recompute as
the fused layer's is.

``SyncBNAddReLURoute2d`` (a ResNet block's fused tail) runs the same stages: its forward normalises
with the merged statistics through ``bn_add_relu_route`` in eval form (the residual added before the
ReLU), and its backward feeds the stages ``g = grad_y · [y > 0]``, whose gate already holds the
residual's effect (see ``_SyncedBNReLURoute.backward``); ``grad_residual`` is that g.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import ops
from ..ops.bn_relu_route import update_running_stats_of
from ..ops.recompute import note_output
from ..ops.reference import route_view
from ..ops.schemas import stats_dtype
from ..ops.stages import stage_ops
from .bn_relu_route import BNAddReLURoute2d, BNReLURoute1d, BNReLURoute2d, BNReLURoute3d, _BNReLURoute

__all__ = ["SyncBNReLURoute1d", "SyncBNReLURoute2d", "SyncBNReLURoute3d", "SyncBNAddReLURoute2d", "world_size",
           "all_reduce_stats", "refuse_per_sample_tasks"]


def world_size(process_group=None) -> int:
    """Processes in ``process_group`` (the default group when None); 1 outside ``torch.distributed``."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def all_reduce_stats(mean, var, count, group, *more: torch.Tensor):
    """Every process's per-channel ``mean``, biased ``var`` and ``count`` merged over ``group`` in one
    all-reduce of float64 sums (``count·mean``, ``count·(var + mean²)``; float64, so the merged variance
    loses nothing to cancellation), with ``more`` [C] tensors summed alongside: the global mean, variance,
    count (float64) and the sum of ``more`` (empty without)."""
    channels, m, c = mean.numel(), mean.double(), count.double()
    packed = torch.cat([c * m, c * (var.double() + m.square()), c, *(t.double() for t in more)])
    dist.all_reduce(packed, group=group)
    sums, squares, total = packed[:channels], packed[channels:2 * channels], packed[2 * channels:3 * channels]
    safe = total.clamp_min(1)
    global_mean = sums / safe
    return global_mean, (squares / safe - global_mean.square()).clamp_min(0), total, packed[3 * channels:]


def refuse_per_sample_tasks(task) -> None:
    """Per-task statistics of per-sample tasks are not synchronised: each process would hold other task
    groups, and the collectives of the groups would not pair up."""
    if isinstance(task, torch.Tensor) and task.dim() == 1:
        raise ValueError("task_stats=True with per-sample tasks is not synchronised across processes: train "
                         "with one task per batch (an int task), or use task_stats=False")


def _local_used(route: torch.Tensor) -> torch.Tensor:
    return route.any(0) if route.dim() == 2 else route


class _SyncedBNReLURoute(torch.autograd.Function):
    """The staged op with the per-channel sums all-reduced between the stages; with a ``residual``, the
    staged ``bn_add_relu_route``."""

    @staticmethod
    def forward(ctx, x, weight, bias, route, backend, routed, eps, group, running_mean, running_var, momentum,
                also_update, residual):
        stages = stage_ops(backend)
        channels, dtype = x.shape[1], stats_dtype(x)
        used = _local_used(route)
        if x.shape[0] == 0:  # an empty shard still joins the collectives, with nothing to add
            mean = var = count = x.new_zeros(channels, dtype=dtype)
        else:
            mean, var, count = stages.channel_stats(x, route, routed, not routed)
        # which channels some process routes: they need grad_x on every process
        global_mean, global_var, total, routes = all_reduce_stats(mean, var, count, group,
                                                                  *([] if routed else [used]))
        extra = None
        if not routed:
            extra = (routes > 0) & ~used
            values, widened = torch.stack([total.max(), extra.any().double()]).tolist()
            if values <= 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got {values:.0f} "
                                 f"over all {world_size(group)} processes")
            extra = extra if widened else None
        mean, var, count = global_mean.to(dtype), global_var.to(dtype), total.to(dtype)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            update_running_stats_of(running_mean, running_var, mean, var, count, momentum)
        if also_update is not None:  # a task's row (task_stats), from the same merged statistics
            also_update(mean, var, count)
        if x.shape[0] == 0:
            y = torch.empty_like(x)
        elif residual is None:
            y = stages.normalize_relu_route(x, route, mean, invstd, weight, bias)
        else:  # the op in eval form normalises with given statistics (invstd = rsqrt(var + eps) as above)
            y = ops.bn_relu_route_on(x, route, weight, bias, mean, var, False, 0.0, eps, "batch", backend,
                                     residual=residual)
        ctx.save_for_backward(x, weight, bias, route, mean, invstd, count, extra,
                              y if residual is not None else None)
        ctx.stages, ctx.routed, ctx.group = stages, routed, group
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd  # the statistics for the recipe of memory_efficient (``note_output``)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_invstd):
        x, weight, bias, route, mean, invstd, count, extra, y = ctx.saved_tensors
        stages = ctx.stages
        shift, grad_residual = bias, None
        if y is not None:
            # The tail's gate is y > 0 (the residual entered the ReLU): applied here, while an infinite shift
            # keeps the stages' own ReLU gate (pre-activation > 0, without the residual) open. The bias enters
            # the stages nowhere else.
            grad_y = torch.where(y > 0, grad_y, grad_y.new_zeros(()))
            grad_residual = grad_y if ctx.needs_input_grad[12] else None
            shift = torch.full((x.shape[1],), float("inf"), dtype=mean.dtype, device=x.device)
        if x.shape[0] == 0:
            sum_dy = sum_dy_xmu = mean.new_zeros(x.shape[1])
        else:
            sum_dy, sum_dy_xmu = stages.backward_reduce(grad_y, x, route, mean, invstd, weight, shift)
        packed = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(packed, group=ctx.group)
        global_dy, global_dy_xmu = packed.chunk(2)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if x.shape[0] == 0:
                grad_x = torch.zeros_like(x)
            else:
                if extra is not None:
                    # Channels only other processes route: no gradient flows through them here, but these
                    # samples entered their batch statistics. Mark them routed and zero their grad_y.
                    grad_y = grad_y * route_view(route, grad_y)
                    route = route | extra
                grad_x = stages.backward_apply(grad_y, x, route, mean, invstd, weight, shift, global_dy,
                                               global_dy_xmu, count, True, ctx.routed)
        grad_weight = (sum_dy_xmu * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] \
            else None
        grad_bias = sum_dy.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return (grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None,
                grad_residual)


class _SyncBNReLURoute(_BNReLURoute):
    """``BNReLURoute*d`` whose training batch statistics span every process of ``process_group``
    (the default group when None); same arguments and state_dict otherwise."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _synced(self) -> bool:
        return self.training and world_size(self.process_group) > 1

    def _op_on(self, x, residual, route, weight, bias, running_mean, running_var, training, momentum, eps, stats,
               backend, also_update=None):
        if not (training and self._synced()):
            return super()._op_on(x, residual, route, weight, bias, running_mean, running_var, training, momentum,
                                  eps, stats, backend, also_update=also_update)
        name = ops.resolve_backend(backend, x)
        y, mean, invstd = _SyncedBNReLURoute.apply(x, weight, bias, route, name, stats == "routed", float(eps),
                                                   self.process_group, running_mean, running_var, float(momentum),
                                                   also_update, residual)
        family = ops.BACKENDS[name].family
        if residual is None and family is not None:  # as the unsynced op: the reference keeps its outputs
            note_output(y, family, x, route, mean, invstd, weight, bias)
        return y

    def _forward_task_stats(self, x, residual, task):
        if self._synced():
            refuse_per_sample_tasks(task)
        return super()._forward_task_stats(x, residual, task)


class SyncBNReLURoute1d(_SyncBNReLURoute, BNReLURoute1d):
    """``BNReLURoute1d`` with statistics synchronised over ``process_group``."""


class SyncBNReLURoute2d(_SyncBNReLURoute, BNReLURoute2d):
    """``BNReLURoute2d`` with statistics synchronised over ``process_group``."""


class SyncBNReLURoute3d(_SyncBNReLURoute, BNReLURoute3d):
    """``BNReLURoute3d`` with statistics synchronised over ``process_group``."""


class SyncBNAddReLURoute2d(_SyncBNReLURoute, BNAddReLURoute2d):
    """``BNAddReLURoute2d`` with statistics synchronised over ``process_group``."""
