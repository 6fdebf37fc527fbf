"""Bytes the op must move: the least memory traffic of BatchNorm + ReLU + route, per mode.

Achieved bandwidth is ``op_bytes / time``, reported as a fraction of the bandwidth of a plain
tensor copy (``y.copy_(x)``, which reads and writes every element once) measured in the same run.
Every variant of a case (fused, eager, compiled) is held to the same count: the traffic the
routed op cannot avoid, so a variant that moves more than it must shows a lower fraction.

Units: ``E`` = bytes of one activation tensor (``x.numel() * x.element_size()``),
``a`` = active fraction, the fraction of channels used by at least one sample of the batch
(``k / C`` with ``k = round(σ C)`` channels per task, one task per batch).

Forward, training, ``stats="batch"`` with running stats tracked (nn.BatchNorm's default):
    read every channel once for the statistics (masked channels too: their running stats are
    updated as nn.BatchNorm does), read the active channels again to normalize, write the
    whole output (masked channels are written as zeros)              → ``(1 + a + 1) E``
Forward, training, ``stats="routed"`` or no running stats:
    statistics of the active channels only                           → ``(a + a + 1) E``
Forward, eval (running stats): read the active channels, write all   → ``(a + 1) E``
Backward, training: read ``grad_y`` and ``x`` of the active channels for the per-channel
    reductions (sum dy, sum dy·x̂), read them again for ``grad_x``, write the whole
    ``grad_x`` (zeros for masked channels)                           → ``(2a + 2a + 1) E``
Backward, eval: ``grad_x`` needs no batch reduction, so one pass reads ``grad_y`` and ``x``
    of the active channels, accumulates grad_weight/grad_bias and writes ``grad_x`` → ``(2a + 1) E``
Forward + backward: the sum of the two.

This counts what the op must *touch*; a kernel that re-reads a channel while it is still in
cache (e.g. statistics then normalization of one channel at a time) takes fewer trips to DRAM,
so its fraction of the copy bandwidth can exceed 100 %: that is cache reuse, not an error.

The plain BatchNorm → ReLU (no routing) case is counted with ``a = 1``. Per-channel
parameters, statistics and masks (``O(C)`` bytes) are left out: about 1 % of the traffic for
the smallest default shape (16x512x7x7), far less for the others.
"""
from __future__ import annotations

import math

from .cases import Case, Shape

__all__ = ["tensor_bytes", "forward_units", "backward_units", "op_bytes", "copy_bytes"]


def tensor_bytes(shape: Shape, itemsize: int) -> int:
    return math.prod(shape) * itemsize


def forward_units(active: float, training: bool, stats: str = "batch", tracks_running_stats: bool = True) -> float:
    """Forward traffic in units of one activation tensor."""
    if not training:
        return active + 1
    stats_read = 1.0 if (stats == "batch" and tracks_running_stats) else active
    return stats_read + active + 1


def backward_units(active: float, training: bool) -> float:
    """Backward traffic in units of one activation tensor."""
    return 4 * active + 1 if training else 2 * active + 1


def op_bytes(case: Case, active: float, tracks_running_stats: bool = True) -> int:
    """Bytes a call of ``case`` must move (forward, plus backward for ``*-fwdbwd`` modes)."""
    units = forward_units(active, case.training, case.stats, tracks_running_stats)
    if case.backward:
        units += backward_units(active, case.training)
    return round(units * tensor_bytes(case.shape, case.torch_dtype.itemsize))


def copy_bytes(shape: Shape, itemsize: int) -> int:
    """``y.copy_(x)``: read x, write y."""
    return 2 * tensor_bytes(shape, itemsize)
