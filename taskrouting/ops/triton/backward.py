"""Backward of BatchNorm + ReLU + route: reduce (``sum_dy``, ``sum_dy_xmu``) and apply (``grad_x``).

``g = grad_y * route * (pre > 0)``, gated by the constexpr ``GATE`` (``ops.py``'s ``GATE_*``):

* ``GATE_PRE`` (0, ``bn_relu_route``): the pre-activation ``pre = (x - mean) * invstd * w + b``
  recomputed from ``x`` (the ReLU mask is not stored);
* ``GATE_Y`` (1, ``bn_add_relu_route``): ``y > 0`` on the saved output ``y`` (the pre-activation
  would need the residual; ``y`` is 0 wherever the sample is not routed);
* ``GATE_GIVEN`` (2): ``grad_y`` is ``g`` already (the split training backward's apply pass reads
  the ``grad_residual`` its reduce pass wrote: one tensor instead of ``grad_y`` and ``y``).

``WRITE_GR``: also write ``grad_residual = g`` (x's dtype). Per channel ``sum_dy = Σ g``,
``sum_dy_xmu = Σ g (x - mean)``, ``grad_weight = sum_dy_xmu * invstd``, ``grad_bias = sum_dy``;
``grad_x`` is ``w·invstd·(g - sum_dy/count - (x - mean)·invstd²·sum_dy_xmu/count)`` in training
(times the route with routed statistics) and ``g·w·invstd`` in eval.

Skipping: ``grad_y`` (and ``y``) is read only where the sample is routed through the channel.
``x`` too, except in training with batch statistics, where a non-routed sample of a channel whose sums are
non-zero still gets a gradient through the mean and variance. A channel masked for the whole
batch is therefore never read: zero sums, zero gradients.

Tiling and layouts: see ``stats.py``. Per-lane fp32 accumulators, one cross-lane reduction per
chunk; chunks merged by summing ``ws[2, P, C]``.

Bytes moved:
* ``backward_reduce_kernel``: reads routed ``x`` and ``grad_y`` once; writes ``2·P·C`` floats
  (or the final sums / grads when ``P = 1``); with ``EVAL_GX`` also writes ``grad_x`` (eval needs
  no reduction for it, so the fused eval backward is one pass);
* ``backward_apply_kernel``: reads ``x`` and routed ``grad_y`` again, writes ``grad_x``;
* ``fused_backward_kernel``: one pass (reads ``x``, ``grad_y`` once, writes ``grad_x`` and the
  grads) with the whole channel block in registers.

``GATE_Y`` adds a read of routed ``y`` to a pass that reads ``grad_y`` and ``WRITE_GR`` a write of
``grad_residual``; a pass that needs no ``x - mean`` (eval ``grad_x`` alone, ``grad_residual``
alone) does not read ``x``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .stats import MAX, SUM, load_channel, load_route, sum2, tile_offsets


@triton.jit
def gated_grad(dy_ptr, y_ptr, off, m, xmu, scale3, b3, GATE: tl.constexpr):
    """``g``: ``grad_y`` where routed (``m``) and the ReLU let the value through, else 0."""
    dyv = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    if GATE == 0:
        g = tl.where(m & (xmu * scale3 + b3 > 0.0), dyv, 0.0)
    elif GATE == 1:
        g = tl.where(m & (tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32) > 0.0), dyv, 0.0)
    else:
        g = dyv  # already gated, 0 where not routed
    return g


@triton.jit
def merge_sum_partials(ws_ptr, P, C, c, cmask, BC: tl.constexpr, BLOCK_PP: tl.constexpr):
    """Sum the ``P`` chunk partials ``ws[2, P, C]`` of channels ``c``: (sum_dy, sum_dy_xmu)."""
    j = tl.arange(0, BLOCK_PP)[:, None]
    cc = c[None, :]
    cm = cmask[None, :]
    s1 = tl.full([BC], 0.0, tl.float32)
    s2 = tl.full([BC], 0.0, tl.float32)
    j0 = 0
    while j0 < P:  # a while loop: see the stats.py docstring
        m = (j0 + j < P) & cm
        o = (j0 + j) * C + cc
        s1 += tl.reduce(tl.load(ws_ptr + o, mask=m, other=0.0), 0, SUM)
        s2 += tl.reduce(tl.load(ws_ptr + P * C + o, mask=m, other=0.0), 0, SUM)
        j0 += BLOCK_PP
    return s1, s2


@triton.jit
def store_sums(sum_dy, sum_dy_xmu, invstd, c, mask, sum_dy_ptr, sum_dy_xmu_ptr, gw_ptr, gb_ptr,
               WRITE_SUMS: tl.constexpr, WRITE_GW: tl.constexpr, WRITE_GB: tl.constexpr):
    if WRITE_SUMS:
        tl.store(sum_dy_ptr + c, sum_dy, mask=mask)
        tl.store(sum_dy_xmu_ptr + c, sum_dy_xmu, mask=mask)
    if WRITE_GW:
        # zero sums give a zero grad even where invstd is not finite (a skipped channel)
        tl.store(gw_ptr + c, tl.where(sum_dy_xmu == 0.0, 0.0, sum_dy_xmu * invstd), mask=mask)
    if WRITE_GB:
        tl.store(gb_ptr + c, sum_dy, mask=mask)


@triton.jit
def backward_reduce_kernel(
        dy_ptr, y_ptr, x_ptr, route_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr,
        ws_ptr, sum_dy_ptr, sum_dy_xmu_ptr, gw_ptr, gb_ptr, gx_ptr, gr_ptr,
        N, C, HW, route_sn, Tp, T, TPC, P,
        CL: tl.constexpr, ROUTE_2D: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        FINAL: tl.constexpr, WRITE_SUMS: tl.constexpr, WRITE_GW: tl.constexpr,
        WRITE_GB: tl.constexpr, EVAL_GX: tl.constexpr, GATE: tl.constexpr, WRITE_GR: tl.constexpr,
        BN: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, BIG: tl.constexpr):
    """Grid ``(cdiv(C, BC), P)``: per-chunk ``sum_dy``, ``sum_dy_xmu`` into ``ws[2, P, C]``, or
    (``FINAL``, ``P == 1``) straight into the sums / grad_weight / grad_bias.
    ``EVAL_GX``: also write the eval ``grad_x = g·w·invstd`` in the same pass; ``WRITE_GR``:
    ``grad_residual = g``."""
    pid_c = tl.program_id(0)
    pid_j = tl.program_id(1)
    c0 = pid_c * BC
    c = c0 + tl.arange(0, BC)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    w = load_channel(w_ptr, c, cmask, 1.0, HAS_W, BC)
    b = load_channel(b_ptr, c, cmask, 0.0, HAS_B, BC)
    mean3 = mean[None, None, :]
    scale3 = (invstd * w)[None, None, :]
    b3 = b[None, None, :]
    acc_dy = tl.full([BN, BP, BC], 0.0, tl.float32)
    acc_dyxmu = tl.full([BN, BP, BC], 0.0, tl.float32)
    t0 = pid_j * TPC
    t1 = tl.minimum(t0 + TPC, T)
    if not ROUTE_2D and not (EVAL_GX or WRITE_GR):  # a block masked for the whole batch: no work
        routed = tl.load(route_ptr + c, mask=cmask, other=0).to(tl.int32)
        t1 = tl.where(tl.reduce(routed, 0, MAX) > 0, t1, t0)
    t = t0
    while t < t1:  # a while loop: see the stats.py docstring
        off, valid, n3, c3 = tile_offsets(t, Tp, N, C, HW, c0, CL, BN, BP, BC, BIG)
        m = valid & load_route(route_ptr, route_sn, n3, c3, N, C, ROUTE_2D)
        xmu = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean3
        g = gated_grad(dy_ptr, y_ptr, off, m, xmu, scale3, b3, GATE)
        acc_dy += g
        acc_dyxmu += tl.where(m, g * xmu, 0.0)
        if EVAL_GX:
            tl.store(gx_ptr + off, tl.where(m, g * scale3, 0.0), mask=valid)
        if WRITE_GR:
            tl.store(gr_ptr + off, g, mask=valid)
        t += 1
    sum_dy = sum2(acc_dy)
    sum_dy_xmu = sum2(acc_dyxmu)
    if FINAL:
        store_sums(sum_dy, sum_dy_xmu, invstd, c, cmask, sum_dy_ptr, sum_dy_xmu_ptr, gw_ptr, gb_ptr,
                   WRITE_SUMS, WRITE_GW, WRITE_GB)
    else:
        o = pid_j * C + c
        tl.store(ws_ptr + o, sum_dy, mask=cmask)
        tl.store(ws_ptr + P * C + o, sum_dy_xmu, mask=cmask)


@triton.jit
def backward_finalize_kernel(ws_ptr, invstd_ptr, sum_dy_ptr, sum_dy_xmu_ptr, gw_ptr, gb_ptr, P, C,
                             WRITE_SUMS: tl.constexpr, WRITE_GW: tl.constexpr,
                             WRITE_GB: tl.constexpr, BC: tl.constexpr, BLOCK_PP: tl.constexpr):
    """Grid ``(cdiv(C, BC),)``: sum ``ws[2, P, C]`` into the sums / grad_weight / grad_bias."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = c < C
    sum_dy, sum_dy_xmu = merge_sum_partials(ws_ptr, P, C, c, cmask, BC, BLOCK_PP)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    store_sums(sum_dy, sum_dy_xmu, invstd, c, cmask, sum_dy_ptr, sum_dy_xmu_ptr, gw_ptr, gb_ptr,
               WRITE_SUMS, WRITE_GW, WRITE_GB)


@triton.jit
def backward_apply_kernel(
        dy_ptr, y_ptr, x_ptr, route_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr,
        sum_dy_ptr, sum_dy_xmu_ptr, count_ptr, ws_ptr, gx_ptr, gw_ptr, gb_ptr, gr_ptr,
        N, C, HW, route_sn, Tp, T, TPC, P_SUMS,
        CL: tl.constexpr, ROUTE_2D: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        TRAINING: tl.constexpr, ROUTED: tl.constexpr, SUMS: tl.constexpr,
        WRITE_GW: tl.constexpr, WRITE_GB: tl.constexpr,
        GATE: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GR: tl.constexpr,
        BN: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, BIG: tl.constexpr,
        BLOCK_PP: tl.constexpr):
    """Grid ``(cdiv(C, BC), P)``: ``grad_x`` (``WRITE_GX``) and ``grad_residual`` (``WRITE_GR``)
    for a chunk of tiles.

    ``SUMS``: 0: given ``sum_dy`` / ``sum_dy_xmu``; 1: summed from ``ws[2, P_SUMS, C]`` (the
    ``j == 0`` programs then write grad_weight / grad_bias); 2: none (eval).
    """
    pid_c = tl.program_id(0)
    pid_j = tl.program_id(1)
    c0 = pid_c * BC
    c = c0 + tl.arange(0, BC)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    w = load_channel(w_ptr, c, cmask, 1.0, HAS_W, BC)
    b = load_channel(b_ptr, c, cmask, 0.0, HAS_B, BC)
    scale = invstd * w
    if SUMS == 0:
        sum_dy = tl.load(sum_dy_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        sum_dy_xmu = tl.load(sum_dy_xmu_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    elif SUMS == 1:
        sum_dy, sum_dy_xmu = merge_sum_partials(ws_ptr, P_SUMS, C, c, cmask, BC, BLOCK_PP)
        store_sums(sum_dy, sum_dy_xmu, invstd, c, c + pid_j * C < C, sum_dy_ptr, sum_dy_xmu_ptr,
                   gw_ptr, gb_ptr, False, WRITE_GW, WRITE_GB)
    if TRAINING:
        cnt = tl.maximum(tl.load(count_ptr + c, mask=cmask, other=1.0).to(tl.float32), 1.0)
        k1 = (sum_dy / cnt)[None, None, :]
        k2 = (sum_dy_xmu / cnt * invstd * invstd)[None, None, :]
        active3 = ((sum_dy != 0.0) | (sum_dy_xmu != 0.0))[None, None, :]
    mean3 = mean[None, None, :]
    scale3 = scale[None, None, :]
    b3 = b[None, None, :]
    t0 = pid_j * TPC
    t1 = tl.minimum(t0 + TPC, T)
    t = t0
    while t < t1:  # a while loop: see the stats.py docstring
        off, valid, n3, c3 = tile_offsets(t, Tp, N, C, HW, c0, CL, BN, BP, BC, BIG)
        m = valid & load_route(route_ptr, route_sn, n3, c3, N, C, ROUTE_2D)
        if TRAINING and not ROUTED:
            mx = m | (valid & active3)
        else:
            mx = m
        if GATE == 0 or (TRAINING and WRITE_GX):
            xmu = tl.load(x_ptr + off, mask=mx, other=0.0).to(tl.float32) - mean3
        else:
            xmu = 0.0  # not read: neither the gate nor this grad_x needs x
        g = gated_grad(dy_ptr, y_ptr, off, m, xmu, scale3, b3, GATE)
        if WRITE_GR:
            tl.store(gr_ptr + off, g, mask=valid)
        if WRITE_GX:
            if TRAINING:
                gx = tl.where(mx, scale3 * (g - k1 - xmu * k2), 0.0)
            else:
                gx = tl.where(m, g * scale3, 0.0)
            tl.store(gx_ptr + off, gx, mask=valid)
        t += 1


@triton.jit
def fused_backward_kernel(
        dy_ptr, y_ptr, x_ptr, route_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, count_ptr,
        gx_ptr, gw_ptr, gb_ptr, gr_ptr,
        N, C, HW, route_sn,
        CL: tl.constexpr, ROUTE_2D: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
        TRAINING: tl.constexpr, ROUTED: tl.constexpr, WRITE_GX: tl.constexpr,
        WRITE_GW: tl.constexpr, WRITE_GB: tl.constexpr, GATE: tl.constexpr,
        WRITE_GR: tl.constexpr,
        BN: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, BIG: tl.constexpr):
    """Grid ``(cdiv(C, BC),)``, one tile ``[BN >= N, BP >= HW, BC]`` per program: the sums,
    ``grad_x`` and ``grad_residual`` of a whole channel block in one pass (each input read once)."""
    c0 = tl.program_id(0) * BC
    c = c0 + tl.arange(0, BC)
    cmask = c < C
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    w = load_channel(w_ptr, c, cmask, 1.0, HAS_W, BC)
    b = load_channel(b_ptr, c, cmask, 0.0, HAS_B, BC)
    scale3 = (invstd * w)[None, None, :]
    off, valid, n3, c3 = tile_offsets(0, 1, N, C, HW, c0, CL, BN, BP, BC, BIG)
    r = load_route(route_ptr, route_sn, n3, c3, N, C, ROUTE_2D)
    m = valid & r
    if TRAINING and WRITE_GX and not ROUTED:
        if ROUTE_2D:
            mx = valid & (tl.reduce(r.to(tl.int32), 0, MAX, keep_dims=True) != 0)
        else:
            mx = m
    else:
        mx = m
    if (GATE == 0 or WRITE_GW) or (TRAINING and WRITE_GX):
        xmu = tl.load(x_ptr + off, mask=mx, other=0.0).to(tl.float32) - mean[None, None, :]
    else:
        xmu = 0.0  # not read: neither the gate nor these grads need x
    g = gated_grad(dy_ptr, y_ptr, off, m, xmu, scale3, b[None, None, :], GATE)
    if WRITE_GR:
        tl.store(gr_ptr + off, g, mask=valid)
    sum_dy = sum2(g)
    sum_dy_xmu = sum2(tl.where(m, g * xmu, 0.0))
    store_sums(sum_dy, sum_dy_xmu, invstd, c, cmask, gw_ptr, gw_ptr, gw_ptr, gb_ptr,
               False, WRITE_GW, WRITE_GB)
    if WRITE_GX:
        if TRAINING:
            cnt = tl.maximum(tl.load(count_ptr + c, mask=cmask, other=1.0).to(tl.float32), 1.0)
            k1 = (sum_dy / cnt)[None, None, :]
            k2 = (sum_dy_xmu / cnt * invstd * invstd)[None, None, :]
            gx = tl.where(mx, scale3 * (g - k1 - xmu * k2), 0.0)
        else:
            gx = tl.where(m, g * scale3, 0.0)
        tl.store(gx_ptr + off, gx, mask=valid)
