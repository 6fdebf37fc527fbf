"""``cifar10``: CIFAR-10 from its Python pickles, as 10 one-vs-rest tasks.

Expected under ``root`` (or ``root/cifar-10-batches-py``, the folder the release unpacks to)::

    data_batch_1 ... data_batch_5   train: dicts with b"data" (uint8 [10000, 3072]) and b"labels"
    test_batch                      test: the same
    batches.meta                    optional: b"label_names"

The pickles are read with an unpickler that only builds dicts, lists and numpy arrays.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .base import DatasetFormatError, MultiTaskDataset, one_vs_rest, require_file, require_root, unique_names

__all__ = ["load_cifar10"]

NAME = "cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR batches hold only arrays")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetFormatError(path, f"not a CIFAR-10 python pickle: {exc}") from None
    if not isinstance(batch, dict):
        raise DatasetFormatError(path, f"expected a pickled dict, got {type(batch).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise DatasetFormatError(path, "expected the keys b'data' and b'labels'")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(path, f"b'labels' must be integers 0..9, got {labels.dtype} values such as "
                                       f"{labels.flat[0]!r}")
    labels = labels.astype(np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise DatasetFormatError(path, f"b'data' must be uint8 [N, 3072] with N labels, got {data.dtype} "
                                       f"{data.shape} and {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DatasetFormatError(path, "labels must be 0..9")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar10(root=None) -> MultiTaskDataset:
    """50000 train and 10000 test 32x32 colour images; ``hflip`` on."""
    root = require_root(root, NAME, "data_batch_1..5, test_batch (cifar-10-batches-py)")
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    batches = [_read_batch(require_file(root / n, NAME, f"the pickle {n}")) for n in names]
    images = torch.cat([b[0] for b in batches])
    classes = torch.cat([b[1] for b in batches])
    num_train = sum(b[1].numel() for b in batches[:5])
    task_names = list(CLASSES)
    if (root / "batches.meta").is_file():
        meta = _unpickle(root / "batches.meta").get("label_names")
        if meta is not None and len(meta) == len(CLASSES):
            task_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta]
            unique_names(task_names, root / "batches.meta", None, "label name")
    splits = {"train": torch.arange(num_train), "test": torch.arange(num_train, classes.numel())}
    return MultiTaskDataset(images, one_vs_rest(classes, len(CLASSES)), task_names, splits, name=NAME, hflip=True)
