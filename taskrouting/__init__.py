"""taskrouting: Task Routing (Strezoski et al., ICCV 2019) for PyTorch, with a fused
BatchNorm + ReLU + route op (C++, CUDA and Triton kernels behind one torch.library op).

Layers: ``ops`` (the op and its backends) <- ``nn`` (modules) <- ``models`` (routed networks)
<- ``training`` (the paper's experiments; needs the ``train`` extra) and ``data``.
"""
from . import models, nn, ops
from .models import extract_subnetwork
from .nn import (
    BNAddReLURoute2d,
    BNReLURoute1d,
    BNReLURoute2d,
    BNReLURoute3d,
    SyncBNReLURoute1d,
    SyncBNReLURoute2d,
    SyncBNReLURoute3d,
    TaskConditioned,
    TaskRouter,
    active_task,
    convert_sync_batchnorm,
    fuse,
    make_masks,
    set_active_task,
)

__version__ = "0.1.0"

__all__ = ["make_masks", "TaskRouter", "TaskConditioned", "set_active_task", "active_task", "ops", "nn",
           "BNReLURoute1d", "BNReLURoute2d", "BNReLURoute3d", "BNAddReLURoute2d", "fuse", "models",
           "extract_subnetwork", "SyncBNReLURoute1d", "SyncBNReLURoute2d", "SyncBNReLURoute3d",
           "convert_sync_batchnorm"]
