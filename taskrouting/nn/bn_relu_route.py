"""BNReLURoute1d/2d/3d: BatchNorm → ReLU → Task Routing as one fused layer; BNAddReLURoute2d with a residual
added before the ReLU (a ResNet bottleneck's tail)."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .. import ops
from ..ops.checks import DTYPES, check_positive_int
from ..ops.reference import channel_stats, update_running_stats
from ..ops.route import check_task_ids, select_route
from .masks import build_masks, check_sharing_ratio
from .router import TaskConditioned
from .state import CheckedStateLoad
from .task_stats import TaskStats

__all__ = ["BNReLURoute1d", "BNReLURoute2d", "BNReLURoute3d", "BNAddReLURoute2d", "BATCH_NORMS"]


class _BNReLURoute(CheckedStateLoad, TaskStats, nn.modules.batchnorm._NormBase, TaskConditioned):
    """``TaskRouter(ReLU(BatchNorm(x)))`` in one op; same arguments and state_dict as
    ``nn.BatchNorm*d`` plus the routing ones and the bool buffer ``masks``.

    Derived from ``_NormBase``, not ``_BatchNorm``, so that ``nn.SyncBatchNorm.convert_sync_batchnorm``
    (which replaces every ``_BatchNorm``) leaves it alone instead of dropping the ReLU and the routing.

    ``task_stats=True`` also keeps per-task running statistics (``nn/task_stats.py``): training
    normalises each task's samples with their own batch statistics and updates that task's row
    (and the shared ones, as ``nn.BatchNorm``); eval normalises each sample with its task's row.
    Per-sample tasks: in training one op call per task group (correct, not one pass); in eval one
    broadcast pass in PyTorch ops with each sample's task row (``TaskStats._per_sample_eval``)."""

    _ranks: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 num_tasks: int | None = None, sharing_ratio: float = 0.5, seed: int | None = None,
                 masks: torch.Tensor | None = None, stats: str = "batch", backend: str = "auto",
                 task_stats: bool = False, **batchnorm_kwargs):
        num_features = check_positive_int(num_features, "num_features")
        if dtype is not None and dtype not in DTYPES:
            raise TypeError(f"dtype must be None or one of {', '.join(map(str, DTYPES))}, got {dtype!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **batchnorm_kwargs)
        if stats not in ("batch", "routed"):
            raise ValueError(f"stats must be 'batch' or 'routed', got {stats!r}")
        if not isinstance(backend, str) or (backend != "auto" and backend not in ops.BACKENDS):
            raise ValueError(f"backend must be 'auto' or one of {sorted(ops.BACKENDS)}, got {backend!r}")
        self.sharing_ratio = check_sharing_ratio(sharing_ratio)
        masks = build_masks(num_features, num_tasks, self.sharing_ratio, seed, masks)
        self.num_tasks = masks.shape[0]
        self.stats = stats
        self.backend = backend
        self.register_buffer("masks", masks.to(device))
        self.active_task = None
        self._init_task_stats(task_stats)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._ranks:
            raise ValueError(f"{type(self).__name__} expects a {' or '.join(map(str, self._ranks))}-D "
                             f"input x, got {x.dim()}-D (shape {tuple(x.shape)})")

    def _counts_batch(self) -> bool:
        return self.training and self.track_running_stats and self.num_batches_tracked is not None

    def _average_factor(self) -> float:
        """Running-stat factor for this batch, as if counted (nn.BatchNorm's rule, ``momentum=None`` =
        cumulative); the batch is counted only once the op has succeeded."""
        if self.momentum is not None:
            return self.momentum
        return 1.0 / (float(self.num_batches_tracked) + 1.0) if self._counts_batch() else 0.0

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor:
        return self._routed_forward(x, None, task)

    def _op_on(self, x, residual, route, *args, **kwargs):
        """The fused op on a selected route, with the residual if there is one (the sync variant overrides this)."""
        return ops.bn_relu_route_on(x, route, *args, residual=residual, **kwargs)

    def _routed_forward(self, x: torch.Tensor, residual: torch.Tensor | None, task) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        ops.check_inputs(x, self.masks, self.weight, self.bias, running_mean, running_var, use_batch_stats,
                         self.momentum or 0.0, self.eps, self.stats)
        if residual is not None:
            ops.check_residual(residual, x)
        if self.task_stats:
            y = self._forward_task_stats(x, residual, self.active_task if task is None else task)
        else:
            route = select_route(self.masks, self.active_task if task is None else task, x.shape[0], x.device)
            y = self._op_on(x, residual, route, self.weight, self.bias, running_mean, running_var,
                            use_batch_stats, self._average_factor(), self.eps, self.stats, self.backend)
        if self._counts_batch():  # after the op: a rejected call (e.g. an unavailable backend) counts nothing
            self.num_batches_tracked.add_(1)
        return y

    def _forward_task_stats(self, x: torch.Tensor, residual: torch.Tensor | None, task) -> torch.Tensor:
        task = check_task_ids(task, self.num_tasks, x.shape[0], x.device)
        if isinstance(task, torch.Tensor) and task.dim() == 0:
            task = int(task)
        if isinstance(task, int):
            return self._one_task(x, residual, task, self._average_factor() if self.training else 0.0)
        if not self.training:
            return self._per_sample_eval(x, task, self.masks[task], residual)
        self._check_group_sizes(x, task)
        mean, var, count = channel_stats(x.detach(), self.masks[task] if self.stats == "routed" else None)
        update_running_stats(self.running_mean, self.running_var, mean, var, count, self._average_factor())
        if residual is None:
            return self._grouped(x, task, lambda part, t: self._one_task(part, None, t, None))
        return self._grouped(x, task, lambda part, t, r: self._one_task(part, r, t, None), residual)

    def _one_task(self, x: torch.Tensor, residual: torch.Tensor | None, task: int,
                  shared_factor: float | None) -> torch.Tensor:
        """The op on a batch of one task: training updates its row (and, unless ``shared_factor`` is
        None, the shared stats); eval normalises with its row."""
        mean, var = self._task_rows(task)
        if not self.training:
            return self._op_on(x, residual, self.masks[task], self.weight, self.bias, mean, var, False, 0.0,
                               self.eps, self.stats, self.backend)
        shared = (None, None, 0.0) if shared_factor is None else (self.running_mean, self.running_var, shared_factor)
        return self._op_on(x, residual, self.masks[task], self.weight, self.bias, *shared[:2], True, shared[2],
                           self.eps, self.stats, self.backend,
                           also_update=functools.partial(self._update_task_row, task))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_tasks={self.num_tasks}, sharing_ratio={self.sharing_ratio}, "
                f"stats={self.stats!r}, backend={self.backend!r}" + (", task_stats=True" if self.task_stats else ""))


class BNReLURoute1d(_BNReLURoute):
    """Fused ``BatchNorm1d → ReLU → TaskRouter`` over ``[N, C]`` or ``[N, C, L]``."""
    _ranks = (2, 3)


class BNReLURoute2d(_BNReLURoute):
    """Fused ``BatchNorm2d → ReLU → TaskRouter`` over ``[N, C, H, W]``."""
    _ranks = (4,)


class BNReLURoute3d(_BNReLURoute):
    """Fused ``BatchNorm3d → ReLU → TaskRouter`` over ``[N, C, D, H, W]``."""
    _ranks = (5,)


# Every BatchNorm-like layer with running statistics: PyTorch's and the fused routed ones.
BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, _BNReLURoute)


class BNAddReLURoute2d(_BNReLURoute):
    """Fused ``TaskRouter(ReLU(BatchNorm2d(x) + residual))``: a ResNet bottleneck's tail in one op
    (``ops.bn_add_relu_route``), ``forward(x, residual, task=None)``. Same arguments and state_dict as
    ``BNReLURoute2d``; the gradient reaches both x and the residual."""
    _ranks = (4,)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, task=None) -> torch.Tensor:
        if residual is None:  # checked in full with x (None would mean no residual there)
            raise TypeError("residual must be a Tensor, got NoneType")
        return self._routed_forward(x, residual, task)
