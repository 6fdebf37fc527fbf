"""Saved activations: the fused op's output recomputed in backward instead of kept, and a meter of
what a forward keeps for backward.

In a routed network each fused output y is the input of the next convolution (or max pool), which
saves it for its own backward, next to the fused op's saved input x. Within ``recompute_outputs()``
a saved tensor that is a fused output is replaced by a recipe: x (which the op keeps anyway), the
route and the per-channel mean and invstd it normalised with. Backward rebuilds y from them with the
backend's ``normalize_relu_route`` stage, one elementwise pass; a max pool of y (``RecomputableMaxPool2d``)
is rebuilt from y's recipe and the pool's indices, which the pool keeps anyway. ``saved_tensors_meter()`` counts the
bytes a forward keeps for backward (each storage once; parameters and views of them left out), through
these hooks too.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref

import torch

from .backends import family_op

__all__ = ["recompute_outputs", "recomputing", "note_output", "note_pooled", "saved_tensors_meter",
           "SavedTensorsMeter"]

_OUTPUTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("taskrouting_outputs", default=None)
_METER: contextvars.ContextVar[SavedTensorsMeter | None] = contextvars.ContextVar("taskrouting_meter",
                                                                                   default=None)


class SavedTensorsMeter:
    """Bytes of the distinct storages saved for backward (parameters left out), and of the outputs
    that ``recompute_outputs`` rebuilds instead of keeping."""

    def __init__(self):
        self._storages: dict[int, int] = {}
        self.recomputed_bytes = 0

    @property
    def saved_bytes(self) -> int:
        return sum(self._storages.values())

    def count(self, t: torch.Tensor) -> None:
        base = t if t._base is None else t._base
        if (base.is_leaf and base.requires_grad) or t.device.type == "meta":  # a parameter or a view of one
            return
        storage = t.untyped_storage()
        self._storages[storage.data_ptr()] = storage.nbytes()


def _count(t: torch.Tensor) -> None:
    meter = _METER.get()
    if meter is not None:
        meter.count(t)


@contextlib.contextmanager
def saved_tensors_meter():
    """``with saved_tensors_meter() as meter:`` a forward; then ``meter.saved_bytes``."""
    meter = SavedTensorsMeter()
    token = _METER.set(meter)

    def pack(t):
        _count(t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield meter
    finally:
        _METER.reset(token)


class _Recipe:
    """How to rebuild a fused output in backward, and the versions its inputs had in forward."""

    def __init__(self, y, family, x, route, mean, invstd, weight, bias):
        self.family, self.args = family, (x, route, mean, invstd, weight, bias)
        self.versions = [t._version for t in self.args if t is not None]
        self.layout = (y.shape, y.stride(), y.dtype)

    def rebuild(self) -> torch.Tensor:
        if [t._version for t in self.args if t is not None] != self.versions:
            raise RuntimeError("memory_efficient: an input of a fused routed BatchNorm (its x, weight or bias) was "
                               "modified in place between forward and backward, so its output cannot be recomputed")
        with torch.no_grad():
            normalize = family_op(self.family, "normalize_relu_route")
            y = normalize(*(t.detach() if t is not None else None for t in self.args))
        if (y.shape, y.stride(), y.dtype) != self.layout:
            y = torch.empty_strided(self.layout[0], self.layout[1], dtype=self.layout[2],
                                    device=y.device).copy_(y)
        return y


class _Gathered:
    """A max pool of a recomputable output, rebuilt from that output's recipe and the pool's indices."""

    def __init__(self, source, indices, out):
        self.source, self.indices = source, indices
        self.layout = (out.shape, out.stride(), out.dtype)

    def rebuild(self) -> torch.Tensor:
        y = self.source.rebuild()
        flat = self.indices.flatten(2)
        out = y.flatten(2).gather(2, flat).view(self.indices.shape)
        return torch.empty_strided(self.layout[0], self.layout[1], dtype=self.layout[2],
                                   device=out.device).copy_(out)


def _active_outputs() -> dict | None:
    # Under torch.compile nothing is noted: dynamo cannot trace a ContextVar, and a compiled graph
    # keeps its own choice of saved tensors.
    return None if torch.compiler.is_compiling() else _OUTPUTS.get()


def _noted(outputs: dict, t: torch.Tensor):
    entry = outputs.get(id(t))
    return entry[1] if entry is not None and entry[0]() is t else None


def note_pooled(out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> None:
    """Within ``recompute_outputs``: ``out``, a 2-d max pool of a noted output ``x`` with ``indices``
    (``F.max_pool2d(..., return_indices=True)``), may be rebuilt in backward as ``x``'s gather."""
    outputs = _active_outputs()
    source = None if outputs is None or not torch.is_grad_enabled() else _noted(outputs, x)
    if source is not None:
        outputs[id(out)] = (weakref.ref(out), _Gathered(source, indices, out))


def recomputing() -> bool:
    """Whether a ``recompute_outputs`` context is active (layers then note what they can rebuild)."""
    return _active_outputs() is not None


def note_output(y, family, x, route, mean, invstd, weight, bias) -> None:
    """Within ``recompute_outputs``: ``y``, the output of backend ``family``'s fused op, may be rebuilt
    in backward (its ``normalize_relu_route(x, route, mean, invstd, weight, bias)``) instead of kept."""
    outputs = _active_outputs()
    if outputs is not None and torch.is_grad_enabled():
        outputs[id(y)] = (weakref.ref(y), _Recipe(y, family, x, route, mean.detach(), invstd.detach(),
                                                  weight, bias))


@contextlib.contextmanager
def recompute_outputs():
    """Within: fused outputs saved by later ops are rebuilt in backward (module docstring)."""
    outputs: dict = {}
    token = _OUTPUTS.set(outputs)

    def pack(t):
        recipe = _noted(outputs, t)
        if recipe is not None:
            meter = _METER.get()
            if meter is not None:
                meter.recomputed_bytes += t.untyped_storage().nbytes()
            return recipe
        _count(t)
        return t

    def unpack(packed):
        return packed.rebuild() if isinstance(packed, (_Recipe, _Gathered)) else packed

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _OUTPUTS.reset(token)
        outputs.clear()
