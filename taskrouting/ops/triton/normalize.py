"""Forward apply: ``y = relu((x - mean) * invstd * w + b) * route``, and the one-pass fused forward.

``HAS_RESIDUAL`` (``bn_add_relu_route``, a ResNet block's tail): ``y = relu(x * scale + shift +
residual) * route``, the residual added in fp32 before the ReLU and rounded once; off, the kernels
are ``bn_relu_route``'s (the flag is a constexpr: no residual code is compiled).

Tiling and layouts: see ``stats.py``. Where a sample is not routed through a channel, ``x`` and
the residual are not read (masked loads) and ``y`` is written 0, so a channel masked for the whole
batch is only written. ``tl.where`` (not a multiply) selects the output, so NaN/inf in skipped data
or in the statistics of skipped channels never reach ``y``.

Bytes moved:
* ``normalize_kernel``: reads routed ``x`` (and residual) once, writes ``y`` once (+ the
  per-channel statistics: given, merged from ``3·P·C`` partials, or read from the running stats);
* ``fused_forward_kernel``: reads ``x`` (and the routed residual) once, writes ``y`` once and
  ``4·C`` floats of statistics; the whole channel block stays in registers between the
  reduction and the apply.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .stats import MAX, load_channel, load_route, merge_stats_partials, relu_keep_nan, sum2, tile_offsets


@triton.jit
def normalize_kernel(
        x_ptr, res_ptr, route_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, var_ptr, count_ptr,
        src1_ptr, src2_ptr,
        N, C, HW, route_sn, Tp, T, TPC, P_STATS, eps,
        CL: tl.constexpr, ROUTE_2D: tl.constexpr, STATS: tl.constexpr,
        HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        BN: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, BIG: tl.constexpr,
        BLOCK_PP: tl.constexpr):
    """Grid ``(cdiv(C, BC), P)``: program ``(cb, j)`` writes ``y`` for its chunk of tiles.

    Where the per-channel statistics come from (``STATS``):
    0: given ``mean`` / ``invstd`` (stage op ``normalize_relu_route``);
    1: merged from the stats partials ``src1 = ws[3, P_STATS, C]`` (training, split path);
       the ``j == 0`` programs write mean / invstd / var / count;
    2: the running stats ``src1`` (mean), ``src2`` (var) (eval); ``j == 0`` writes mean / invstd.
    """
    pid_c = tl.program_id(0)
    pid_j = tl.program_id(1)
    c0 = pid_c * BC
    c = c0 + tl.arange(0, BC)
    cmask = c < C
    first = c + pid_j * C < C  # channels of this block, in the j == 0 programs only
    if STATS == 0:
        mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    elif STATS == 1:
        mean, var, cnt = merge_stats_partials(src1_ptr, P_STATS, C, c, cmask, BC, BLOCK_PP)
        invstd = tl.rsqrt(var + eps)
        tl.store(mean_ptr + c, mean, mask=first)
        tl.store(invstd_ptr + c, invstd, mask=first)
        tl.store(var_ptr + c, var, mask=first)
        tl.store(count_ptr + c, cnt, mask=first)
    else:
        mean = tl.load(src1_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        invstd = tl.rsqrt(tl.load(src2_ptr + c, mask=cmask, other=1.0).to(tl.float32) + eps)
        tl.store(mean_ptr + c, mean, mask=first)
        tl.store(invstd_ptr + c, invstd, mask=first)
    w = load_channel(w_ptr, c, cmask, 1.0, HAS_W, BC)
    b = load_channel(b_ptr, c, cmask, 0.0, HAS_B, BC)
    mean3 = mean[None, None, :]
    scale3 = (invstd * w)[None, None, :]
    b3 = b[None, None, :]
    t0 = pid_j * TPC
    t1 = tl.minimum(t0 + TPC, T)
    t = t0
    while t < t1:  # a while loop: see the stats.py docstring
        off, valid, n3, c3 = tile_offsets(t, Tp, N, C, HW, c0, CL, BN, BP, BC, BIG)
        m = valid & load_route(route_ptr, route_sn, n3, c3, N, C, ROUTE_2D)
        xv = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        pre = (xv - mean3) * scale3 + b3
        if HAS_RESIDUAL:
            pre += tl.load(res_ptr + off, mask=m, other=0.0).to(tl.float32)
        yv = relu_keep_nan(pre)
        tl.store(y_ptr + off, tl.where(m, yv, 0.0), mask=valid)
        t += 1


@triton.jit
def fused_forward_kernel(
        x_ptr, res_ptr, route_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, var_ptr, count_ptr,
        N, C, HW, route_sn, eps,
        CL: tl.constexpr, ROUTE_2D: tl.constexpr, ROUTED: tl.constexpr,
        SKIP_UNUSED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        BN: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, BIG: tl.constexpr):
    """Grid ``(cdiv(C, BC),)``, one tile ``[BN >= N, BP >= HW, BC]`` per program: batch
    statistics (exact two-pass in registers) and ``y`` of a whole channel block in one pass.

    ``ROUTED``: statistics over routed samples only. ``SKIP_UNUSED``: channels no sample is
    routed through are not read (stats 0, invstd rsqrt(eps)); otherwise every channel is reduced.
    """
    c0 = tl.program_id(0) * BC
    c = c0 + tl.arange(0, BC)
    cmask = c < C
    off, valid, n3, c3 = tile_offsets(0, 1, N, C, HW, c0, CL, BN, BP, BC, BIG)
    r = load_route(route_ptr, route_sn, n3, c3, N, C, ROUTE_2D)
    if ROUTED:
        sel = valid & r
    elif SKIP_UNUSED:
        if ROUTE_2D:
            sel = valid & (tl.reduce(r.to(tl.int32), 0, MAX, keep_dims=True) != 0)
        else:
            sel = valid & r
    else:
        sel = valid
    xv = tl.load(x_ptr + off, mask=sel, other=0.0).to(tl.float32)
    cnt = sum2(sel.to(tl.float32))
    safe = tl.maximum(cnt, 1.0)
    mean = sum2(xv) / safe
    d = tl.where(sel, xv - mean[None, None, :], 0.0)
    var = sum2(d * d) / safe
    invstd = tl.rsqrt(var + eps)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(invstd_ptr + c, invstd, mask=cmask)
    tl.store(var_ptr + c, var, mask=cmask)
    tl.store(count_ptr + c, cnt, mask=cmask)
    w = load_channel(w_ptr, c, cmask, 1.0, HAS_W, BC)
    b = load_channel(b_ptr, c, cmask, 0.0, HAS_B, BC)
    pre = d * (invstd * w)[None, None, :] + b[None, None, :]
    if HAS_RESIDUAL:
        pre += tl.load(res_ptr + off, mask=valid & r, other=0.0).to(tl.float32)
    yv = relu_keep_nan(pre)
    tl.store(y_ptr + off, tl.where(valid & r, yv, 0.0), mask=valid)
