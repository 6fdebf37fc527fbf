"""``csv``: any image set with binary attributes, described by one CSV file.

Layout under ``root``::

    labels.csv    header "image,split,<task 1>,...,<task T>", then one row per image:
                  the image path relative to root, its split (train, val or test), T values 0 or 1
                  (an empty cell: the label is missing; training and metrics leave it out)
    <the images>  wherever the paths point (JPEG, PNG, ... anything Pillow reads)
"""
from __future__ import annotations

import csv
import math

import torch

from .base import DatasetFormatError, MultiTaskDataset, first_seen, require_file, require_root, unique_names
from .images import ImageFiles

__all__ = ["load_attribute_csv", "SPLITS"]

SPLITS = ("train", "val", "test")


def load_attribute_csv(root=None, labels_file: str = "labels.csv", image_size=64, channels: int = 3,
                       hflip: bool = True, square_crop: bool = False, mean_samples: int = 1000,
                       name: str = "csv") -> MultiTaskDataset:
    """Images listed in ``root/labels_file`` (layout above), decoded on access at ``image_size``."""
    root = require_root(root, name, f"{labels_file} and the images it lists")
    path = require_file(root / labels_file, name, "the label CSV (header: image,split,<task names>)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip() for h in rows[0][:2]] != ["image", "split"] or len(rows[0]) < 3:
        raise DatasetFormatError(path, "expected the header 'image,split,<task 1>,...' (at least one task)", 1)
    tasks = unique_names([h.strip() for h in rows[0][2:]], path, 1, "task column")
    files, split_ids, labels, seen = [], [], [], {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(tasks) + 2:
            raise DatasetFormatError(path, f"expected {len(tasks) + 2} columns, got {len(row)}", line)
        split = row[1].strip()
        if split not in SPLITS:
            raise DatasetFormatError(path, f"split must be one of {', '.join(SPLITS)}, got {split!r}", line)
        values = [v.strip() for v in row[2:]]
        if any(v not in ("0", "1", "") for v in values):
            raise DatasetFormatError(path, f"task values must be 0, 1 or empty (missing), got {values}", line)
        first_seen(seen, row[0].strip(), path, line, "image")
        files.append(root / row[0].strip())
        split_ids.append(SPLITS.index(split))
        labels.append([float(v) if v else math.nan for v in values])
    if not files:
        raise DatasetFormatError(path, "no image rows after the header")
    split_ids = torch.tensor(split_ids)
    splits = {s: torch.nonzero(split_ids == k).flatten() for k, s in enumerate(SPLITS)}
    images = ImageFiles(files, image_size, channels, square_crop).check(name, root)
    return MultiTaskDataset(images, torch.tensor(labels), tasks,
                            {k: v for k, v in splits.items() if v.numel()}, name=name, hflip=hflip,
                            mean_samples=mean_samples)
