"""fuse(): replace BatchNorm → ReLU → TaskRouter runs in a model with one fused layer."""
from __future__ import annotations

import torch
from torch import nn

from .bn_relu_route import BNReLURoute1d, BNReLURoute2d, BNReLURoute3d
from .masks import check_masks
from .router import TaskRouter, check_model
from .task_stats import task_stats_from_shared

__all__ = ["fuse"]

_FUSED = {nn.BatchNorm1d: BNReLURoute1d, nn.BatchNorm2d: BNReLURoute2d, nn.BatchNorm3d: BNReLURoute3d}


def _router_masks(m: nn.Module) -> torch.Tensor | None:
    """The bool ``[T, C]`` masks of a router: ours, or one shaped like the authors' released
    ``TaskRouter`` (a float ``[T, C]`` ``_unit_mapping``, 1 = keep, and ``active_task``); else None."""
    if isinstance(m, TaskRouter):
        return m.masks
    mapping = getattr(m, "_unit_mapping", None)
    if isinstance(mapping, torch.Tensor) and mapping.dim() == 2 and hasattr(m, "active_task"):
        return check_masks(mapping.detach() != 0)
    return None


def _fused_from(bn: nn.modules.batchnorm._BatchNorm, router: nn.Module, masks: torch.Tensor, **options):
    ref = bn.weight if bn.weight is not None else bn.running_mean
    # The authors' sigma is the number of units zeroed: σ here is the fraction kept.
    sharing_ratio = getattr(router, "sharing_ratio", None)
    if sharing_ratio is None:
        sharing_ratio = float(masks.sum(1).float().mean()) / masks.shape[1]
    fused = _FUSED[type(bn)](
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
        device=masks.device, dtype=None if ref is None else ref.dtype,
        masks=masks, sharing_ratio=sharing_ratio, **options)
    state = {**bn.state_dict(), "masks": masks}
    if fused.task_stats:
        state.update(task_stats_from_shared(state, fused.num_tasks))
    fused.load_state_dict(state)
    fused.train(bn.training)
    fused.active_task = router.active_task
    return fused


def _is_relu(m: nn.Module) -> bool:
    return type(m) is nn.ReLU


def _matches(model: nn.Module):
    """Every ``(container, names, bn, router, masks)`` run to fuse, checked, in model order."""
    found = []
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        i = 0
        while i + 2 < len(names):
            a, b, c = (module._modules[n] for n in names[i:i + 3])
            router = c if _is_relu(b) else b if _is_relu(c) else None
            masks = _router_masks(router) if type(a) in _FUSED and router is not None else None
            if masks is None:
                i += 1
                continue
            if masks.shape[1] != a.num_features:
                raise ValueError(f"cannot fuse {names[i]}: BatchNorm has {a.num_features} "
                                 f"channels but the TaskRouter has {masks.shape[1]}")
            found.append((module, names[i:i + 3], a, router, masks))
            i += 3
    return found


def fuse(model: nn.Module, *, stats: str = "batch", backend: str = "auto", task_stats: bool = False) -> nn.Module:
    """Fuse every ``BatchNorm*d → ReLU → TaskRouter`` (or the authors' ``BatchNorm → TaskRouter →
    ReLU``) run inside ``nn.Sequential`` containers into one ``BNReLURoute*d``; the ReLU and the
    router become ``nn.Identity``. Weights, running stats, masks and the active task are kept, so
    outputs and gradients are unchanged. Works in place and returns ``model``.

    The router may be ours or the authors' released ``TaskRouter`` (any module with a ``[T, C]``
    ``_unit_mapping`` and ``active_task``): its masks become the bool buffer ``_unit_mapping != 0``,
    never trained. A BatchNorm shared by several runs (with the same masks) becomes one fused
    module shared the same way. All or nothing: every run is checked and every fused module built
    before the model is touched, so on an error the model is unchanged.
    ``task_stats=True`` gives the fused layers per-task statistics, each task's row starting from
    the BatchNorm's running statistics.
    """
    check_model(model)
    fused_of: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    plan = []
    for container, names, bn, router, masks in _matches(model):
        if id(bn) in fused_of:
            fused, first_masks = fused_of[id(bn)]
            if not torch.equal(first_masks, masks):
                raise ValueError(f"cannot fuse {names[0]}: this BatchNorm is shared by runs whose "
                                 f"routers have different masks")
        else:
            fused = _fused_from(bn, router, masks, stats=stats, backend=backend, task_stats=task_stats)
            fused_of[id(bn)] = (fused, masks)
        plan.append((container, names, fused))
    for container, names, fused in plan:
        container._modules[names[0]] = fused
        container._modules[names[1]] = nn.Identity()
        container._modules[names[2]] = nn.Identity()
    return model
