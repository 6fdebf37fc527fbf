"""``digits``: scikit-learn's bundled 8x8 handwritten digits (no download) as 10 one-vs-rest tasks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..extras import require
from .base import MultiTaskDataset, one_vs_rest

__all__ = ["load_digits"]


def load_digits(root=None, image_size: int = 32, test_every: int = 5) -> MultiTaskDataset:
    """1797 grayscale digits, upsampled (bilinear) from 8x8 to ``image_size`` so that VGG's five
    poolings have something left to pool; pixel values scaled to [0, 1].

    Task k: "is the digit k?". Split (the data set has no official one, so a fixed rule):
    every ``test_every``-th sample (index % test_every == test_every - 1) is test, the rest train.
    """
    if root is not None:
        raise ValueError("digits ships with scikit-learn: root must be None")
    for value, name, least in ((image_size, "image_size", 1), (test_every, "test_every", 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    bunch = require("sklearn.datasets", "train", "the digits data set").load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    classes = torch.as_tensor(bunch.target)
    is_test = torch.arange(classes.numel()) % test_every == test_every - 1
    splits = {"train": torch.nonzero(~is_test).flatten(), "test": torch.nonzero(is_test).flatten()}
    return MultiTaskDataset(images.contiguous(), one_vs_rest(classes, 10), [f"digit_{k}" for k in range(10)],
                            splits, name="digits")
