"""The op schemas, defined once, with their fake kernels and autograd registrations.

Each backend is a family of ``torch.library`` ops with one schema:

* ``taskrouting::<name>``        compiled kernels: C++ for the CPU, CUDA C++ (``csrc/``);
* ``taskrouting::triton_<name>`` Triton kernels (``taskrouting/ops/triton/``);

plus ``reference``, the pure-PyTorch path (``reference.py``) every kernel is checked against.
Fake kernels are registered here for both families; autograd too, except that the compiled
extension registers the native family's in C++ (same wiring, less overhead).
``bn_relu_route`` and ``bn_relu_route_backward`` are the fused one-pass ops; the stage ops
(``channel_stats`` -> combine -> ``normalize_relu_route``; backward: ``backward_reduce`` ->
combine -> ``backward_apply``) are the same math split where a multi-process all-reduce of the
per-channel sums would go.
"""
from __future__ import annotations

import torch

from . import extension
from .layout import empty_output
from .reference import bn_add_relu_route_backward_reference, bn_relu_route_backward_reference

__all__ = ["SCHEMAS", "ADD_SCHEMAS", "FAMILIES", "UPDATE_SCHEMA", "TASK_UPDATE_SCHEMA", "NATIVE_KERNELS",
           "NATIVE_ADD_KERNELS", "NATIVE_UPDATE", "NATIVE_TASK_UPDATE", "stats_dtype"]

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

# relu(batch_norm(x) + residual) * route: a ResNet block's tail. The forward is bn_relu_route's with
# the residual added before the ReLU; the backward gates on the saved output y (> 0 exactly where
# the pre-activation was and the sample is routed), so neither the residual nor a mask is kept.
ADD_SCHEMAS = {
    "bn_add_relu_route":
        "(Tensor x, Tensor residual, Tensor route, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_var, bool training, float eps, bool routed_stats, bool stats_all_channels)"
        " -> (Tensor y, Tensor mean, Tensor invstd, Tensor var, Tensor count)",
    "bn_add_relu_route_backward":
        "(Tensor grad_y, Tensor y, Tensor x, Tensor route, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor invstd, Tensor count, bool training, bool routed_stats, bool[4] output_mask)"
        " -> (Tensor grad_x, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)",
}

FAMILIES = {"native": "", "triton": "triton_"}

# The backward as differentiable PyTorch ops (the reference formula), run by both families'
# autograd instead of the kernels when grad mode is on during backward (create_graph=True).
ADD_DIFFERENTIABLE_BACKWARD_SCHEMA = (
    "bn_add_relu_route_backward_differentiable(Tensor grad_y, Tensor y, Tensor x, Tensor route, Tensor? weight, "
    "Tensor? bias, Tensor mean, Tensor invstd, bool training, float eps, bool routed_stats, bool[4] output_mask)"
    " -> (Tensor grad_x, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)")
DIFFERENTIABLE_BACKWARD_SCHEMA = (
    "bn_relu_route_backward_differentiable(Tensor grad_y, Tensor x, Tensor route, Tensor? weight, "
    "Tensor? bias, Tensor mean, Tensor invstd, bool training, float eps, bool routed_stats, bool[3] output_mask)"
    " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)")

# Shared by every backend: the running-stat update, in place, compiled for CPU and CUDA.
UPDATE_SCHEMA = ("update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
                 "Tensor var, Tensor count, float momentum) -> ()")

# A task's row of per-task statistics (nn/task_stats.py): its update factor computed from its batch
# count and the layer's (``momentum`` None: cumulative), the row updated, the counts advanced; in
# one call, with no host read on a GPU.
TASK_UPDATE_SCHEMA = ("update_task_running_stats(Tensor(a!) task_mean, Tensor(b!) task_var, Tensor(c!) task_count, "
                      "Tensor(d!) task_last, Tensor batches, int task, Tensor mean, Tensor var, Tensor count, "
                      "float? momentum) -> ()")


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- fake kernels
def _per_channel(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[1], dtype=stats_dtype(x))


def _fake_forward(x, route, weight, bias, running_mean, running_var, training, eps, routed_stats,
                  stats_all_channels):
    empty = x.new_empty(0 if not training else x.shape[1], dtype=stats_dtype(x))
    return (empty_output(x), _per_channel(x), _per_channel(x), empty, empty.clone())


def _fake_backward(grad_y, x, route, weight, bias, mean, invstd, count, training, routed_stats,
                   output_mask):
    def like(t, needed):
        return torch.empty_like(t) if (t is not None and needed) else x.new_empty(0)
    grad_x = empty_output(x) if output_mask[0] else x.new_empty(0)
    return grad_x, like(weight, output_mask[1]), like(bias, output_mask[2])


def _fake_add_forward(x, residual, route, *args):
    return _fake_forward(x, route, *args)


def _fake_add_backward(grad_y, y, x, route, weight, bias, mean, invstd, count, training, routed_stats,
                       output_mask):
    gx, gw, gb = _fake_backward(grad_y, x, route, weight, bias, mean, invstd, count, training, routed_stats,
                                [output_mask[0], output_mask[2], output_mask[3]])
    return gx, empty_output(x) if output_mask[1] else x.new_empty(0), gw, gb


def _fake_channel_stats(x, route, routed_stats, all_channels):
    return _per_channel(x), _per_channel(x), _per_channel(x)


def _fake_backward_reduce(grad_y, x, *args):
    return _per_channel(x), _per_channel(x)


_FAKES = {
    "bn_relu_route": _fake_forward,
    "bn_relu_route_backward": _fake_backward,
    "channel_stats": _fake_channel_stats,
    "normalize_relu_route": lambda x, *a: empty_output(x),
    "backward_reduce": _fake_backward_reduce,
    "backward_apply": lambda grad_y, x, *a: empty_output(x),
    "bn_add_relu_route": _fake_add_forward,
    "bn_add_relu_route_backward": _fake_add_backward,
}


# ----------------------------------------------------------------------------- autograd
def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        x, route, weight, bias, _, _, training, eps, routed_stats, _ = inputs
        _, mean, invstd, _, count = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # the statistics get no gradient: no zero tensors for them
        ctx.save_for_backward(x, route, weight, bias, mean, invstd, count)
        ctx.training, ctx.eps, ctx.routed_stats = training, eps, routed_stats

    def backward(ctx, grad_y, *unused):
        x, route, weight, bias, mean, invstd, count = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[2], bias is not None and need[3]]
        if not any(mask) or grad_y is None:
            return (None,) * 10
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            gx, gw, gb = torch.ops.taskrouting.bn_relu_route_backward_differentiable(
                grad_y, x, route, weight, bias, mean, invstd, ctx.training, ctx.eps, ctx.routed_stats, mask)
        else:
            gx, gw, gb = backward_op(grad_y, x, route, weight, bias, mean, invstd, count,
                                     ctx.training, ctx.routed_stats, mask)
        return (gx if mask[0] else None, None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None, None, None, None)

    return backward, setup_context


def _make_add_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        x, _, route, weight, bias, _, _, training, eps, routed_stats, _ = inputs
        y, mean, invstd, _, count = output
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, x, route, weight, bias, mean, invstd, count)  # y: the gate; no residual
        ctx.training, ctx.eps, ctx.routed_stats = training, eps, routed_stats

    def backward(ctx, grad_y, *unused):
        y, x, route, weight, bias, mean, invstd, count = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], weight is not None and need[3], bias is not None and need[4]]
        if not any(mask) or grad_y is None:
            return (None,) * 11
        if torch.is_grad_enabled():  # create_graph
            grads = torch.ops.taskrouting.bn_add_relu_route_backward_differentiable(
                grad_y, y, x, route, weight, bias, mean, invstd, ctx.training, ctx.eps, ctx.routed_stats, mask)
        else:
            grads = backward_op(grad_y, y, x, route, weight, bias, mean, invstd, count, ctx.training,
                                ctx.routed_stats, mask)
        gx, gr, gw, gb = (g if m else None for g, m in zip(grads, mask))
        return (gx, gr, None, gw, gb, None, None, None, None, None, None)

    return backward, setup_context


_LIB = torch.library.Library("taskrouting", "FRAGMENT")  # noqa: TOR901


def _define_family(prefix: str) -> None:
    for name, schema in {**SCHEMAS, **ADD_SCHEMAS}.items():
        _LIB.define(prefix + name + schema)
        torch.library.register_fake(f"taskrouting::{prefix}{name}", _FAKES[name], lib=_LIB)


def _register_autograd(prefix: str) -> None:
    """The Python autograd of a family's fused ops, unless the compiled extension registered them in C++
    (``csrc/bn_relu_route_autograd.cpp``, the same wiring without ~30 µs of Python a call)."""
    for op, make in (("bn_relu_route", _make_autograd), ("bn_add_relu_route", _make_add_autograd)):
        name = f"taskrouting::{prefix}{op}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd"):
            continue
        backward, setup_context = make(getattr(torch.ops.taskrouting, f"{prefix}{op}_backward").default)
        torch.library.register_autograd(name, backward, setup_context=setup_context, lib=_LIB)


for _prefix in FAMILIES.values():
    _define_family(_prefix)
_LIB.define(UPDATE_SCHEMA)
_LIB.define(DIFFERENTIABLE_BACKWARD_SCHEMA)
_LIB.impl("bn_relu_route_backward_differentiable", bn_relu_route_backward_reference, "CompositeImplicitAutograd")
_LIB.define(ADD_DIFFERENTIABLE_BACKWARD_SCHEMA)
_LIB.impl("bn_add_relu_route_backward_differentiable", bn_add_relu_route_backward_reference,
          "CompositeImplicitAutograd")
_LIB.define(TASK_UPDATE_SCHEMA)
torch.library.register_fake("taskrouting::update_running_stats", lambda *args: None, lib=_LIB)
torch.library.register_fake("taskrouting::update_task_running_stats", lambda *args: None, lib=_LIB)

extension.load()  # the compiled kernels (and their autograd) register against the schemas above
for _prefix in FAMILIES.values():
    _register_autograd(_prefix)
# Looked up once: dispatcher queries are not traceable by torch.compile.
NATIVE_KERNELS = {device_type: extension.has_kernel("bn_relu_route", torch.device(device_type))
                  for device_type in ("cpu", "cuda")}
NATIVE_UPDATE = {device_type: extension.has_kernel("update_running_stats", torch.device(device_type))
                 for device_type in ("cpu", "cuda")}
NATIVE_TASK_UPDATE = {device_type: extension.has_kernel("update_task_running_stats", torch.device(device_type))
                      for device_type in ("cpu", "cuda")}
NATIVE_ADD_KERNELS = {device_type: extension.has_kernel("bn_add_relu_route", torch.device(device_type))
                      for device_type in ("cpu", "cuda")}
