"""The memory layout every backend computes in and returns, one rule for kernels and fake kernels alike.

The kernels run on two dense layouts: NCHW-contiguous, and channels-last (C innermost, 4-D and
5-D). An input in neither (a permuted-dense view such as ``x.transpose(2, 3)``, or a
non-dense view) is copied once to contiguous, and the outputs are allocated like the tensor the
kernels read. The fake kernels must return those strides exactly: inductor asserts them, and
allocating outputs in x's own permuted layout instead would cost an extra pass.
"""
from __future__ import annotations

import torch

__all__ = ["is_channels_last_dense", "in_kernel_layout", "kernel_input", "empty_output", "output_strides"]


def is_channels_last_dense(x: torch.Tensor) -> bool:
    """channels_last (4-D) or channels_last_3d (5-D) and not also contiguous: the compiled kernels'
    rows layout (``csrc/bn_relu_route_checks.h: layout_of``). A 3-D ``[N, L, C]``-major input is
    copied to contiguous, like any other layout."""
    return x.dim() in (4, 5) and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def in_kernel_layout(x: torch.Tensor) -> bool:
    return x.is_contiguous() or is_channels_last_dense(x)


def kernel_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernels read it: itself when in a kernel layout, else a contiguous copy."""
    return x if in_kernel_layout(x) else x.contiguous()


def empty_output(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized tensor of x's shape with the strides every backend returns for ``x``."""
    if in_kernel_layout(x):
        return torch.empty_like(x, dtype=dtype)
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)


def output_strides(x: torch.Tensor) -> tuple[int, ...]:
    """The strides of :func:`empty_output` for ``x``, allocating nothing."""
    return empty_output(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")).stride()
