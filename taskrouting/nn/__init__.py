"""The modules users put in their models: masks, the reference ``TaskRouter``, the fused
``BNReLURoute*d`` layers and ``BNAddReLURoute2d`` (a ResNet block's tail), the task switch, and ``fuse``
to convert an existing model."""
from .bn_relu_route import BNAddReLURoute2d, BNReLURoute1d, BNReLURoute2d, BNReLURoute3d
from .convert import convert_sync_batchnorm
from .fuse import fuse
from .masks import check_masks, make_masks
from .router import TaskConditioned, TaskRouter, active_task, set_active_task
from .sync_bn_relu_route import SyncBNAddReLURoute2d, SyncBNReLURoute1d, SyncBNReLURoute2d, SyncBNReLURoute3d
from .sync_task_batch_norm import SyncTaskBatchNorm2d
from .task_batch_norm import TaskBatchNorm2d

__all__ = ["make_masks", "check_masks", "TaskRouter", "TaskConditioned", "set_active_task", "active_task",
           "BNReLURoute1d", "BNReLURoute2d", "BNReLURoute3d", "BNAddReLURoute2d", "fuse", "SyncBNReLURoute1d",
           "SyncBNReLURoute2d", "SyncBNReLURoute3d", "SyncBNAddReLURoute2d", "convert_sync_batchnorm",
           "TaskBatchNorm2d", "SyncTaskBatchNorm2d"]
