"""The one Python validator of the op's arguments (the C++ side re-checks in ``csrc/bn_relu_route_checks.h``)."""
from __future__ import annotations

import numbers

import torch

__all__ = ["check_inputs", "check_residual", "check_positive_int", "DTYPES"]


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_param(t, name: str, x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape [{x.shape[1]}] (one value per channel), got {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_inputs(x, masks, weight, bias, running_mean, running_var, training, momentum, eps, stats):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"x must have 2 to 5 dims [N, C, *], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not isinstance(masks, torch.Tensor) or masks.dim() != 2:
        raise ValueError("masks must be a bool Tensor [num_tasks, num_channels]")
    if masks.dtype != torch.bool:
        raise TypeError(f"masks must be a bool tensor, got dtype {masks.dtype}")
    if masks.shape[1] != x.shape[1]:
        raise ValueError(f"masks have {masks.shape[1]} channels but x has {x.shape[1]} (dim 1)")
    if masks.device != x.device:
        raise ValueError(f"masks are on {masks.device} but x is on {x.device}")
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        _check_param(t, name, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var")
    # Any real momentum, as nn.BatchNorm takes (PyTorch's own tests use -1.2); only NaN is meaningless.
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or momentum != momentum:
        raise ValueError(f"momentum must be a real number, got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if stats not in ("batch", "routed"):
        raise ValueError(f"stats must be 'batch' or 'routed', got {stats!r}")
    if masks.shape[0] < 1 or masks.shape[1] < 1:
        raise ValueError(f"masks must have at least one task and one channel, got {tuple(masks.shape)}")
    if training and x.numel() == x.shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)}")


def check_residual(residual, x) -> None:
    """The residual of ``bn_add_relu_route``: x's shape, dtype and device."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a Tensor, got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
