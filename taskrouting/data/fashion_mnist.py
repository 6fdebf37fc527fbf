"""``fashionmnist``: Fashion-MNIST from its IDX files, as 10 one-vs-rest tasks.

Expected under ``root`` (or ``root/FashionMNIST/raw``, torchvision's layout), each file plain or
gzipped (``.gz``)::

    train-images-idx3-ubyte   train-labels-idx1-ubyte
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import DatasetFormatError, MultiTaskDataset, one_vs_rest, require_root

__all__ = ["load_fashion_mnist", "read_idx"]

NAME = "fashionmnist"
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle_boot")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions (gzipped when it ends in .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetFormatError(path, f"cannot read: {exc}") from None
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise DatasetFormatError(path, f"not an IDX file of unsigned bytes with {ndim} dimensions "
                                       f"(expected the magic number 0x0000080{ndim})")
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4")) if len(data) >= header else ()
    if len(shape) != ndim or len(data) - header != int(np.prod(shape)):
        raise DatasetFormatError(path, f"header says shape {shape} but the file holds {len(data) - header} "
                                       f"bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"{NAME}: expected {stem} (or {stem}.gz) in {str(root)!r} or "
                            f"{str(root / 'FashionMNIST' / 'raw')!r}, but found neither")


def load_fashion_mnist(root=None, image_size: int = 28) -> MultiTaskDataset:
    """60000 train and 10000 test 28x28 grayscale images (resized when ``image_size`` != 28)."""
    root = require_root(root, NAME, "the four IDX files (train/t10k images and labels)")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"), 3)
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), 1)
        if images.shape[0] != labels.shape[0]:
            raise DatasetFormatError(root, f"{prefix}: {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.size and labels.max() >= len(CLASSES):
            raise DatasetFormatError(root, f"{prefix} labels must be 0..9, found {labels.max()}")
        parts[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    images = torch.cat([parts["train"][0], parts["test"][0]])
    if image_size != images.shape[-1]:
        images = F.interpolate(images.float() / 255, size=(image_size, image_size), mode="bilinear",
                               align_corners=False)
    classes = torch.cat([parts["train"][1], parts["test"][1]])
    num_train = parts["train"][1].numel()
    splits = {"train": torch.arange(num_train), "test": torch.arange(num_train, classes.numel())}
    return MultiTaskDataset(images, one_vs_rest(classes, len(CLASSES)), list(CLASSES), splits, name=NAME)
