"""The backend registry: which kernels exist for a device, and which one "auto" picks."""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import extension
from .schemas import FAMILIES, NATIVE_KERNELS

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "register_backend", "available_backends", "resolve_backend",
           "family_op", "triton_interpreted"]

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def family_op(family: str, name: str):
    """The OpOverload ``taskrouting::<prefix><name>`` of a backend family."""
    if family == "triton" and not _TRITON_KERNELS:
        load_triton_kernels()
    return getattr(torch.ops.taskrouting, FAMILIES[family] + name).default


_TRITON_KERNELS: list = []


def load_triton_kernels():
    """Import the Triton kernels (registers the triton_ ops' implementations) on first use."""
    from .triton import ops as triton_ops
    _TRITON_KERNELS.append(triton_ops)


@dataclass(frozen=True)
class Backend:
    name: str
    family: str | None           # op family, None for the reference path
    available: Callable[[torch.device], bool]
    why_not: Callable[[torch.device], str]


def _native_available(device: torch.device) -> bool:
    return NATIVE_KERNELS.get(device.type, False)


def _native_why_not(kind: str) -> Callable[[torch.device], str]:
    def why(device):
        if not extension.loaded():
            return f"the compiled extension was not built ({extension.LOAD_ERROR})"
        if device.type != kind:
            return f"it runs on {kind} tensors, not {device.type}"
        return f"the extension was built without {kind.upper()} kernels"
    return why


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available(device: torch.device) -> bool:
    return TRITON_INSTALLED and (device.type == "cuda" or (device.type == "cpu" and triton_interpreted()))


def _triton_why_not(device):
    if device.type == "cpu" and not triton_interpreted():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"it runs on cuda tensors, not {device.type}"
    return "triton is not installed"


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", None, lambda d: True, lambda d: ""),
    "cpu": Backend("cpu", "native", lambda d: d.type == "cpu" and _native_available(d), _native_why_not("cpu")),
    "cuda": Backend("cuda", "native", lambda d: d.type == "cuda" and _native_available(d), _native_why_not("cuda")),
    "triton": Backend("triton", "triton", _triton_available, _triton_why_not),
}

# Fastest first, per device type (GPU order from benchmarks/bench_bn_relu_route.py).
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def register_backend(backend: Backend, auto_rank: dict[str, int] | None = None) -> None:
    """Add a backend (e.g. a new op family); ``auto_rank`` places it in the auto order per device."""
    BACKENDS[backend.name] = backend
    for device_type, rank in (auto_rank or {}).items():
        order = list(AUTO_ORDER.get(device_type, ("reference",)))
        order.insert(rank, backend.name)
        AUTO_ORDER[device_type] = tuple(order)


def available_backends(device="cpu") -> list[str]:
    device = torch.device(device)
    return [name for name, b in BACKENDS.items() if b.available(device)]


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that will run for ``x``: ``backend`` itself, or the fastest available for "auto"."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        if x.dtype == torch.float64 and x.device.type != "cpu":
            return "reference"
        for name in AUTO_ORDER.get(x.device.type, ("reference",)):
            if BACKENDS[name].available(x.device):
                if name == "reference" and x.device.type == "cpu":
                    extension.warn_not_built()
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
    chosen = BACKENDS[backend]
    if not chosen.available(x.device):
        raise RuntimeError(f"backend={backend!r} is not available for {x.device.type} tensors: "
                           f"{chosen.why_not(x.device)}")
    if x.dtype == torch.float64 and backend not in ("reference", "cpu"):
        raise TypeError(f"backend={backend!r} does not support float64 (use 'reference' or 'cpu')")
    return backend
