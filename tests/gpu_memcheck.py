"""Runs every CUDA op of taskrouting (bn_add_relu_route too) on a few small, awkward cases, for compute-sanitizer:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
        python tests/gpu_memcheck.py

(tests/test_cuda_kernels.py::test_memcheck does exactly this.) Without the caching allocator every tensor
is its own allocation, so a read or write one element past a tensor is reported. The cases cover
both layouts, every dtype, vectorised and scalar paths, per-batch and per-sample routes, empty
batches, N = 1, C = 1, H*W = 1, the split reduction with its merge kernel and the fused
one-block-per-channel kernel. Prints "gpu_memcheck: ok" at the end.
"""
from __future__ import annotations

import sys

import torch

import taskrouting  # noqa: F401  (registers the ops)
from taskrouting import ops

TR = torch.ops.taskrouting


def layout(x, channels_last):
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


def exercise(shape, dtype, channels_last, per_sample, offset=False):
    dev = "cuda"
    n, c = shape[0], shape[1]
    numel = 1
    for s in shape:
        numel *= s
    x = layout(torch.randn(shape, device=dev).to(dtype), channels_last)
    if offset:  # the same layout one element into a larger storage: misaligned for vector loads
        base = torch.empty(numel + 1, device=dev, dtype=dtype)
        x = base[1:].as_strided(x.shape, x.stride()).copy_(x)
        assert x.storage_offset() == 1 and (not channels_last or x.is_contiguous(memory_format=torch.channels_last))
    dy = layout(torch.randn(shape, device=dev).to(dtype), channels_last)
    r = layout(torch.randn(shape, device=dev).to(dtype), channels_last)  # bn_add_relu_route's residual
    if offset:
        r = torch.empty(numel + 1, device=dev, dtype=dtype)[1:].as_strided(r.shape, r.stride()).copy_(r)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if per_sample:
        route = torch.rand(n, c, device=dev) < 0.5
    else:
        route = torch.rand(c, device=dev) < 0.5
        route[0] = True
    w, b = torch.randn(c, device=dev), torch.randn(c, device=dev)
    rm, rv = torch.randn(c, device=dev), torch.rand(c, device=dev) + 0.5
    for routed, all_channels in ((False, True), (False, False), (True, False)):
        if numel // max(c, 1) > 1 or n == 0:
            y, mean, invstd, var, count = TR.bn_relu_route(x, route, w, b, rm, rv, True, 1e-5, routed, all_channels)
            for training in (True, False):
                cnt = count if training else count[:0]
                TR.bn_relu_route_backward(dy, x, route, w, b, mean, invstd, cnt, training, routed,
                                          [True, True, True])
                TR.bn_relu_route_backward(dy, x, route, None, None, mean, invstd, cnt, training, routed,
                                          [True, False, False])
                TR.backward_apply(dy, x, route, mean, invstd, w, b, mean, invstd, cnt, training, routed)
            TR.update_running_stats(rm.clone(), rv.clone(), mean, var, count, 0.1)
            y, mean, invstd, var, count = TR.bn_add_relu_route(x, r, route, w, b, rm, rv, True, 1e-5, routed,
                                                               all_channels)
            for training in (True, False):
                cnt = count if training else count[:0]
                for mask in ([True] * 4, [True, False, True, True], [True, True, False, False],
                             [False, True, False, False], [False, True, True, True]):
                    TR.bn_add_relu_route_backward(dy, y, x, route, w, b, mean, invstd, cnt, training, routed, mask)
        TR.channel_stats(x, route, routed, all_channels)
    y, mean, invstd, _, _ = TR.bn_relu_route(x, route, w, b, rm, rv, False, 1e-5, False, False)
    TR.normalize_relu_route(x, route, mean, invstd, None, b)
    TR.bn_add_relu_route(x, r, route, w, b, rm, rv, False, 1e-5, False, False)
    TR.backward_reduce(dy, x, route, mean.to(acc), invstd.to(acc), w, None)
    torch.cuda.synchronize()


def main() -> int:
    if not torch.cuda.is_available() or not ops.NATIVE_KERNELS.get("cuda"):
        print("gpu_memcheck: no CUDA GPU or no CUDA kernels; nothing to check")
        return 0
    shapes = [(4, 6, 5, 7), (3, 5), (6, 3, 11), (2, 4, 3, 3, 2), (1, 16, 8, 8), (9, 1, 4, 4), (8, 5, 1, 1),
              (0, 4, 3, 3), (0, 4), (2, 24, 3, 5), (5, 7, 9), (2, 3, 160, 160), (1, 2, 3, 40001),
              (3, 40, 6, 6), (4, 600, 3, 3), (2, 8, 4, 4, 4)]
    # float32 takes every case; the other dtypes (other vector widths) a few (memcheck is slow)
    few = [(1, 16, 8, 8), (5, 7, 9), (2, 24, 3, 5), (0, 4, 3, 3), (2, 3, 160, 160), (4, 600, 3, 3)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for shape in shapes if dtype == torch.float32 else few:
            for channels_last in (False, True):
                for per_sample in (False, True):
                    exercise(shape, dtype, channels_last, per_sample)
        exercise((4, 16, 8, 8), dtype, False, True, offset=True)
        exercise((4, 16, 8, 8), dtype, True, False, offset=True)
    print("gpu_memcheck: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
