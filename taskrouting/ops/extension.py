"""Loads the compiled kernels (``taskrouting._C``) if they were built, and says once if not."""
from __future__ import annotations

import importlib
import warnings

import torch

LOAD_ERROR: str | None = "not loaded yet"
_C = None
_warned = False


def load() -> None:
    """Import ``taskrouting._C``; its kernels register against the schemas defined in ops.py."""
    global _C, LOAD_ERROR
    try:
        _C = importlib.import_module("taskrouting._C")
        LOAD_ERROR = None
    except ImportError as exc:  # the package still works through the reference path
        LOAD_ERROR = str(exc)


def loaded() -> bool:
    return _C is not None


def warn_not_built() -> None:
    """Warn once that the compiled kernels are missing and the reference path is used."""
    global _warned
    if not _warned and LOAD_ERROR is not None:
        _warned = True
        warnings.warn(f"taskrouting: the compiled kernels (taskrouting._C) are not available "
                      f"({LOAD_ERROR}); using the pure-PyTorch reference path. Build them with "
                      f"`pip install --no-build-isolation .`", RuntimeWarning, stacklevel=4)


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether ``taskrouting::<op>`` has a kernel registered for ``device``'s dispatch key."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"taskrouting::{op}", key)
