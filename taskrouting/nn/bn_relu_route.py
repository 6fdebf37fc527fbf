"""BNReLURoute1d/2d/3d: BatchNorm → ReLU → Task Routing as one fused layer."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.route import select_route
from .masks import build_masks, check_sharing_ratio
from .router import TaskConditioned

__all__ = ["BNReLURoute1d", "BNReLURoute2d", "BNReLURoute3d", "BATCH_NORMS"]


class _BNReLURoute(nn.modules.batchnorm._NormBase, TaskConditioned):
    """``TaskRouter(ReLU(BatchNorm(x)))`` in one op; same arguments and state_dict as
    ``nn.BatchNorm*d`` plus the routing ones and the bool buffer ``masks``.

    Derived from ``_NormBase``, not ``_BatchNorm``, so that ``nn.SyncBatchNorm.convert_sync_batchnorm``
    (which replaces every ``_BatchNorm``) leaves it alone instead of dropping the ReLU and the routing."""

    _ranks: tuple[int, ...] = ()
    _bn_relu_route_on = staticmethod(ops.bn_relu_route_on)  # the sync variant overrides it

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 num_tasks: int | None = None, sharing_ratio: float = 0.5, seed: int | None = None,
                 masks: torch.Tensor | None = None, stats: str = "batch", backend: str = "auto",
                 **batchnorm_kwargs):
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

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._ranks:
            raise ValueError(f"{type(self).__name__} expects a {' or '.join(map(str, self._ranks))}-D "
                             f"input x, got {x.dim()}-D (shape {tuple(x.shape)})")

    def _average_factor(self) -> float:
        """Running-stat factor, counting the batch (nn.BatchNorm's rule, ``momentum=None`` = cumulative)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        # Everything is checked before num_batches_tracked counts the batch.
        ops.check_inputs(x, self.masks, self.weight, self.bias, running_mean, running_var, use_batch_stats,
                         self.momentum or 0.0, self.eps, self.stats)
        route = select_route(self.masks, self.active_task if task is None else task, x.shape[0], x.device)
        return self._bn_relu_route_on(x, route, self.weight, self.bias, running_mean, running_var,
                                      use_batch_stats, self._average_factor(), self.eps, self.stats, self.backend)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_tasks={self.num_tasks}, sharing_ratio={self.sharing_ratio}, "
                f"stats={self.stats!r}, backend={self.backend!r}")


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
