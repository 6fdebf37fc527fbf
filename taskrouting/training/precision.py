"""Mixed precision and memory layout of a run: autocast (``amp``), the fp16 gradient scaler, channels_last."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["AMP", "autocast", "grad_scaler", "in_layout", "model_in_layout"]

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: str | None, device: str):
    """``torch.autocast`` for ``amp`` ("bf16", "fp16") on ``device``'s type, or nothing when ``amp`` is None.
    The fused layers take the convolutions' half outputs as they are (fp32 parameters and statistics)."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP[amp])


def grad_scaler(amp: str | None, device: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (a disabled scaler, a pass-through, otherwise)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=amp == "fp16")


def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def model_in_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if channels_last else model
