"""The batches of an epoch (one task per batch) and how they are read."""
from __future__ import annotations

import torch

from ..data import MultiTaskDataset

__all__ = ["epoch_plan", "labelled", "batch_loader", "progress_bar", "TASK_SAMPLING"]


TASK_SAMPLING = ("uniform", "round-robin")


def epoch_plan(num_samples: int, num_tasks: int, batch_size: int, seed: int, epoch: int,
               task_sampling: str = "uniform"):
    """Batches of sample indices, one task per batch and flip flags for epoch ``epoch``: a pure
    function of its arguments. A final batch of one sample is dropped (BatchNorm needs two).
    Tasks: drawn uniformly per batch (the paper), or ``round-robin``: 0, 1, ..., T-1, 0, ...
    continued from where the previous epoch stopped."""
    if task_sampling not in TASK_SAMPLING:
        raise ValueError(f"task_sampling must be one of {', '.join(TASK_SAMPLING)}, got {task_sampling!r}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = list(torch.randperm(num_samples, generator=g).split(batch_size))
    if batches and batches[-1].numel() < 2:
        batches.pop()
    tasks = torch.randint(num_tasks, (len(batches),), generator=g).tolist()  # drawn either way: same flips
    if task_sampling == "round-robin":
        tasks = [(epoch * len(batches) + k) % num_tasks for k in range(len(batches))]
    flips = [torch.rand(b.numel(), generator=g) < 0.5 for b in batches]
    return batches, tasks, flips


def labelled(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of a batch whose label (``target`` [B], NaN = missing) is known."""
    known = ~target.isnan()
    return (x, target) if bool(known.all()) else (x[known], target[known])


class BatchDataset(torch.utils.data.Dataset):
    """Item k is the whole k-th batch, so DataLoader workers can decode batches in parallel."""

    def __init__(self, data: MultiTaskDataset, batches):
        self.data, self.batches = data, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return self.data.get_batch(self.batches[k])


def batch_loader(data: MultiTaskDataset, batches, num_workers: int):
    if num_workers == 0:
        return (data.get_batch(b) for b in batches)
    return torch.utils.data.DataLoader(BatchDataset(data, batches), batch_size=None, num_workers=num_workers)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar, or a silent stand-in when tqdm (the ``train`` extra) is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass
