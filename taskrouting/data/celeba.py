"""``celeba``: CelebA's 40 face attributes, from the files of the official release.

Expected under ``root``::

    list_attr_celeba.txt      line 1: image count; line 2: the 40 attribute names;
                              then "<image> <40 values of -1 or 1>" per image
    list_eval_partition.txt   "<image> <0 train | 1 val | 2 test>" per image
    img_align_celeba/         the aligned and cropped JPEGs named in those files
"""
from __future__ import annotations

import torch

from .base import (
    DatasetFormatError,
    MultiTaskDataset,
    first_seen,
    read_rows,
    require_file,
    require_root,
    split_indices,
    to_int,
    unique_names,
)
from .images import ImageFiles

__all__ = ["load_celeba"]

NAME = "celeba"


def _read_attributes(path):
    rows = read_rows(path, 1, "the image count")
    try:
        _, (count, *_) = next(rows)
        _, names = next(rows)
    except StopIteration:
        raise DatasetFormatError(path, "expected an image count line and an attribute-name line") from None
    count = to_int(count, path, 1)
    names = unique_names(names, path, 2, "attribute name")
    files, values, seen = [], [], {}
    for line, fields in read_rows(path, len(names) + 1, f"an image name and {len(names)} values", skip=2):
        first_seen(seen, fields[0], path, line, "image")
        files.append(fields[0])
        values.append([to_int(v, path, line, {-1, 0, 1}) > 0 for v in fields[1:len(names) + 1]])
    if len(files) != count:
        raise DatasetFormatError(path, f"line 1 says {count} images but {len(files)} are listed")
    return files, names, torch.tensor(values, dtype=torch.uint8).view(len(files), len(names))


def load_celeba(root=None, image_size=64, square_crop: bool = True, mean_samples: int = 1000) -> MultiTaskDataset:
    """CelebA as 40 binary tasks (file order) with the official train/val/test partition.

    Images are decoded on access: center-cropped to a square (``square_crop``) and resized to
    ``image_size``. Horizontal flips suit faces, so ``hflip`` is on.
    """
    root = require_root(root, NAME, "list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba/")
    attr_path = require_file(root / "list_attr_celeba.txt", NAME, "the attribute annotations")
    part_path = require_file(root / "list_eval_partition.txt", NAME, "the official partition")
    files, names, labels = _read_attributes(attr_path)
    partition, seen = {}, {}
    for line, (image, part, *_) in read_rows(part_path, 2, "an image name and a partition (0, 1, 2)"):
        first_seen(seen, image, part_path, line, "image")
        partition[image] = to_int(part, part_path, line, {0, 1, 2})
    missing = [f for f in files if f not in partition]
    if missing:
        raise DatasetFormatError(part_path, f"{len(missing)} images of list_attr_celeba.txt have no partition, "
                                            f"e.g. {missing[0]!r}")
    split_ids = torch.tensor([partition[f] for f in files], dtype=torch.long)
    folder = root / "img_align_celeba"
    images = ImageFiles([folder / f for f in files], image_size, 3, square_crop).check(NAME, folder)
    return MultiTaskDataset(images, labels, names, split_indices(split_ids, ("train", "val", "test")),
                            name=NAME, hflip=True, mean_samples=mean_samples)
