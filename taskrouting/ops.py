"""The fused BatchNorm + ReLU + route op: schemas, fake and autograd registrations, backends.

Each backend is a family of ``torch.library`` ops with one schema (defined here, once):

* ``taskrouting::<name>``        compiled kernels: C++ for the CPU, CUDA C++ (``csrc/``);
* ``taskrouting::triton_<name>`` Triton kernels (``taskrouting/triton_bn_relu_route.py``);

plus ``reference``, the pure-PyTorch path (``taskrouting/reference.py``) every kernel is
checked against. Fake kernels are registered here for both families; autograd too, except that
the compiled extension registers the native family's in C++ (same wiring, less overhead).
``bn_relu_route`` and ``bn_relu_route_backward`` are the fused one-pass ops; the stage ops
(``channel_stats`` → combine → ``normalize_relu_route``; backward: ``backward_reduce`` →
combine → ``backward_apply``) are the same math split where a multi-process all-reduce of the
per-channel sums would go.
"""
from __future__ import annotations

import importlib.util
import numbers
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension
from .masks import select_route
from .reference import bn_relu_route_reference, update_running_stats

__all__ = ["bn_relu_route", "bn_relu_route_on", "check_inputs", "available_backends", "resolve_backend", "BACKENDS", "SCHEMAS",
           "register_backend", "combine_stats"]

# Statistics are float32 (float64 for float64 input); route is bool [C] or [N, C].
# In eval (training=False) `var` and `count` are empty and `mean`/`invstd` come from the running stats.
SCHEMAS = {
    "bn_relu_route":
        "(Tensor x, Tensor route, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_var, bool training, float eps, bool routed_stats, bool stats_all_channels)"
        " -> (Tensor y, Tensor mean, Tensor invstd, Tensor var, Tensor count)",
    "bn_relu_route_backward":
        "(Tensor grad_y, Tensor x, Tensor route, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor invstd, Tensor count, bool training, bool routed_stats, bool[3] output_mask)"
        " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)",
    "channel_stats":
        "(Tensor x, Tensor route, bool routed_stats, bool all_channels)"
        " -> (Tensor mean, Tensor var, Tensor count)",
    "normalize_relu_route":
        "(Tensor x, Tensor route, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias) -> Tensor",
    "backward_reduce":
        "(Tensor grad_y, Tensor x, Tensor route, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? bias) -> (Tensor sum_dy, Tensor sum_dy_xmu)",
    "backward_apply":
        "(Tensor grad_y, Tensor x, Tensor route, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? bias, Tensor sum_dy, Tensor sum_dy_xmu, Tensor count, bool training, "
        "bool routed_stats) -> Tensor",
}

FAMILIES = {"native": "", "triton": "triton_"}

# Shared by every backend: the running-stat update, in place, compiled for CPU and CUDA.
UPDATE_SCHEMA = ("update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
                 "Tensor var, Tensor count, float momentum) -> ()")


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- fake kernels
def _per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[1], dtype=stats_dtype(x))


def _fake_forward(x, route, weight, bias, running_mean, running_var, training, eps, routed_stats,
                  stats_all_channels):
    empty = x.new_empty(0 if not training else x.shape[1], dtype=stats_dtype(x))
    return (torch.empty_like(x), _per_channel(x), _per_channel(x), empty, empty.clone())


def _fake_backward(grad_y, x, route, weight, bias, mean, invstd, count, training, routed_stats,
                   output_mask):
    def like(t, needed):
        return torch.empty_like(t) if (t is not None and needed) else x.new_empty(0)
    return like(x, output_mask[0]), like(weight, output_mask[1]), like(bias, output_mask[2])


def _fake_channel_stats(x, route, routed_stats, all_channels):
    return _per_channel(x), _per_channel(x), _per_channel(x)


def _fake_like_x(x, *args):
    return torch.empty_like(x)


def _fake_backward_reduce(grad_y, x, *args):
    return _per_channel(x), _per_channel(x)


_FAKES = {
    "bn_relu_route": _fake_forward,
    "bn_relu_route_backward": _fake_backward,
    "channel_stats": _fake_channel_stats,
    "normalize_relu_route": lambda x, *a: torch.empty_like(x),
    "backward_reduce": _fake_backward_reduce,
    "backward_apply": lambda grad_y, x, *a: torch.empty_like(x),
}


# ----------------------------------------------------------------------------- autograd
def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        x, route, weight, bias, _, _, training, _, routed_stats, _ = inputs
        _, mean, invstd, _, count = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(x, route, weight, bias, mean, invstd, count)
        ctx.training, ctx.routed_stats = training, routed_stats

    def backward(ctx, grad_y, *unused):
        x, route, weight, bias, mean, invstd, count = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[2], bias is not None and need[3]]
        if not any(mask) or grad_y is None:
            return (None,) * 10
        gx, gw, gb = backward_op(grad_y, x, route, weight, bias, mean, invstd, count,
                                 ctx.training, ctx.routed_stats, mask)
        return (gx if mask[0] else None, None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None, None, None, None)

    return backward, setup_context


_LIB = torch.library.Library("taskrouting", "FRAGMENT")  # noqa: TOR901


def _define_family(prefix: str) -> None:
    for name, schema in SCHEMAS.items():
        _LIB.define(prefix + name + schema)
        torch.library.register_fake(f"taskrouting::{prefix}{name}", _FAKES[name], lib=_LIB)


def _register_autograd(prefix: str) -> None:
    """The Python autograd of a family, unless the compiled extension registered one in C++
    (``csrc/bn_relu_route_autograd.cpp``, the same wiring without ~30 µs of Python a call)."""
    name = f"taskrouting::{prefix}bn_relu_route"
    if torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd"):
        return
    backward_op = getattr(torch.ops.taskrouting, prefix + "bn_relu_route_backward").default
    backward, setup_context = _make_autograd(backward_op)
    torch.library.register_autograd(name, backward, setup_context=setup_context, lib=_LIB)


for _prefix in FAMILIES.values():
    _define_family(_prefix)
_LIB.define(UPDATE_SCHEMA)
torch.library.register_fake("taskrouting::update_running_stats", lambda *args: None, lib=_LIB)

_extension.load()  # the compiled kernels (and their autograd) register against the schemas above
for _prefix in FAMILIES.values():
    _register_autograd(_prefix)
# Looked up once: dispatcher queries are not traceable by torch.compile.
NATIVE_KERNELS = {device_type: _extension.has_kernel("bn_relu_route", torch.device(device_type))
                  for device_type in ("cpu", "cuda")}
NATIVE_UPDATE = {device_type: _extension.has_kernel("update_running_stats", torch.device(device_type))
                 for device_type in ("cpu", "cuda")}


def _update_running_stats(running_mean, running_var, mean, var, count, momentum: float) -> None:
    """One compiled kernel where there is one (a handful of tiny eager ops cost ~25 µs), else PyTorch."""
    if NATIVE_UPDATE.get(running_mean.device.type, False) and running_mean.is_contiguous() \
            and running_var.is_contiguous():
        torch.ops.taskrouting.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def family_op(family: str, name: str):
    """The OpOverload ``taskrouting::<prefix><name>`` of a backend family."""
    if family == "triton" and not _TRITON_KERNELS:
        load_triton_kernels()
    return getattr(torch.ops.taskrouting, FAMILIES[family] + name).default


_TRITON_KERNELS: list = []


def load_triton_kernels():
    """Import the Triton kernels (registers the triton_ ops' implementations) on first use."""
    from . import triton_bn_relu_route
    _TRITON_KERNELS.append(triton_bn_relu_route)


# ----------------------------------------------------------------------------- backends
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
        if not _extension.loaded():
            return f"the compiled extension was not built ({_extension.LOAD_ERROR})"
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
                    _extension.warn_not_built()
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


# ----------------------------------------------------------------------------- checks
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_param(t, name: str, x: torch.Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if t.shape != (x.shape[1],):
        raise ValueError(f"{name} must have shape [{x.shape[1]}] (one value per channel), got {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_inputs(x, masks, weight, bias, running_mean, running_var, training, momentum, eps, stats):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if not 2 <= x.dim() <= 5:
        raise ValueError(f"x must have 2 to 5 dims [N, C, *], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
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
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if stats not in ("batch", "routed"):
        raise ValueError(f"stats must be 'batch' or 'routed', got {stats!r}")
    if masks.shape[0] < 1 or masks.shape[1] < 1:
        raise ValueError(f"masks must have at least one task and one channel, got {tuple(masks.shape)}")
    if training and x.numel() == x.shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{tuple(x.shape)}")


# ----------------------------------------------------------------------------- the op
def bn_relu_route(x: torch.Tensor, masks: torch.Tensor, task, weight=None, bias=None,
                  running_mean=None, running_var=None, training: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, stats: str = "batch",
                  backend: str = "auto") -> torch.Tensor:
    """``relu(batch_norm(x)) * masks[task]`` in one pass, skipping channels no sample uses.

    ``task``: an int (one task for the batch) or a LongTensor ``[N]`` (one per sample).
    ``training=True`` normalizes with batch statistics and, if running stats are given,
    updates them in place with factor ``momentum`` (like ``F.batch_norm``).
    ``stats="routed"`` computes each channel's statistics over its routed samples only.
    """
    check_inputs(x, masks, weight, bias, running_mean, running_var, training, momentum, eps, stats)
    route = select_route(masks, task, x.shape[0], x.device)
    return bn_relu_route_on(x, route, weight, bias, running_mean, running_var, training, momentum, eps, stats,
                            backend)


def bn_relu_route_on(x, route, weight, bias, running_mean, running_var, training, momentum, eps, stats,
                     backend):
    """``bn_relu_route`` on an already selected ``route`` (bool [C] or [N, C]) and checked inputs."""
    name = resolve_backend(backend, x)
    routed = stats == "routed"
    if name == "reference":
        return bn_relu_route_reference(x, route, weight, bias, running_mean, running_var,
                                       training, momentum, eps, routed)
    forward = family_op(BACKENDS[name].family, "bn_relu_route")
    track = training and running_mean is not None
    y, mean, _, var, count = forward(x, route, weight, bias, running_mean, running_var, training,
                                     float(eps), routed, track and not routed)
    if track:
        _update_running_stats(running_mean, running_var, mean, var, count, float(momentum))
    return y


def combine_stats(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor):
    """Merge per-process channel statistics ``[P, C]`` (Chan et al.) into ``[C]`` mean, var, count."""
    total = count.sum(0)
    safe = total.clamp_min(1)
    merged_mean = (mean * count).sum(0) / safe
    m2 = (var * count).sum(0) + ((mean - merged_mean).square() * count).sum(0)
    return merged_mean, m2 / safe, total
