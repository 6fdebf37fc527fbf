"""Per-channel batch statistics (count, mean, biased variance) in fp32, and the shared tile helpers.

Index space. ``x`` is seen as ``[N, C, HW]`` (``HW`` = product of the spatial dims, 1 for rank 2)
in one of two dense layouts, chosen by the constexpr ``CL``:

* ``CL=False`` (NCHW-contiguous): offset ``(n*C + c)*HW + p``; HW is the contiguous dim;
* ``CL=True``  (channels_last / channels_last_3d, and ``[N, C]``): offset ``(n*HW + p)*C + c``;
  C is the contiguous dim.

A program owns a block of ``BC`` channels (``BC=1`` for NCHW) and walks 3-D tiles
``[BN samples, BP pixels, BC channels]`` of that block, so every load is a run along the
contiguous dim (``BP`` pixels for NCHW, ``BC`` channels for channels_last) and no per-element
integer division is needed. Tiles are numbered ``t = tn*Tp + tp`` (``Tp = cdiv(HW, BP)``); a
split reduction gives program ``(channel block, j)`` the tiles ``[j*TPC, (j+1)*TPC)``.
``BIG`` switches the offsets to int64 (tensors of 2^31 elements or more).

Route. ``route`` is read as uint8 ``[C]`` (``ROUTE_2D=False``) or ``[N, C]`` (``route_sn=C``).
A load masked off by the route never touches memory, which is how masked channels are skipped.

Merging. Each lane of a tile keeps a Welford accumulator (count, mean, M2) across the tiles of
its chunk; at the end of the chunk the lanes are merged with Chan's formula (``tl.reduce``).
Chunks of a channel are merged in fp32 by :func:`merge_stats_partials` from a workspace
``ws[3, P, C]`` (count, mean, M2) with the exact two-step form
``mean = Σ n_i m_i / n``, ``M2 = Σ (M2_i + n_i (m_i - mean)^2)``. Never E[x²] - E[x]².

Loops over runtime bounds are ``while`` loops: Triton 3.6's interpreter turns a runtime
``range()`` bound into a 1-element array that recent NumPy (2.4 here) refuses to convert with ``int()``.

Bytes moved (``channel_stats_kernel``): reads ``x`` once (only routed / used channels), writes
``3·P·C`` floats of partials (or ``3-4·C`` floats of final stats when ``P = 1``).
"""
from __future__ import annotations

import triton
import triton.language as tl


# ----------------------------------------------------------------------------- reductions
# The kernels call no function of Triton's own library written in Triton (tl.sum, tl.max,
# tl.zeros are `@triton.jit` functions decorated once, at `import triton`, in whatever mode
# TRITON_INTERPRET said then): only builtins and the helpers below, which are decorated with
# this copy of the module, so they always match the mode of the kernels that call them.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


INTERPRETED = type(_add).__name__ == "InterpretedFunction"  # the mode this copy was decorated in
if INTERPRETED:
    # the interpreter reduces with NumPy when it recognizes these combine functions (it never
    # calls them), and with a slow per-element Python loop otherwise
    SUM = tl.standard._sum_combine
    MAX = tl.standard._elementwise_max
else:
    SUM = _add
    MAX = _max


@triton.jit
def sum2(v):
    """Sum of a ``[A, B, C]`` tile over its first two axes: ``[C]``."""
    return tl.reduce(tl.reduce(v, 0, SUM), 0, SUM)


# ----------------------------------------------------------------------------- shared helpers
@triton.jit
def tile_offsets(t, Tp, N, C, HW, c0, CL: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
                 BC: tl.constexpr, BIG: tl.constexpr):
    """Offsets ``[BN, BP, BC]`` of tile ``t`` of the channel block starting at ``c0``, the
    in-bounds mask, and the sample / channel indices ``n3 [BN,1,1]``, ``c3 [1,1,BC]``."""
    if BIG:  # widen before any multiply: on a plane of 2^31 elements the last tile's tp * BP wraps in int32
        t = tl.full([], 0, tl.int64) + t
    tn = t // Tp
    tp = t - tn * Tp
    n = tn * BN + tl.arange(0, BN)
    p = tp * BP + tl.arange(0, BP)
    c = c0 + tl.arange(0, BC)
    if BIG:
        c = c.to(tl.int64)
    n3 = n[:, None, None]
    p3 = p[None, :, None]
    c3 = c[None, None, :]
    if CL:
        off = (n3 * HW + p3) * C + c3
    else:
        off = (n3 * C + c3) * HW + p3
    valid = (n3 < N) & (p3 < HW) & (c3 < C)
    return off, valid, n3, c3


@triton.jit
def load_route(route_ptr, route_sn, n3, c3, N, C, ROUTE_2D: tl.constexpr):
    """The route as a bool tile, ``[BN, 1, BC]`` (per sample) or ``[1, 1, BC]`` (per batch)."""
    if ROUTE_2D:
        r = tl.load(route_ptr + n3 * route_sn + c3, mask=(n3 < N) & (c3 < C), other=0)
    else:
        r = tl.load(route_ptr + c3, mask=c3 < C, other=0)
    return r != 0


@triton.jit
def load_channel(ptr, c, cmask, default, HAS: tl.constexpr, BC: tl.constexpr):
    """A per-channel fp32 vector ``[BC]`` (weight, bias, ...), or ``default`` if absent."""
    if HAS:
        v = tl.load(ptr + c, mask=cmask, other=default).to(tl.float32)
    else:
        v = tl.full([BC], 0.0, tl.float32) + default
    return v


@triton.jit
def welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.: merge two (mean, M2, count) triples."""
    n = n_a + n_b
    w = n_b / tl.maximum(n, 1.0)
    d = mean_b - mean_a
    # d * (d * (n_a * w)): d * d overflows fp32 for means above ~1.8e19, and inf * 0 (an empty lane) is NaN.
    return mean_a + d * w, m2_a + m2_b + d * (d * (n_a * w)), n


@triton.jit
def relu_keep_nan(v):
    """max(v, 0), letting NaN through like torch.relu (tl.maximum would drop it)."""
    return tl.where(v < 0.0, 0.0, v)


@triton.jit
def merge_stats_partials(ws_ptr, P, C, c, cmask, BC: tl.constexpr, BLOCK_PP: tl.constexpr):
    """Merge the ``P`` chunk partials ``ws[3, P, C]`` (count, mean, M2) of channels ``c``:
    returns (mean, biased var, count), fp32 ``[BC]``; a channel with count 0 gets 0, 0, 0."""
    j = tl.arange(0, BLOCK_PP)[:, None]
    cc = c[None, :]
    cm = cmask[None, :]
    total = tl.full([BC], 0.0, tl.float32)
    s = tl.full([BC], 0.0, tl.float32)
    j0 = 0
    while j0 < P:  # a while loop: see the stats.py docstring
        m = (j0 + j < P) & cm
        o = (j0 + j) * C + cc
        cnt = tl.load(ws_ptr + o, mask=m, other=0.0)
        mu = tl.load(ws_ptr + P * C + o, mask=m, other=0.0)
        total += tl.reduce(cnt, 0, SUM)
        s += tl.reduce(cnt * mu, 0, SUM)
        j0 += BLOCK_PP
    safe = tl.maximum(total, 1.0)
    mean = s / safe
    m2 = tl.full([BC], 0.0, tl.float32)
    j0 = 0
    while j0 < P:  # a while loop: see the stats.py docstring
        m = (j0 + j < P) & cm
        o = (j0 + j) * C + cc
        cnt = tl.load(ws_ptr + o, mask=m, other=0.0)
        mu = tl.load(ws_ptr + P * C + o, mask=m, other=0.0)
        q = tl.load(ws_ptr + 2 * P * C + o, mask=m, other=0.0)
        d = mu - mean[None, :]
        m2 += tl.reduce(q + cnt * d * d, 0, SUM)
        j0 += BLOCK_PP
    return mean, m2 / safe, total


# ----------------------------------------------------------------------------- kernels
@triton.jit
def channel_stats_kernel(
        x_ptr, route_ptr, used_ptr, ws_ptr, mean_ptr, var_ptr, count_ptr, invstd_ptr,
        N, C, HW, route_sn, Tp, T, TPC, P, eps,
        CL: tl.constexpr, ROUTE_2D: tl.constexpr, ROUTED: tl.constexpr,
        SKIP_UNUSED: tl.constexpr, FINAL: tl.constexpr, WRITE_INVSTD: tl.constexpr,
        BN: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, BIG: tl.constexpr):
    """Grid ``(cdiv(C, BC), P)``: program ``(cb, j)`` reduces its chunk of tiles of channel
    block ``cb``.

    ``ROUTED``: a value counts only where its sample is routed through its channel.
    ``SKIP_UNUSED``: channels with ``used[c] == 0`` are not read (count 0); a block with no used
    channel skips its loop. ``FINAL`` (``P == 1``): write mean / var / count (/ invstd)
    directly; otherwise write the chunk's (count, mean, M2) to ``ws[:, j, :]``.
    """
    pid_c = tl.program_id(0)
    pid_j = tl.program_id(1)
    c0 = pid_c * BC
    c = c0 + tl.arange(0, BC)
    cmask = c < C
    t0 = pid_j * TPC
    t1 = tl.minimum(t0 + TPC, T)
    if SKIP_UNUSED:
        used = tl.load(used_ptr + c, mask=cmask, other=0) != 0
        t1 = tl.where(tl.reduce(used.to(tl.int32), 0, MAX) > 0, t1, t0)
        used3 = used[None, None, :]
    acc_mean = tl.full([BN, BP, BC], 0.0, tl.float32)
    acc_m2 = tl.full([BN, BP, BC], 0.0, tl.float32)
    acc_n = tl.full([BN, BP, BC], 0.0, tl.float32)
    t = t0
    while t < t1:  # a while loop: see the stats.py docstring
        off, valid, n3, c3 = tile_offsets(t, Tp, N, C, HW, c0, CL, BN, BP, BC, BIG)
        sel = valid
        if ROUTED:
            sel = sel & load_route(route_ptr, route_sn, n3, c3, N, C, ROUTE_2D)
        if SKIP_UNUSED:
            sel = sel & used3
        xv = tl.load(x_ptr + off, mask=sel, other=0.0).to(tl.float32)
        acc_n += sel.to(tl.float32)
        d = xv - acc_mean
        acc_mean += tl.where(sel, d / tl.maximum(acc_n, 1.0), 0.0)
        acc_m2 += tl.where(sel, d * (xv - acc_mean), 0.0)
        t += 1
    mean, m2, cnt = tl.reduce((acc_mean, acc_m2, acc_n), 0, welford_combine)
    mean, m2, cnt = tl.reduce((mean, m2, cnt), 0, welford_combine)
    if FINAL:
        var = m2 / tl.maximum(cnt, 1.0)
        tl.store(mean_ptr + c, mean, mask=cmask)
        tl.store(var_ptr + c, var, mask=cmask)
        tl.store(count_ptr + c, cnt, mask=cmask)
        if WRITE_INVSTD:
            tl.store(invstd_ptr + c, tl.rsqrt(var + eps), mask=cmask)
    else:
        o = pid_j * C + c
        tl.store(ws_ptr + o, cnt, mask=cmask)
        tl.store(ws_ptr + P * C + o, mean, mask=cmask)
        tl.store(ws_ptr + 2 * P * C + o, m2, mask=cmask)


@triton.jit
def stats_finalize_kernel(ws_ptr, mean_ptr, var_ptr, count_ptr, invstd_ptr, P, C, eps,
                          WRITE_INVSTD: tl.constexpr, BC: tl.constexpr, BLOCK_PP: tl.constexpr):
    """Grid ``(cdiv(C, BC),)``: merge ``ws[3, P, C]`` into mean / var / count (/ invstd).
    Moves ``3·P·C`` floats in, ``3-4·C`` out."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    cmask = c < C
    mean, var, cnt = merge_stats_partials(ws_ptr, P, C, c, cmask, BC, BLOCK_PP)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(var_ptr + c, var, mask=cmask)
    tl.store(count_ptr + c, cnt, mask=cmask)
    if WRITE_INVSTD:
        tl.store(invstd_ptr + c, tl.rsqrt(var + eps), mask=cmask)
