"""Task masks: how they are drawn and checked."""
from __future__ import annotations

import math
import numbers

import torch

from ..ops.checks import check_positive_int

__all__ = ["make_masks", "check_masks", "check_sharing_ratio", "check_seed", "active_per_task", "build_masks"]


def active_per_task(num_channels: int, sharing_ratio: float) -> int:
    """Channels each task keeps: round(σ·C) rounded half up, at least 1."""
    return max(1, int(math.floor(sharing_ratio * num_channels + 0.5)))


def check_sharing_ratio(sharing_ratio) -> float:
    if isinstance(sharing_ratio, bool) or not isinstance(sharing_ratio, numbers.Real):
        raise TypeError(f"sharing_ratio must be a real number in [0, 1], got {sharing_ratio!r}")
    sharing_ratio = float(sharing_ratio)
    if not 0.0 <= sharing_ratio <= 1.0:
        raise ValueError(f"sharing_ratio must be in [0, 1], got {sharing_ratio}")
    return sharing_ratio


def make_masks(num_tasks: int, num_channels: int, sharing_ratio: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Random fixed task masks, bool ``[num_tasks, num_channels]``.

    ``sharing_ratio`` σ is the fraction of channels each task keeps (σ = 1: every
    channel shared; σ = 0: channels split into disjoint balanced groups, one per task).
    The same ``generator`` state gives the same masks on every machine.
    """
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    num_channels = check_positive_int(num_channels, "num_channels")
    sharing_ratio = check_sharing_ratio(sharing_ratio)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (masks are drawn on the CPU)")

    masks = torch.zeros(num_tasks, num_channels, dtype=torch.bool)
    if sharing_ratio == 0.0:
        if num_tasks > num_channels:
            raise ValueError(
                f"sharing_ratio=0 splits the channels into disjoint groups, one per task: "
                f"num_tasks={num_tasks} is more than num_channels={num_channels}")
        perm = torch.randperm(num_channels, generator=generator)
        owner = torch.arange(num_channels) % num_tasks  # balanced: sizes differ by at most 1
        masks[owner, perm] = True
        return masks
    keep = active_per_task(num_channels, sharing_ratio)
    order = torch.rand(num_tasks, num_channels, generator=generator).argsort(dim=1)
    masks.scatter_(1, order[:, :keep], True)
    return masks


def check_masks(masks, num_channels: int | None = None) -> torch.Tensor:
    """Validate user masks: a bool ``[T, C]`` tensor with at least one channel per task."""
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks must be a torch.Tensor, got {type(masks).__name__}")
    if masks.dim() != 2:
        raise ValueError(f"masks must have shape [num_tasks, num_channels], got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError(f"masks must be binary (bool, or exactly 0/1 values), got dtype {masks.dtype} "
                             f"with other values")
        masks = masks != 0
    if masks.shape[0] < 1 or masks.shape[1] < 1:
        raise ValueError(f"masks must have at least one task and one channel, got {tuple(masks.shape)}")
    if num_channels is not None and masks.shape[1] != num_channels:
        raise ValueError(f"masks have {masks.shape[1]} channels but num_channels={num_channels}")
    empty = (~masks.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"masks: every task needs at least one active channel; "
                         f"task(s) {empty[:8].tolist()} have none")
    return masks


def check_seed(seed):
    """``seed`` as ``torch.Generator.manual_seed`` takes it: None, or an int that fits in 64 bits."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"seed must fit in 64 bits (in [-2**63, 2**64)), got {seed}")
    return int(seed)


def build_masks(num_channels: int, num_tasks: int, sharing_ratio: float, seed, masks) -> torch.Tensor:
    """Masks from the user, or drawn from ``seed`` (or torch's global RNG when seed is None)."""
    if masks is not None:
        masks = check_masks(masks, num_channels)
        if num_tasks is not None and masks.shape[0] != num_tasks:
            raise ValueError(f"masks have {masks.shape[0]} tasks but num_tasks={num_tasks}")
        return masks.detach().clone()
    if num_tasks is None:
        raise ValueError("num_tasks is required when masks are not given")
    seed = check_seed(seed)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return make_masks(num_tasks, num_channels, sharing_ratio, generator=generator)
