"""Pieces shared by the routed models: the routed BatchNorm layers, per-layer masks, the base net."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.bn_relu_route import BATCH_NORMS, BNAddReLURoute2d, BNReLURoute2d
from ..nn.masks import check_masks, check_seed, check_sharing_ratio, make_masks
from ..nn.router import TaskRouter, active_task
from ..nn.task_batch_norm import TaskBatchNorm2d
from ..ops.checks import check_positive_int
from ..ops.recompute import note_pooled, recompute_outputs, recomputing
from ..ops.reference import route_select
from ..ops.route import select_route
from .heads import TaskHeads

__all__ = ["ReferenceBNReLURoute2d", "ROUTED_BN", "RecomputableMaxPool2d", "Routing", "RoutedNet", "init_weights"]


class ReferenceBNReLURoute2d(TaskBatchNorm2d):
    """Unfused ``BatchNorm2d → ReLU → TaskRouter`` (``nn.BatchNorm2d``'s own forward, ``F.relu``,
    then the mask), with the same parameters, buffers and state_dict keys as ``BNReLURoute2d``.
    ``task_stats=True``: the same per-task statistics, each task's samples through ``F.batch_norm``
    with its own row (and the shared stats updated by ``nn.BatchNorm2d``'s forward)."""

    def __init__(self, num_features: int, *, masks: torch.Tensor, sharing_ratio: float, task_stats: bool = False):
        masks = check_masks(masks, check_positive_int(num_features, "num_features"))
        super().__init__(num_features, num_tasks=masks.shape[0], task_stats=task_stats)
        self.sharing_ratio = check_sharing_ratio(sharing_ratio)
        self.register_buffer("masks", masks.clone())

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor:
        task = self.active_task if task is None else task
        # Selected first so that a bad task fails before the running stats are updated.
        self._check_input_dim(x)
        route = select_route(self.masks, task, x.shape[0], x.device)
        return route_select(F.relu(super().forward(x, task)), route)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sharing_ratio={self.sharing_ratio}"


ROUTED_BN = (BNReLURoute2d, ReferenceBNReLURoute2d)


class RecomputableMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose output, in a ``memory_efficient`` model, is rebuilt in backward from its
    input's recipe and its indices (``ops/recompute.py``) instead of kept by the next convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (recomputing() and torch.is_grad_enabled()) or self.return_indices:
            return super().forward(x)
        out, indices = F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                    ceil_mode=self.ceil_mode, return_indices=True)
        note_pooled(out, x, indices)
        return out


class Routing:
    """Builds a model's routing layers; each draws its own masks, in build order, from one
    generator seeded by ``seed`` (torch's global RNG when ``seed`` is None)."""

    def __init__(self, num_tasks: int, sharing_ratio: float = 0.5, seed: int | None = None,
                 stats: str = "batch", fused: bool = True, backend: str = "auto", task_stats: bool = True):
        if stats not in ("batch", "routed"):
            raise ValueError(f"stats must be 'batch' or 'routed', got {stats!r}")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        if not fused and stats == "routed":
            raise ValueError("stats='routed' is not a BatchNorm2d mode: use fused=True "
                             "(backend='reference' gives the pure-PyTorch path)")
        self.num_tasks = check_positive_int(num_tasks, "num_tasks")
        self.sharing_ratio = check_sharing_ratio(sharing_ratio)
        seed = check_seed(seed)
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.stats, self.fused, self.backend = stats, fused, backend
        if not isinstance(task_stats, bool):
            raise TypeError(f"task_stats must be a bool, got {type(task_stats).__name__}")
        self.task_stats = task_stats

    def masks(self, num_channels: int) -> torch.Tensor:
        return make_masks(self.num_tasks, num_channels, self.sharing_ratio, generator=self.generator)

    def bn_relu_route(self, num_channels: int) -> nn.Module:
        """BatchNorm2d → ReLU → route: fused ``BNReLURoute2d`` or ``ReferenceBNReLURoute2d``."""
        masks = self.masks(num_channels)
        if self.fused:
            return BNReLURoute2d(num_channels, masks=masks, sharing_ratio=self.sharing_ratio,
                                 stats=self.stats, backend=self.backend, task_stats=self.task_stats)
        return ReferenceBNReLURoute2d(num_channels, masks=masks, sharing_ratio=self.sharing_ratio,
                                      task_stats=self.task_stats)

    def bn_add_relu_route(self, num_channels: int) -> BNAddReLURoute2d:
        """A ResNet block's fused tail, BatchNorm2d → add → ReLU → route (``fused`` models): batch statistics,
        as the unrouted BatchNorm it replaces (``batch_norm``), and the router's masks."""
        return BNAddReLURoute2d(num_channels, masks=self.masks(num_channels), sharing_ratio=self.sharing_ratio,
                                backend=self.backend, task_stats=self.task_stats)

    def batch_norm(self, num_channels: int) -> nn.Module:
        """An unrouted BatchNorm2d (a ResNet's ``bn3`` and shortcut): a ``TaskBatchNorm2d``, with per-task
        statistics if ``task_stats`` (its input differs by task too), else ``nn.BatchNorm2d`` itself (and
        synchronised on CPU too by ``convert_sync_batchnorm``)."""
        return TaskBatchNorm2d(num_channels, num_tasks=self.num_tasks, task_stats=self.task_stats)

    def router(self, num_channels: int) -> TaskRouter:
        return TaskRouter(num_channels, masks=self.masks(num_channels), sharing_ratio=self.sharing_ratio)


def init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convs, BatchNorm at identity, as torchvision does."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, BATCH_NORMS):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class RoutedNet(nn.Module):
    """A routed trunk (``trunk()``, run in order) ending in adaptive average pooling, then
    ``heads``: one logit per sample ``[N]`` for the active task.

    ``model(x)`` uses the task set by ``set_active_task(model, task)``; ``model(x, task=t)``
    sets ``t`` for this call only. ``memory_efficient``: the fused layers' outputs are not kept for
    backward where the next layer saves them, but rebuilt there from the layer's input and
    per-channel statistics (``ops/recompute.py``): fewer saved activations, the same gradients.
    """

    def __init__(self, in_channels: int, width_mult: float, pool_size: int, memory_efficient: bool = False):
        super().__init__()
        if not isinstance(memory_efficient, bool):
            raise TypeError(f"memory_efficient must be a bool, got {type(memory_efficient).__name__}")
        self.memory_efficient = memory_efficient
        self.in_channels = check_positive_int(in_channels, "in_channels")
        if isinstance(width_mult, bool) or not isinstance(width_mult, numbers.Real):
            raise TypeError(f"width_mult must be a number, got {type(width_mult).__name__}")
        if not (width_mult > 0 and math.isfinite(width_mult)):
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        self.width_mult = float(width_mult)
        self.pool_size = check_positive_int(pool_size, "pool_size")

    @property
    def num_tasks(self) -> int:
        return self.heads.num_tasks

    def scaled(self, channels: int) -> int:
        """``channels * width_mult``, rounded, at least 1."""
        return max(1, int(round(channels * self.width_mult)))

    def add_heads(self, channels: int, num_tasks: int, embedding_dim: int) -> None:
        """Pooling and the task heads after a trunk with ``channels`` output channels; then init."""
        self.avgpool = nn.AdaptiveAvgPool2d(self.pool_size)
        self.heads = TaskHeads(channels * self.pool_size ** 2, num_tasks, embedding_dim)
        init_weights(self)

    def trunk(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor:
        if task is not None:
            with active_task(self, task):
                return self.forward(x)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [N, {self.in_channels}, H, W], got {shape}")
        # Under torch.compile the compiled graph picks what it saves (its partitioner recomputes too).
        recompute = self.memory_efficient and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        with recompute_outputs() if recompute else contextlib.nullcontext():
            for module in self.trunk():
                x = module(x)
        return self.heads(torch.flatten(x, 1))
