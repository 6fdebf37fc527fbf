"""MultiTaskDataset: images with one binary label per task, task names and the official splits."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["MultiTaskDataset", "DatasetFormatError", "one_vs_rest", "require_file", "require_root",
           "split_indices", "read_rows", "to_int", "first_seen", "unique_names"]


class DatasetFormatError(ValueError):
    """A dataset file exists but does not hold what its format says it should."""

    def __init__(self, path, message: str, line: int | None = None):
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")


def require_root(root, dataset: str, expected: str) -> Path:
    """``root`` as a Path; a clear error when it is missing or not a folder."""
    if root is None:
        raise ValueError(f"{dataset} is read from files you already have: pass root=<folder> "
                         f"(the folder holding {expected})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{dataset}: root {str(root)!r} is not a folder (expected it to hold {expected})")
    return root


def require_file(path: Path, dataset: str, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: expected {what} at {str(path)!r}, but there is no such file")
    return path


def read_rows(path: Path, min_fields: int, what: str, skip: int = 0):
    """Yield ``(line_number, fields)`` of a whitespace-separated text file, blank lines skipped;
    a DatasetFormatError when a row has fewer than ``min_fields`` fields."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if number <= skip:
                continue
            fields = line.split()
            if not fields:
                continue
            if len(fields) < min_fields:
                raise DatasetFormatError(path, f"expected {what} ({min_fields} fields), got {line.strip()!r}", number)
            yield number, fields


def to_int(text: str, path: Path, line: int, allowed=None) -> int:
    """``int(text)``, or a DatasetFormatError naming the file and line."""
    try:
        value = int(text)
    except ValueError:
        raise DatasetFormatError(path, f"expected an integer, got {text!r}", line) from None
    if allowed is not None and value not in allowed:
        raise DatasetFormatError(path, f"expected one of {sorted(allowed)}, got {value}", line)
    return value


def first_seen(seen: dict, key, path: Path, line: int, what: str) -> None:
    """Record that ``key`` is on ``line`` of ``path``; a DatasetFormatError when an earlier line had it."""
    if key in seen:
        raise DatasetFormatError(path, f"duplicate {what} {key!r} (first on line {seen[key]})", line)
    seen[key] = line


def unique_names(names: Sequence[str], path: Path, line: int, what: str = "task name") -> list[str]:
    """``names`` (one line's fields) as a list; a DatasetFormatError naming the first repeated one."""
    seen = {}
    for column, name in enumerate(names, start=1):
        if name in seen:
            raise DatasetFormatError(path, f"duplicate {what} {name!r} (fields {seen[name]} and {column})", line)
        seen[name] = column
    return list(names)


def one_vs_rest(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ids ``[N]`` → uint8 labels ``[N, num_classes]``: task k is "is it class k?"."""
    return torch.nn.functional.one_hot(classes.long(), num_classes).to(torch.uint8)


def split_indices(split_ids: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-sample split ids ``[N]`` (0, 1, ...) → {name: indices}, names in id order; empty splits dropped."""
    splits = {name: torch.nonzero(split_ids == k).flatten() for k, name in enumerate(names)}
    return {name: idx for name, idx in splits.items() if idx.numel()}


class MultiTaskDataset(torch.utils.data.Dataset):
    """N images, each with a binary label for each of T tasks.

    Args:
        images: ``[N, C, H, W]`` float tensor (values used as they are), ``uint8`` tensor (read
            as value/255), or an ``ImageFiles`` (decoded from disk on access, as uint8).
        labels: ``[N, T]`` tensor of 0/1; NaN (in a float tensor) marks a missing label, which
            ``labels`` then holds as 0 and ``known`` as False (``targets`` gives NaN back).
        task_names: T names.
        splits: ``{"train": indices, "val": ..., "test": ...}``, the official partition.
        name: the dataset's name.
        hflip: whether random horizontal flips suit these images (the training loop applies them).
        mean: per-channel mean subtracted from every image (the paper's mean normalisation);
            when None it is computed on the ``train`` split on first use.
        mean_samples: at most this many evenly spaced train images estimate the mean of images
            decoded from disk (in-memory images use all of them).

    ``dataset[i]`` is ``(image [C, H, W] float32, labels [T] float32)``; ``get_batch(indices)``
    returns the same for many samples at once without a DataLoader.
    """

    def __init__(self, images, labels: torch.Tensor, task_names: Sequence[str],
                 splits: dict[str, torch.Tensor], *, name: str, hflip: bool = False,
                 mean: torch.Tensor | None = None, mean_samples: int = 1000):
        if len(images) != labels.shape[0]:
            raise ValueError(f"{name}: {len(images)} images but {labels.shape[0]} label rows")
        if labels.dim() != 2 or labels.shape[1] != len(task_names):
            raise ValueError(f"{name}: labels must be [N, {len(task_names)}], got {tuple(labels.shape)}")
        missing = labels.isnan() if labels.is_floating_point() else torch.zeros(labels.shape, dtype=torch.bool)
        if labels.numel() and not bool(((labels == 0) | (labels == 1) | missing).all()):
            raise ValueError(f"{name}: labels must be 0 or 1 (or NaN for a missing label)")
        repeated = sorted({t for t in task_names if list(task_names).count(t) > 1})
        if repeated:
            raise ValueError(f"{name}: duplicate task name {repeated[0]!r}; task names must be unique")
        self.images = images
        self.labels = labels.nan_to_num(0).to(torch.uint8) if missing.any() else labels.to(torch.uint8)
        self.known = ~missing if missing.any() else None  # None: every label is known
        self.task_names = list(task_names)
        self.splits = {k: torch.as_tensor(v, dtype=torch.long) for k, v in splits.items()}
        self.name, self.hflip, self.mean_samples = name, hflip, mean_samples
        self._mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def targets(self) -> torch.Tensor:
        """Labels ``[N, T]`` as float32, NaN where a label is missing."""
        return self._targets(torch.arange(len(self)))

    def _targets(self, indices: torch.Tensor) -> torch.Tensor:
        labels = self.labels[indices].float()
        return labels if self.known is None else labels.masked_fill(~self.known[indices], math.nan)

    @property
    def num_tasks(self) -> int:
        return self.labels.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:]) if self.in_memory else tuple(self.images.shape)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.images, torch.Tensor)

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean ``[C]`` of the train split (all samples if there is no train split)."""
        if self._mean is None:
            index = self.splits.get("train", torch.arange(len(self)))
            if not self.in_memory and index.numel() > self.mean_samples:
                index = index[torch.linspace(0, index.numel() - 1, self.mean_samples).long()]
            total, count = None, 0
            for chunk in index.split(512):
                part = self._raw(chunk).double().sum(dim=(0, 2, 3))
                total = part if total is None else total + part
                count += chunk.numel()
            channels = self.image_shape[0]
            self._mean = (torch.zeros(channels, dtype=torch.float64) if total is None else
                          total / (count * self.image_shape[1] * self.image_shape[2])).float()
        return self._mean

    def _raw(self, indices) -> torch.Tensor:
        """Images ``[B, C, H, W]`` as float32, before mean subtraction."""
        if self.in_memory:
            images = self.images[torch.as_tensor(indices, dtype=torch.long)]
        else:
            images = torch.stack([self.images[int(i)] for i in indices]) if len(indices) else \
                torch.empty(0, *self.images.shape, dtype=torch.uint8)
        return images.float() / 255 if images.dtype == torch.uint8 else images.float()

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images [B, C, H, W] minus the mean, labels [B, T] float32, NaN if missing)`` for ``indices``."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        x = self._raw(indices) - self.mean.view(1, -1, 1, 1)
        return x, self._targets(indices)

    def __getitem__(self, index: int):
        x, y = self.get_batch([index])
        return x[0], y[0]

    def subset(self, indices, splits: dict[str, torch.Tensor] | None = None) -> MultiTaskDataset:
        """The samples ``indices`` (same tasks, same mean), with ``splits`` over the new positions."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[indices] if self.in_memory else self.images.subset(indices)
        return MultiTaskDataset(images, self._targets(indices), self.task_names,
                                splits if splits is not None else {"all": torch.arange(indices.numel())},
                                name=self.name, hflip=self.hflip, mean=self.mean,
                                mean_samples=self.mean_samples)

    def split(self, name: str) -> MultiTaskDataset:
        """The samples of one split, as a dataset of their own (normalised with the train mean)."""
        if name not in self.splits:
            raise KeyError(f"{self.name} has no {name!r} split; it has {sorted(self.splits)}")
        return self.subset(self.splits[name], {name: torch.arange(self.splits[name].numel())})

    def select_tasks(self, tasks) -> MultiTaskDataset:
        """Keep some tasks: an int k (the first k, in file order), or a sequence of names or indices."""
        if isinstance(tasks, int) and not isinstance(tasks, bool):
            if not 1 <= tasks <= self.num_tasks:
                raise ValueError(f"tasks={tasks}: {self.name} has {self.num_tasks} tasks")
            columns = list(range(tasks))
        elif isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
            raise TypeError(f"tasks must be an int or a sequence of task names/indices, got {tasks!r}")
        else:
            columns = [self._task_column(t) for t in tasks]
            if not columns:
                raise ValueError("tasks must name at least one task")
        return MultiTaskDataset(self.images, self.targets[:, columns], [self.task_names[c] for c in columns],
                                self.splits, name=self.name, hflip=self.hflip, mean=self._mean,
                                mean_samples=self.mean_samples)

    def _task_column(self, task) -> int:
        if isinstance(task, str):
            if task not in self.task_names:
                raise ValueError(f"{self.name} has no task {task!r}; tasks: {', '.join(self.task_names)}")
            return self.task_names.index(task)
        if isinstance(task, int) and not isinstance(task, bool) and -self.num_tasks <= task < self.num_tasks:
            return task % self.num_tasks
        raise ValueError(f"task {task!r} is neither a task name nor an index below {self.num_tasks}")

    def positive_rate(self) -> torch.Tensor:
        """Fraction of positives per task ``[T]`` among the known labels (NaN for a task with none)."""
        return self.targets.nanmean(0) if len(self) else torch.zeros(self.num_tasks)

    def __repr__(self) -> str:
        splits = ", ".join(f"{k}={v.numel()}" for k, v in self.splits.items())
        return (f"MultiTaskDataset({self.name!r}, samples={len(self)}, tasks={self.num_tasks}, "
                f"image_shape={self.image_shape}, splits: {splits})")

