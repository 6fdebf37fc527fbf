"""Training under ``torchrun``: one process per device, DistributedDataParallel, synced routed BatchNorm.

``setup`` joins the process group that ``torchrun`` describes in the environment (gloo for CPU
devices, NCCL for CUDA, each process on ``cuda:LOCAL_RANK``); without it (``WORLD_SIZE`` unset or 1)
nothing here does anything and training runs in one process exactly as before.

Every process draws the same epoch plan (``epoch_plan`` is a pure function of seed and epoch), so
each step trains the same task everywhere; each global batch is split into one contiguous shard
per process (uneven and empty shards allowed). The loss of a shard is its sum scaled by
``world_size / global_batch``, so DDP's gradient average is the gradient of the global batch
mean. BatchNorm layers are synchronised (``convert_sync_batchnorm``) and masks are never
re-broadcast (``broadcast_buffers=False``: they are fixed, and the running statistics agree
because every process normalises with the same global statistics). Rank 0 alone logs and writes
checkpoints; a checkpoint holds the unwrapped model, so it resumes with any world size. Every
process evaluates the whole evaluation set with its own (identical) model and local statistics,
so the metrics are those of one process, printed once.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..nn import convert_sync_batchnorm
from ..nn.sync_bn_relu_route import world_size
from .config import TrainConfig

__all__ = ["setup", "active", "is_main", "prepare_model", "Shard", "shard", "local_statistics", "unwrap"]

_LOCAL_GROUP: list = []  # this process's one-rank group, for evaluation with local statistics


def _local_group():
    """This process's one-rank group; created (collectively: every process calls this) on first use."""
    if not _LOCAL_GROUP:
        _LOCAL_GROUP.append(dist.new_subgroups(1)[0])
    return _LOCAL_GROUP[0]


def _env_world_size() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"WORLD_SIZE must be a positive int, got {value!r}")
    return int(value)


def setup(config: TrainConfig) -> TrainConfig:
    """Join torchrun's process group (once) and return ``config`` with this process's device."""
    if _env_world_size() == 1:
        return config
    device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"multi-process training runs on cpu or cuda devices, got device={config.device!r}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return dataclasses.replace(config, device=str(device))


def active() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return not active() or dist.get_rank() == 0


def prepare_model(model: nn.Module, config: TrainConfig) -> nn.Module:
    """``model`` itself in one process; else its BatchNorm layers synced, wrapped in DDP."""
    if not active():
        return model
    device = torch.device(config.device)
    return nn.parallel.DistributedDataParallel(convert_sync_batchnorm(model),
                                               device_ids=[device.index] if device.type == "cuda" else None,
                                               **_NO_BUFFER_SYNC)


# Buffers are not re-broadcast at each forward; the name of that option changed in torch 2.13 (the old one warns).
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Shard:
    """This process's part of each batch of an epoch plan, and the loss that makes DDP's average
    the gradient of the whole batch's mean loss."""

    def __init__(self, batches, flips):
        self.world, rank = world_size(), dist.get_rank()
        self.sizes = [b.numel() for b in batches]
        self.batches = [b.tensor_split(self.world)[rank] for b in batches]
        self.flips = [f.tensor_split(self.world)[rank] for f in flips]

    def loss(self, logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") * (self.world / self.sizes[k])

    def loss_weight(self, k: int) -> float:
        """What ``float(loss) * loss_weight(k)`` adds up to over an epoch: the shard's summed loss."""
        return self.sizes[k] / self.world

    def totals(self, total_loss: float, samples: int) -> tuple[float, int]:
        """The epoch's summed loss and samples over every process."""
        both = torch.tensor([total_loss, float(samples)], dtype=torch.float64)
        dist.all_reduce(both)
        return both[0].item(), int(both[1].item())


def shard(batches, flips) -> Shard | None:
    """This process's ``Shard`` of an epoch plan; None in one process."""
    return Shard(batches, flips) if active() else None


@contextlib.contextmanager
def local_statistics(model: nn.Module):
    """Synced BatchNorm layers use this process's batches alone inside the block (evaluation)."""
    layers = [m for m in model.modules() if hasattr(m, "process_group") and
              isinstance(m, (nn.SyncBatchNorm, nn.modules.batchnorm._NormBase))]
    if not active() or not layers:
        yield
        return
    groups, local = [m.process_group for m in layers], _local_group()
    for m in layers:
        m.process_group = local
    try:
        yield
    finally:
        for m, group in zip(layers, groups):
            m.process_group = group
