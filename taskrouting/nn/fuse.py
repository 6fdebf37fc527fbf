"""fuse(): replace BatchNorm → ReLU → TaskRouter runs in a model with one fused layer."""
from __future__ import annotations

from torch import nn

from .bn_relu_route import BNReLURoute1d, BNReLURoute2d, BNReLURoute3d
from .router import TaskRouter, check_model

__all__ = ["fuse"]

_FUSED = {nn.BatchNorm1d: BNReLURoute1d, nn.BatchNorm2d: BNReLURoute2d, nn.BatchNorm3d: BNReLURoute3d}


def _fused_from(bn: nn.modules.batchnorm._BatchNorm, router: TaskRouter, **options):
    ref = bn.weight if bn.weight is not None else bn.running_mean
    fused = _FUSED[type(bn)](
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
        device=router.masks.device, dtype=None if ref is None else ref.dtype,
        masks=router.masks, sharing_ratio=router.sharing_ratio, **options)
    fused.load_state_dict({**bn.state_dict(), "masks": router.masks})
    fused.train(bn.training)
    fused.active_task = router.active_task
    return fused


def _is_relu(m: nn.Module) -> bool:
    return type(m) is nn.ReLU


def fuse(model: nn.Module, *, stats: str = "batch", backend: str = "auto") -> nn.Module:
    """Fuse every ``BatchNorm*d → ReLU → TaskRouter`` (or the authors' ``BatchNorm → TaskRouter →
    ReLU``) run inside ``nn.Sequential`` containers into one ``BNReLURoute*d``; the ReLU and the
    router become ``nn.Identity``. Weights, running stats, masks and the active task are kept, so
    outputs and gradients are unchanged. Works in place and returns ``model``.
    """
    check_model(model)
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        i = 0
        while i + 2 < len(names):
            a, b, c = (module._modules[n] for n in names[i:i + 3])
            if type(a) in _FUSED and ((_is_relu(b) and isinstance(c, TaskRouter))
                                      or (isinstance(b, TaskRouter) and _is_relu(c))):
                router = c if isinstance(c, TaskRouter) else b
                if router.num_channels != a.num_features:
                    raise ValueError(f"cannot fuse {names[i]}: BatchNorm has {a.num_features} "
                                     f"channels but the TaskRouter has {router.num_channels}")
                module._modules[names[i]] = _fused_from(a, router, stats=stats, backend=backend)
                module._modules[names[i + 1]] = nn.Identity()
                module._modules[names[i + 2]] = nn.Identity()
                i += 3
            else:
                i += 1
    return model
