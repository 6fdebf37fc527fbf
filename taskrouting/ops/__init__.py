"""The fused BatchNorm + ReLU + route op and its backends.

``schemas`` defines the ``torch.library`` ops once (fake kernels, autograd); ``backends`` says which
kernels run where; ``checks`` and ``route`` validate arguments and pick each sample's channels;
``bn_relu_route`` is the entry point users call (``bn_add_relu_route``: the same with a residual added before the
ReLU, a ResNet block's tail); ``reference`` is the pure-PyTorch ground truth;
``extension`` loads the compiled C++/CUDA kernels (``csrc/``); ``triton/`` holds the Triton kernels.
"""
from . import schemas  # noqa: F401  (defines the ops before anything registers kernels against them)
from .backends import (
    AUTO_ORDER,
    BACKENDS,
    Backend,
    available_backends,
    family_op,
    register_backend,
    resolve_backend,
    triton_interpreted,
)
from .bn_add_relu_route import bn_add_relu_route
from .bn_relu_route import bn_relu_route, bn_relu_route_on, combine_stats
from .checks import check_inputs, check_residual
from .route import check_task_ids, select_route
from .schemas import FAMILIES, NATIVE_KERNELS, SCHEMAS

__all__ = ["bn_relu_route", "bn_relu_route_on", "bn_add_relu_route", "combine_stats",
           "check_inputs", "check_residual", "check_task_ids", "select_route", "available_backends",
           "resolve_backend", "register_backend", "family_op", "triton_interpreted", "Backend", "BACKENDS",
           "AUTO_ORDER", "SCHEMAS", "FAMILIES", "NATIVE_KERNELS"]
