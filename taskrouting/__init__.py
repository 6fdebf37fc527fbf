"""taskrouting: Task Routing (Strezoski et al., ICCV 2019) for PyTorch, with a fused
BatchNorm + ReLU + route op (C++, CUDA and Triton kernels behind one torch.library op)."""
from . import models, ops
from .fuse import fuse
from .masks import make_masks
from .modules import BNReLURoute1d, BNReLURoute2d, BNReLURoute3d
from .router import TaskConditioned, TaskRouter, active_task, set_active_task
from .subnetwork import extract_subnetwork

__version__ = "0.1.0"

__all__ = ["make_masks", "TaskRouter", "TaskConditioned", "set_active_task", "active_task", "ops",
           "BNReLURoute1d", "BNReLURoute2d", "BNReLURoute3d", "fuse", "models",
           "extract_subnetwork"]
