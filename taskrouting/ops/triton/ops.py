"""Triton backend: launches for the ``taskrouting::triton_<name>`` ops (schemas in ``ops/schemas.py``).

Imported lazily by ``ops/backends.py`` on first use; raises ImportError when triton is missing.
Registers one implementation per op for the ``CUDA`` and ``CPU`` dispatch keys. CPU tensors
always run through the Triton interpreter (``ops/backends.py`` offers them only under
``TRITON_INTERPRET=1``); CUDA tensors run compiled kernels, or interpreted ones when
``TRITON_INTERPRET=1`` is set at call time (see ``__init__.py`` beside this file for why the
kernels are loaded per mode rather than once at import).

Layouts. ``x`` ``[N, C, *]`` is handled natively as NCHW-contiguous (HW contiguous) or
channels_last / channels_last_3d (C contiguous; also ``[N, C]`` and any input with HW = 1);
any other layout is copied once to contiguous (``ops/layout.py``). Outputs are allocated like
that kernel input, which is what the fake kernels return (``layout.empty_output``): no copy back
into x's own layout. ``grad_y`` is used as is when it has x's layout, else copied once into it.

Launch plan (per op call; all launches of one op go to the current stream):

* single tile (``Config.fuse_max``): when ``pow2(N)·pow2(HW)·BC`` fits a register tile, one
  program per channel block reduces *and* applies with the data on-chip:
  forward training = 1 launch, backward = 1 launch, x / grad_y read once.
* split (otherwise): grid ``(channel blocks, P chunks)`` with ``P`` sized so that about
  ``4 × SMs`` programs run (so few channels with many pixels still fill the GPU). Chunk partials
  (Welford count/mean/M2, or the two gradient sums) go to an fp32 workspace ``[k, P, C]``; the
  apply kernel of the next launch merges them itself (Chan's formula in fp32) -- forward
  training = 2 launches (stats, normalize), backward training = 2 (reduce, apply); eval forward
  = 1 launch; eval backward = 1 (+1 tiny merge when P > 1 and weight/bias grads are needed).
  Batch statistics without running stats on a per-sample route add one tiny ``route.any(0)``.

HBM traffic (x-sized passes; masked (sample, channel) planes are neither read nor, except
for the zeros of y / grad_x, written): one-pass forward 1 read + 1 write, split forward 2 reads
+ 1 write, eval forward 1 + 1; one-pass backward 2 reads (x, grad_y) + 1 write, split training
backward 4 reads + 1 write, eval backward 2 + 1. Per-channel statistics and partials are
``O(P·C)`` floats.

``bn_add_relu_route`` runs the same launches with the residual added in the apply
(``HAS_RESIDUAL``) and a backward gated on the saved ``y`` (``GATE_Y``) that also writes
``grad_residual``: forward one-pass 2 reads (x, residual) + 1 write, split 3 + 1, eval 2 + 1;
backward one-pass 3 reads (x, grad_y, y) + 2 writes; split training: the reduce pass reads x,
grad_y, y and writes ``grad_residual = g``, the apply pass reads x and that g (``GATE_GIVEN``,
when grad_y has x's dtype, so g reads back exactly) and writes grad_x: 5 reads + 2 writes; eval
3 + 2 with weight / bias grads, else 2 + 2 (x is not read); ``grad_residual`` alone 2 + 1.

The ``Config`` objects (``COMPILED``, ``INTERPRETED``) may be changed at run time, e.g. by the
tests to force the split path with several chunks.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton  # noqa: F401  (an ImportError here: the backend is unavailable)

from ..layout import kernel_input
from . import kernels

GATE_PRE, GATE_Y, GATE_GIVEN = 0, 1, 2  # backward.py's GATE: pre-activation, saved y, g given

__all__ = ["Config", "COMPILED", "INTERPRETED", "config_for"]

_INT32_LIMIT = 2 ** 31 - 1
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_F32 = torch.float32


@dataclass
class Config:
    """Launch heuristics (no autotuning: the same plan under the interpreter and on a GPU)."""
    tile: int = 2048        # elements of one loop-iteration tile in the split kernels
    fuse_max: int = 8192    # largest single register tile (whole channel block) of the one-pass path
    block_c: int = 64       # channels per program in channels_last
    min_block_c: int = 8    # channels_last one-pass needs at least this many channels per row run
    programs: int = 0       # target programs of a split reduction (0: 4 × SM count)
    max_chunks: int = 256   # upper bound of P (each apply program merges P partials)
    block_pp: int = 64      # partials merged per iteration


COMPILED = Config()
INTERPRETED = Config(tile=4096, programs=1, fuse_max=16384)  # each interpreted program costs ~ms: few, large


def _interpret(device: torch.device) -> bool:
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def config_for(device) -> Config:
    return INTERPRETED if _interpret(torch.device(device)) else COMPILED


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _warps(elems: int, per_thread: int) -> int:
    """num_warps giving about ``per_thread`` elements per thread (sm_90 cubins checked: no spills,
    <= ~100 registers, for the split tiles at 8 and the one-pass tiles up to 8192 at 16)."""
    return max(4, min(16, elems // (32 * per_thread)))


# ----------------------------------------------------------------------------- layouts
def _in_layout(t: torch.Tensor, cl: bool) -> bool:
    """Whether ``t`` is dense in the kernel layout (``cl``: C innermost; else NCHW-contiguous)."""
    return t.movedim(1, -1).is_contiguous() if cl else t.is_contiguous()


def _kernel_layout(x: torch.Tensor):
    """``(xk, cl)``: x itself when it is NCHW-contiguous or channels-last dense, else a copy."""
    xk = kernel_input(x)
    # [N, C] and HW = 1: channels are the contiguous dim
    return xk, not xk.is_contiguous() or math.prod(x.shape[2:]) == 1


@dataclass
class _Plan:
    BN: int
    BP: int
    BC: int
    Tp: int
    T: int
    TPC: int
    P: int
    CB: int
    big: bool
    warps: int
    block_pp: int = 1


class _Problem:
    """Geometry, layout, route and kernels of one op call on ``x``."""

    def __init__(self, x: torch.Tensor, route: torch.Tensor, op: str):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: x must be a Tensor, got {type(x).__name__}")
        if not 2 <= x.dim() <= 5:
            raise ValueError(f"{op}: x must have 2 to 5 dims [N, C, *], got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{op}: the Triton kernels take float32, float16 or bfloat16 x, got {x.dtype}")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: x must be a cuda tensor (or cpu, interpreted), got {x.device}")
        self.op = op
        self.device = x.device
        self.N, self.C = int(x.shape[0]), int(x.shape[1])
        self.HW = math.prod(int(s) for s in x.shape[2:])
        if self.C < 1:
            raise ValueError(f"{op}: x must have at least one channel, got shape {tuple(x.shape)}")
        self.x = x
        self.xk, self.cl = _kernel_layout(x)
        if not isinstance(route, torch.Tensor) or route.dtype != torch.bool:
            raise TypeError(f"{op}: route must be a bool tensor [C] or [N, C]")
        if route.device != x.device:
            raise ValueError(f"{op}: route is on {route.device} but x is on {x.device}")
        if route.dim() == 1 and route.shape[0] == self.C:
            self.route_2d, self.route_sn = False, 0
        elif route.dim() == 2 and tuple(route.shape) == (self.N, self.C):
            self.route_2d, self.route_sn = True, self.C
        else:
            raise ValueError(f"{op}: route must have shape [{self.C}] or [{self.N}, {self.C}], "
                             f"got {tuple(route.shape)}")
        self.route_bool = route
        self.route = route.contiguous().view(torch.uint8)
        self.empty = self.N * self.HW == 0
        self.interpret = _interpret(x.device)
        self.cfg = INTERPRETED if self.interpret else COMPILED
        self.k = kernels(self.interpret) if not self.empty else None

    # ------------------------------------------------------------------ helpers
    def param(self, t, name: str):
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (self.C,):
            raise ValueError(f"{name} must have shape [{self.C}] (one value per channel), "
                             f"got {tuple(t.shape)}")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device} but x is on {self.device}")
        if not t.dtype.is_floating_point or t.dtype == torch.float64:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        return t.contiguous()

    def check_like_x(self, other, name: str, same_dtype: bool = False) -> None:
        """``other`` has x's shape and device (and dtype, if ``same_dtype``)."""
        if not isinstance(other, torch.Tensor):
            raise TypeError(f"{self.op}: {name} must be a Tensor, got {type(other).__name__}")
        if tuple(other.shape) != tuple(self.x.shape):
            raise ValueError(f"{self.op}: {name} must have x's shape {tuple(self.x.shape)}, "
                             f"got {tuple(other.shape)}")
        if other.device != self.device:
            raise ValueError(f"{self.op}: {name} is on {other.device} but x is on {self.device}")
        if same_dtype and other.dtype != self.x.dtype:
            raise TypeError(f"{self.op}: {name} must have x's dtype {self.x.dtype}, got {other.dtype}")
        if other.dtype not in _DTYPES:
            raise TypeError(f"{self.op}: {name} must be float32, float16 or bfloat16, got {other.dtype}")

    def like_x(self, other: torch.Tensor, name: str, same_dtype: bool = False) -> torch.Tensor:
        """``other`` (same shape as x) in x's kernel layout, copied only if needed."""
        self.check_like_x(other, name, same_dtype)
        if _in_layout(other, self.cl):
            return other
        return torch.empty_like(self.xk, dtype=other.dtype).copy_(other)

    def output(self) -> torch.Tensor:
        """An output of x's shape in the kernel layout (the strides the fake kernels return)."""
        return torch.empty_like(self.xk)

    def used(self) -> torch.Tensor:
        """uint8 [C]: channels some sample is routed through."""
        if not self.route_2d:
            return self.route
        return self.route_bool.any(0).view(torch.uint8)

    def _big(self, BN: int, BP: int) -> bool:
        n_pad = _cdiv(self.N, BN) * BN
        hw_pad = _cdiv(self.HW, BP) * BP
        return (n_pad + 1) * self.C * (hw_pad + 1) >= _INT32_LIMIT

    def fused_plan(self):
        """The one-pass plan (a whole channel block in one register tile), or None."""
        cfg = self.cfg
        BN, BP = _pow2(self.N), _pow2(self.HW)
        if BN * BP > cfg.fuse_max:
            return None
        if self.cl:
            BC = min(_pow2(self.C), cfg.block_c, cfg.fuse_max // (BN * BP))
            if BC < min(_pow2(self.C), cfg.min_block_c):
                return None
        else:
            BC = 1
        CB = _cdiv(self.C, BC)
        return _Plan(BN, BP, BC, 1, 1, 1, 1, CB, self._big(BN, BP), _warps(BN * BP * BC, 16))

    def split_plan(self) -> _Plan:
        cfg = self.cfg
        if self.cl:
            BC = min(_pow2(self.C), cfg.block_c)
            BP = min(_pow2(self.HW), max(1, cfg.tile // BC))
            BN = max(1, min(_pow2(self.N), cfg.tile // (BC * BP)))
        else:
            BC = 1
            BP = min(_pow2(self.HW), cfg.tile)
            BN = max(1, min(_pow2(self.N), cfg.tile // BP))
        Tp = _cdiv(self.HW, BP)
        T = _cdiv(self.N, BN) * Tp
        CB = _cdiv(self.C, BC)
        programs = cfg.programs or 4 * _sm_count(self.device.index if self.device.index is not None
                                                 else torch.cuda.current_device())
        P = max(1, min(_cdiv(programs, CB), T, cfg.max_chunks))
        TPC = _cdiv(T, P)
        P = _cdiv(T, TPC)
        block_pp = min(_pow2(P), cfg.block_pp, max(1, cfg.tile // BC))
        return _Plan(BN, BP, BC, Tp, T, TPC, P, CB, self._big(BN, BP), _warps(BN * BP * BC, 8), block_pp)

    def launch(self, kernel, grid, *args, **kwargs):
        if self.device.type == "cuda" and not self.interpret:
            with torch.cuda.device(self.device):
                kernel[grid](*args, **kwargs)
        else:
            kernel[grid](*args, **kwargs)

    def geometry(self, plan: _Plan):
        return dict(CL=self.cl, ROUTE_2D=self.route_2d, BN=plan.BN, BP=plan.BP, BC=plan.BC,
                    BIG=plan.big, num_warps=plan.warps)


# ----------------------------------------------------------------------------- forward
def _stats_into(p: _Problem, plan: _Plan, skip_unused: bool, routed: bool, mean, var, count,
                invstd, eps: float, dummy) -> torch.Tensor | None:
    """Launch the statistics kernel; returns the workspace (P > 1) or None (written final)."""
    used = p.used() if skip_unused else p.route
    final = plan.P == 1
    ws = dummy if final else torch.empty(3 * plan.P * p.C, dtype=_F32, device=p.device)
    p.launch(p.k.stats.channel_stats_kernel, (plan.CB, plan.P),
             p.xk, p.route, used, ws, mean, var, count, invstd if invstd is not None else mean,
             p.N, p.C, p.HW, p.route_sn, plan.Tp, plan.T, plan.TPC, plan.P, float(eps),
             ROUTED=routed, SKIP_UNUSED=skip_unused, FINAL=final, WRITE_INVSTD=invstd is not None,
             **p.geometry(plan))
    return None if final else ws


def bn_relu_route(x, route, weight, bias, running_mean, running_var, training, eps, routed_stats,
                  stats_all_channels):
    """``relu(batch_norm(x)) * route`` and the statistics ``(mean, invstd, var, count)``."""
    p = _Problem(x, route, "triton_bn_relu_route")
    return _forward(p, None, weight, bias, running_mean, running_var, training, eps, routed_stats,
                    stats_all_channels)


def bn_add_relu_route(x, residual, route, weight, bias, running_mean, running_var, training, eps,
                      routed_stats, stats_all_channels):
    """``relu(batch_norm(x) + residual) * route`` and the statistics ``(mean, invstd, var, count)``;
    the residual is read only where routed."""
    p = _Problem(x, route, "triton_bn_add_relu_route")
    residual = p.like_x(residual, "residual", same_dtype=True)
    return _forward(p, residual, weight, bias, running_mean, running_var, training, eps, routed_stats,
                    stats_all_channels)


def _forward(p: _Problem, residual, weight, bias, running_mean, running_var, training, eps,
             routed_stats, stats_all_channels):
    """The forward of both ops: ``residual`` (in x's kernel layout) or None."""
    weight, bias = p.param(weight, "weight"), p.param(bias, "bias")
    running_mean, running_var = p.param(running_mean, "running_mean"), p.param(running_var, "running_var")
    C, dev = p.C, p.device
    eps = float(eps)
    mean = torch.empty(C, dtype=_F32, device=dev)
    invstd = torch.empty(C, dtype=_F32, device=dev)
    if training:
        var = torch.empty(C, dtype=_F32, device=dev)
        count = torch.empty(C, dtype=_F32, device=dev)
    else:
        if running_mean is None or running_var is None:
            raise ValueError(f"{p.op}: training=False needs running_mean and running_var")
        var = torch.empty(0, dtype=_F32, device=dev)
        count = torch.empty(0, dtype=_F32, device=dev)
    y = p.output()
    if p.empty:
        if training:
            for t in (mean, var, count):
                t.zero_()
            invstd.copy_(torch.full_like(invstd, eps).rsqrt_())
        else:
            mean.copy_(running_mean)
            invstd.copy_(torch.rsqrt(running_var.float() + eps))
        return y, mean, invstd, var, count
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    affine = dict(HAS_W=weight is not None, HAS_B=bias is not None,
                  HAS_RESIDUAL=residual is not None)
    res = residual if residual is not None else p.xk
    if training:
        skip = not routed_stats and not stats_all_channels
        plan = p.fused_plan()
        if plan is not None:
            p.launch(p.k.normalize.fused_forward_kernel, (plan.CB,),
                     p.xk, res, p.route, y, w, b, mean, invstd, var, count,
                     p.N, C, p.HW, p.route_sn, eps,
                     ROUTED=routed_stats, SKIP_UNUSED=skip, **affine, **p.geometry(plan))
        else:
            plan = p.split_plan()
            ws = _stats_into(p, plan, skip or (routed_stats and not p.route_2d), routed_stats,
                             mean, var, count, invstd, eps, dummy=mean)
            p.launch(p.k.normalize.normalize_kernel, (plan.CB, plan.P),
                     p.xk, res, p.route, y, w, b, mean, invstd, var, count,
                     ws if ws is not None else mean, mean,
                     p.N, C, p.HW, p.route_sn, plan.Tp, plan.T, plan.TPC, plan.P, eps,
                     STATS=0 if ws is None else 1, BLOCK_PP=plan.block_pp, **affine,
                     **p.geometry(plan))
    else:
        plan = p.split_plan()
        p.launch(p.k.normalize.normalize_kernel, (plan.CB, plan.P),
                 p.xk, res, p.route, y, w, b, mean, invstd, mean, mean, running_mean, running_var,
                 p.N, C, p.HW, p.route_sn, plan.Tp, plan.T, plan.TPC, 1, eps,
                 STATS=2, BLOCK_PP=1, **affine, **p.geometry(plan))
    return y, mean, invstd, var, count


def channel_stats(x, route, routed_stats, all_channels):
    """Per-channel ``(mean, biased var, count)`` (fp32 [C]). Batch statistics reduce every
    channel if ``all_channels``, else only channels some sample is routed through (the others:
    0, 0, 0). Routed statistics count only routed samples (``all_channels`` is then moot)."""
    p = _Problem(x, route, "triton_channel_stats")
    C, dev = p.C, p.device
    mean, var, count = (torch.zeros(C, dtype=_F32, device=dev) for _ in range(3))
    if p.empty:
        return mean, var, count
    plan = p.split_plan()
    skip = (not routed_stats and not all_channels) or (routed_stats and not p.route_2d)
    ws = _stats_into(p, plan, skip, routed_stats, mean, var, count, None, 0.0, dummy=mean)
    if ws is not None:
        p.launch(p.k.stats.stats_finalize_kernel, (plan.CB,), ws, mean, var, count, mean,
                 plan.P, C, 0.0, WRITE_INVSTD=False, BC=plan.BC, BLOCK_PP=plan.block_pp,
                 num_warps=4)
    return mean, var, count


def normalize_relu_route(x, route, mean, invstd, weight, bias):
    """``relu((x - mean) * invstd * w + b) * route`` with given statistics."""
    p = _Problem(x, route, "triton_normalize_relu_route")
    mean, invstd = p.param(mean, "mean"), p.param(invstd, "invstd")
    weight, bias = p.param(weight, "weight"), p.param(bias, "bias")
    if mean is None or invstd is None:
        raise ValueError("triton_normalize_relu_route: mean and invstd are required")
    y = p.output()
    if p.empty:
        return y
    plan = p.split_plan()
    p.launch(p.k.normalize.normalize_kernel, (plan.CB, plan.P),
             p.xk, p.xk, p.route, y, weight if weight is not None else mean,
             bias if bias is not None else mean, mean, invstd, mean, mean, mean, mean,
             p.N, p.C, p.HW, p.route_sn, plan.Tp, plan.T, plan.TPC, 1, 0.0,
             STATS=0, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RESIDUAL=False, BLOCK_PP=1,
             **p.geometry(plan))
    return y


# ----------------------------------------------------------------------------- backward
@dataclass
class _Backward:
    """The tensors of one backward call in x's kernel layout. ``y`` is the gate of ``GATE_Y``
    (else unused); an output not asked for, or an absent weight / bias / count, is ``mean``
    (never written or read: its flag is off)."""
    p: _Problem
    dy: torch.Tensor
    y: torch.Tensor
    gate: int
    mean: torch.Tensor
    invstd: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    affine: dict
    cnt: torch.Tensor
    gx: torch.Tensor
    gr: torch.Tensor
    gw: torch.Tensor
    gb: torch.Tensor

    @classmethod
    def of(cls, p, dyk, yk, mean, invstd, weight, bias, count=None, gx=None, gr=None, gw=None, gb=None):
        def ptr(t):
            return t if t is not None else mean
        return cls(p, dyk, ptr(yk), GATE_PRE if yk is None else GATE_Y, mean, invstd, ptr(weight),
                   ptr(bias), dict(HAS_W=weight is not None, HAS_B=bias is not None), ptr(count),
                   ptr(gx), ptr(gr), ptr(gw), ptr(gb))


def _reduce_into(bw: _Backward, plan, sums, write_sums, write_gw, write_gb, eval_gx, write_gr=False):
    """Launch the backward reduction; returns the workspace (P > 1) or None (written final)."""
    p = bw.p
    final = plan.P == 1
    ws = bw.mean if final else torch.empty(2 * plan.P * p.C, dtype=_F32, device=p.device)
    p.launch(p.k.backward.backward_reduce_kernel, (plan.CB, plan.P),
             bw.dy, bw.y, p.xk, p.route, bw.mean, bw.invstd, bw.w, bw.b, ws, sums[0], sums[1],
             bw.gw, bw.gb, bw.gx, bw.gr,
             p.N, p.C, p.HW, p.route_sn, plan.Tp, plan.T, plan.TPC, plan.P,
             FINAL=final, WRITE_SUMS=write_sums, WRITE_GW=write_gw, WRITE_GB=write_gb,
             EVAL_GX=eval_gx, GATE=bw.gate, WRITE_GR=write_gr, **bw.affine, **p.geometry(plan))
    return None if final else ws


def _finalize_sums(bw: _Backward, plan, ws, sums, write_sums, write_gw, write_gb):
    p = bw.p
    p.launch(p.k.backward.backward_finalize_kernel, (plan.CB,), ws, bw.invstd, sums[0], sums[1],
             bw.gw, bw.gb, plan.P, p.C, WRITE_SUMS=write_sums, WRITE_GW=write_gw, WRITE_GB=write_gb,
             BC=plan.BC, BLOCK_PP=plan.block_pp, num_warps=4)


def _apply(bw: _Backward, plan, sums, ws, training, routed, sums_mode, write_gw=False,
           write_gb=False, write_gx=True, write_gr=False, given_g=False):
    """Launch the apply pass. ``given_g``: ``grad_residual`` already holds g (the reduce pass
    wrote it): read it instead of grad_y and the gate."""
    p = bw.p
    dy, gate = (bw.gr, GATE_GIVEN) if given_g else (bw.dy, bw.gate)
    p.launch(p.k.backward.backward_apply_kernel, (plan.CB, plan.P),
             dy, bw.y, p.xk, p.route, bw.mean, bw.invstd, bw.w, bw.b, sums[0], sums[1], bw.cnt,
             ws if ws is not None else bw.mean, bw.gx, bw.gw, bw.gb, bw.gr,
             p.N, p.C, p.HW, p.route_sn, plan.Tp, plan.T, plan.TPC, plan.P,
             TRAINING=training, ROUTED=routed, SUMS=sums_mode, WRITE_GW=write_gw,
             WRITE_GB=write_gb, GATE=gate, WRITE_GX=write_gx, WRITE_GR=write_gr,
             BLOCK_PP=plan.block_pp, **bw.affine, **p.geometry(plan))


def bn_relu_route_backward(grad_y, x, route, weight, bias, mean, invstd, count, training,
                           routed_stats, output_mask):
    """``(grad_x, grad_weight, grad_bias)``; outputs not in ``output_mask`` are empty [0]."""
    p = _Problem(x, route, "triton_bn_relu_route_backward")
    need_gx, need_gw, need_gb = (bool(m) for m in output_mask)
    gx, _, gw, gb = _backward(p, grad_y, None, weight, bias, mean, invstd, count, training,
                              routed_stats, (need_gx, False, need_gw, need_gb))
    return gx, gw, gb


def bn_add_relu_route_backward(grad_y, y, x, route, weight, bias, mean, invstd, count, training,
                               routed_stats, output_mask):
    """``(grad_x, grad_residual, grad_weight, grad_bias)`` gated on the saved output ``y``;
    outputs not in ``output_mask`` are empty [0]."""
    p = _Problem(x, route, "triton_bn_add_relu_route_backward")
    p.check_like_x(grad_y, "grad_y")
    p.check_like_x(y, "y", same_dtype=True)
    return _backward(p, grad_y, y, weight, bias, mean, invstd, count, training, routed_stats,
                     tuple(bool(m) for m in output_mask))


def _backward(p: _Problem, grad_y, y, weight, bias, mean, invstd, count, training, routed_stats,
              need):
    """The backward of both ops (``y``: the gate of bn_add_relu_route, or None): returns
    ``(grad_x, grad_residual, grad_weight, grad_bias)`` as ``need`` asks, the others empty [0]."""
    weight, bias = p.param(weight, "weight"), p.param(bias, "bias")
    mean, invstd = p.param(mean, "mean"), p.param(invstd, "invstd")
    if training:
        count = p.param(count, "count")
    need_gx, need_gr, need_gw, need_gb = need
    need_gw = need_gw and weight is not None
    need_gb = need_gb and bias is not None
    x = p.x
    gx = p.output() if need_gx else x.new_empty(0)
    gr = p.output() if need_gr else x.new_empty(0)
    gw = torch.empty_like(weight) if need_gw else x.new_empty(0)
    gb = torch.empty_like(bias) if need_gb else x.new_empty(0)
    if p.empty or not (need_gx or need_gr or need_gw or need_gb):
        gw.zero_()
        gb.zero_()
        return gx, gr, gw, gb
    dyk = p.like_x(grad_y, "grad_y")
    yk = p.like_x(y, "y", same_dtype=True) if y is not None else None
    bw = _Backward.of(p, dyk, yk, mean, invstd, weight, bias, count if training else None,
                      gx if need_gx else None, gr if need_gr else None, gw if need_gw else None,
                      gb if need_gb else None)
    _launch_backward(bw, bool(training), bool(routed_stats), need_gx, need_gr, need_gw, need_gb)
    return gx, gr, gw, gb


def _launch_backward(bw: _Backward, training, routed, need_gx, need_gr, need_gw, need_gb):
    p = bw.p
    if not (need_gx or need_gw or need_gb):  # grad_residual alone is g: no reduction, no x
        _apply(bw, p.split_plan(), (bw.mean, bw.mean), None, training=False, routed=routed,
               sums_mode=2, write_gx=False, write_gr=True)
        return
    plan = p.fused_plan()
    if plan is not None:
        p.launch(p.k.backward.fused_backward_kernel, (plan.CB,),
                 bw.dy, bw.y, p.xk, p.route, bw.mean, bw.invstd, bw.w, bw.b, bw.cnt,
                 bw.gx, bw.gw, bw.gb, bw.gr,
                 p.N, p.C, p.HW, p.route_sn,
                 TRAINING=training, ROUTED=routed, WRITE_GX=need_gx, WRITE_GW=need_gw,
                 WRITE_GB=need_gb, GATE=bw.gate, WRITE_GR=need_gr, **bw.affine, **p.geometry(plan))
        return
    plan = p.split_plan()
    if not training and not (need_gw or need_gb):
        _apply(bw, plan, (bw.mean, bw.mean), None, training=False, routed=routed, sums_mode=2,
               write_gx=need_gx, write_gr=need_gr)
        return
    apply_after = training and need_gx
    # g is written by the reduce pass when the apply pass can read it back exactly (x's dtype is
    # grad_y's): the apply pass then reads one tensor instead of grad_y and y
    given_g = apply_after and need_gr and bw.dy.dtype == p.x.dtype
    sums = (torch.empty(2, p.C, dtype=_F32, device=p.device) if apply_after and plan.P == 1
            else None)
    sums_pair = (sums[0], sums[1]) if sums is not None else (bw.mean, bw.mean)
    ws = _reduce_into(bw, plan, sums_pair, write_sums=sums is not None, write_gw=need_gw,
                      write_gb=need_gb, eval_gx=not training and need_gx,
                      write_gr=need_gr and (given_g or not apply_after))
    if apply_after:
        _apply(bw, plan, sums_pair, ws, training=True, routed=routed,
               sums_mode=0 if ws is None else 1, write_gw=need_gw and ws is not None,
               write_gb=need_gb and ws is not None, write_gr=need_gr and not given_g,
               given_g=given_g)
    elif ws is not None:
        _finalize_sums(bw, plan, ws, (bw.mean, bw.mean), False, need_gw, need_gb)


def backward_reduce(grad_y, x, route, mean, invstd, weight, bias):
    """Per-channel ``(sum_dy, sum_dy_xmu)`` of ``g = grad_y * route * relu'(pre)``."""
    p = _Problem(x, route, "triton_backward_reduce")
    mean, invstd = p.param(mean, "mean"), p.param(invstd, "invstd")
    weight, bias = p.param(weight, "weight"), p.param(bias, "bias")
    sum_dy = torch.zeros(p.C, dtype=_F32, device=p.device)
    sum_dy_xmu = torch.zeros(p.C, dtype=_F32, device=p.device)
    if p.empty:
        return sum_dy, sum_dy_xmu
    bw = _Backward.of(p, p.like_x(grad_y, "grad_y"), None, mean, invstd, weight, bias)
    plan = p.split_plan()
    ws = _reduce_into(bw, plan, (sum_dy, sum_dy_xmu), write_sums=True, write_gw=False,
                      write_gb=False, eval_gx=False)
    if ws is not None:
        _finalize_sums(bw, plan, ws, (sum_dy, sum_dy_xmu), True, False, False)
    return sum_dy, sum_dy_xmu


def backward_apply(grad_y, x, route, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count,
                   training, routed_stats):
    """``grad_x`` from the (all-reduced) sums: train and eval formulas, see ``backward.py``."""
    p = _Problem(x, route, "triton_backward_apply")
    mean, invstd = p.param(mean, "mean"), p.param(invstd, "invstd")
    weight, bias = p.param(weight, "weight"), p.param(bias, "bias")
    if training:
        sum_dy, sum_dy_xmu = p.param(sum_dy, "sum_dy"), p.param(sum_dy_xmu, "sum_dy_xmu")
        count = p.param(count, "count")
    gx_out = p.output()
    if p.empty:
        return gx_out
    bw = _Backward.of(p, p.like_x(grad_y, "grad_y"), None, mean, invstd, weight, bias,
                      count if training else None, gx_out)
    plan = p.split_plan()
    if training:
        _apply(bw, plan, (sum_dy, sum_dy_xmu), None, training=True, routed=bool(routed_stats),
               sums_mode=0)
    else:
        _apply(bw, plan, (mean, mean), None, training=False, routed=bool(routed_stats), sums_mode=2)
    return gx_out


# ----------------------------------------------------------------------------- registration
_IMPLS = {
    "bn_relu_route": bn_relu_route,
    "bn_relu_route_backward": bn_relu_route_backward,
    "bn_add_relu_route": bn_add_relu_route,
    "bn_add_relu_route_backward": bn_add_relu_route_backward,
    "channel_stats": channel_stats,
    "normalize_relu_route": normalize_relu_route,
    "backward_reduce": backward_reduce,
    "backward_apply": backward_apply,
}

_LIB = torch.library.Library("taskrouting", "IMPL")  # noqa: TOR901
for _name, _fn in _IMPLS.items():
    for _key in ("CUDA", "CPU"):
        _LIB.impl(f"triton_{_name}", _fn, _key)
