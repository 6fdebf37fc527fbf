"""convert_sync_batchnorm: a model's BatchNorm layers, routed ones included, synchronised over a process group."""
from __future__ import annotations

import copy

from torch import nn

from .bn_relu_route import BNAddReLURoute2d, BNReLURoute1d, BNReLURoute2d, BNReLURoute3d
from .router import TaskConditioned
from .sync_bn_relu_route import SyncBNAddReLURoute2d, SyncBNReLURoute1d, SyncBNReLURoute2d, SyncBNReLURoute3d
from .sync_task_batch_norm import SyncTaskBatchNorm2d
from .task_batch_norm import TaskBatchNorm2d

__all__ = ["convert_sync_batchnorm"]

_SYNC = {BNReLURoute1d: SyncBNReLURoute1d, BNReLURoute2d: SyncBNReLURoute2d, BNReLURoute3d: SyncBNReLURoute3d,
         BNAddReLURoute2d: SyncBNAddReLURoute2d, TaskBatchNorm2d: SyncTaskBatchNorm2d}


def _synced(layer: nn.Module, process_group) -> nn.Module:
    """The same layer (the same Parameter and buffer objects, attributes, mode) as its sync class."""
    sync = copy.copy(layer)
    sync.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in layer.__dict__.items()}
    sync.__class__ = _SYNC[type(layer)]
    sync.process_group = process_group
    return sync


def _check_convertible(module: nn.Module) -> None:
    for m in module.modules():
        if type(m) not in _SYNC and isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(m, TaskConditioned):
            # nn.SyncBatchNorm's converter would replace it by a plain SyncBatchNorm, dropping the routing.
            raise TypeError(f"convert_sync_batchnorm cannot synchronise {type(m).__name__}, a routed BatchNorm "
                            f"subclass it does not know; use the fused BNReLURoute*d layers (taskrouting.nn.fuse)")


def _convert(module: nn.Module, process_group) -> nn.Module:
    if type(module) in _SYNC:
        return _synced(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        converted = _convert(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``BNReLURoute*d`` (``BNAddReLURoute2d``, ``TaskBatchNorm2d``) by ``SyncBNReLURoute*d``
    (``SyncBNAddReLURoute2d``, ``SyncTaskBatchNorm2d``: these run on CPU and CUDA) and every other BatchNorm by
    ``nn.SyncBatchNorm`` (PyTorch's converter; GPU only), sharing parameters and buffers,
    over ``process_group`` (the default group when None). Returns the converted module (a new one if ``module``
    itself is a BatchNorm layer), in place otherwise, like ``nn.SyncBatchNorm.convert_sync_batchnorm``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    _check_convertible(module)  # before any change, so that a rejected call leaves the model as it was
    return _convert(module, process_group)
