"""``cub``: the 312 binary attributes of CUB-200-2011 (UCSD Birds), from the official release.

Expected under ``root`` (the ``CUB_200_2011`` folder)::

    images.txt                              "<image id> <relative path>" per image
    train_test_split.txt                    "<image id> <1 train | 0 test>" per image
    attributes/image_attribute_labels.txt   "<image id> <attribute id> <is_present 0|1> <certainty> <time>"
    images/                                 the JPEGs named in images.txt

Attribute names come from ``attributes.txt`` ("<id> <name>") when found in ``root/attributes/``,
``root`` or its parent (where the release tarball puts it); otherwise they are ``attr_<id>``.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import DatasetFormatError, MultiTaskDataset, first_seen, read_rows, require_file, require_root, to_int
from .images import ImageFiles

__all__ = ["load_cub"]

NAME = "cub"
NUM_ATTRIBUTES = 312


def _id_table(path, what: str, allowed=None, unique_values: str | None = None) -> dict[int, str]:
    """``{id: value}`` of a "<id> <value>" file; ids must not repeat, nor values when ``unique_values``
    names what they are."""
    table, lines, values = {}, {}, {}
    for line, fields in read_rows(path, 2, what):
        key = to_int(fields[0], path, line)
        first_seen(lines, key, path, line, "id")
        if unique_values:
            first_seen(values, fields[1], path, line, unique_values)
        table[key] = fields[1] if allowed is None else to_int(fields[1], path, line, allowed)
    return table


def _attribute_names(root) -> list[str]:
    for path in (root / "attributes" / "attributes.txt", root / "attributes.txt", root.parent / "attributes.txt"):
        if path.is_file():
            names = _id_table(path, "an attribute id and name", unique_values="attribute name")
            if sorted(names) == list(range(1, NUM_ATTRIBUTES + 1)):
                return [names[k] for k in range(1, NUM_ATTRIBUTES + 1)]
    return [f"attr_{k}" for k in range(1, NUM_ATTRIBUTES + 1)]


def load_cub(root=None, image_size=64, mean_samples: int = 1000) -> MultiTaskDataset:
    """CUB-200-2011 as 312 binary attribute tasks (annotation-file order; pass ``tasks=k`` to
    ``load_dataset`` for the first k, as in the paper) with the official train/test split.
    Images are decoded on access and resized to ``image_size``; ``hflip`` is on (as in the paper).
    An (image, attribute) pair missing from the labels file counts as absent (0).
    """
    root = require_root(root, NAME, "images.txt, train_test_split.txt, attributes/ and images/")
    images_path = require_file(root / "images.txt", NAME, "the image list")
    split_path = require_file(root / "train_test_split.txt", NAME, "the train/test split")
    labels_path = require_file(root / "attributes" / "image_attribute_labels.txt", NAME, "the attribute labels")
    image_paths = _id_table(images_path, "an image id and a path", unique_values="image path")
    is_train = _id_table(split_path, "an image id and 1 (train) or 0 (test)", {0, 1})
    ids = sorted(image_paths)
    missing = [i for i in ids if i not in is_train]
    if missing:
        raise DatasetFormatError(split_path, f"{len(missing)} image ids of images.txt have no split, e.g. {missing[0]}")
    row = {image_id: k for k, image_id in enumerate(ids)}
    labels = torch.zeros(len(ids), NUM_ATTRIBUTES, dtype=torch.uint8)
    labelled = np.zeros((len(ids), NUM_ATTRIBUTES), dtype=np.int64)  # line of each pair, 0: not yet
    # Some lines of the released file carry extra fields; only the first three are used.
    for line, fields in read_rows(labels_path, 3, "an image id, an attribute id and is_present"):
        image_id, attribute = to_int(fields[0], labels_path, line), to_int(fields[1], labels_path, line)
        if image_id not in row:
            raise DatasetFormatError(labels_path, f"image id {image_id} is not in images.txt", line)
        if not 1 <= attribute <= NUM_ATTRIBUTES:
            raise DatasetFormatError(labels_path, f"attribute id {attribute} is not in 1..{NUM_ATTRIBUTES}", line)
        first = labelled[row[image_id], attribute - 1]
        if first:
            raise DatasetFormatError(labels_path, f"duplicate pair of image id {image_id} and attribute id "
                                                  f"{attribute} (first on line {first})", line)
        labelled[row[image_id], attribute - 1] = line
        labels[row[image_id], attribute - 1] = to_int(fields[2], labels_path, line, {0, 1})
    train = torch.tensor([is_train[i] == 1 for i in ids], dtype=torch.bool)
    splits = {"train": torch.nonzero(train).flatten(), "test": torch.nonzero(~train).flatten()}
    folder = root / "images"
    images = ImageFiles([folder / image_paths[i] for i in ids], image_size, 3).check(NAME, folder)
    return MultiTaskDataset(images, labels, _attribute_names(root), splits, name=NAME, hflip=True,
                            mean_samples=mean_samples)
