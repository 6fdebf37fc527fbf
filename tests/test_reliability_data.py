"""Data loaders refuse bad data with an error naming the file, line and field (issue 14, item 7)."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from test_data import make_celeba, make_cifar, make_cub, make_zappos

from taskrouting.data import DatasetFormatError, MultiTaskDataset, load_dataset


def test_duplicate_task_names_are_refused():
    with pytest.raises(ValueError, match="duplicate task name 'a'"):
        MultiTaskDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, 2), ["a", "a"], {}, name="x")
    with pytest.raises(ValueError, match="duplicate task name 'attr_1'"):
        load_dataset("synthetic", num_tasks=3, num_samples=8, image_size=4, tasks=["attr_1", 1])


def test_celeba_duplicates(tmp_path):
    root = make_celeba(tmp_path)
    attr = root / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join([lines[0], lines[1].replace("Attr_7", "Attr_3")] + lines[2:]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"list_attr_celeba.txt, line 2: duplicate attribute name 'Attr_3'"):
        load_dataset("celeba", root)
    make_celeba(root, rows=(("000001.jpg", 1, 0), ("000001.jpg", -1, 1)))
    with pytest.raises(DatasetFormatError, match=r"list_attr_celeba.txt, line 4: duplicate image '000001.jpg' "
                                                 r"\(first on line 3\)"):
        load_dataset("celeba", root)
    make_celeba(root)
    with open(root / "list_eval_partition.txt", "a") as f:
        f.write("000002.jpg 2\n")
    with pytest.raises(DatasetFormatError, match=r"list_eval_partition.txt, line 4: duplicate image '000002.jpg'"):
        load_dataset("celeba", root)


def test_cub_duplicates(tmp_path):
    root = make_cub(tmp_path)
    images = (root / "images.txt").read_text()
    (root / "images.txt").write_text(images + "2 002.Auklet/c.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"images.txt, line 4: duplicate id 2 \(first on line 2\)"):
        load_dataset("cub", root)
    (root / "images.txt").write_text(images.replace("c.jpg", "b.jpg"))
    with pytest.raises(DatasetFormatError, match=r"images.txt, line 3: duplicate image path '002.Auklet/b.jpg'"):
        load_dataset("cub", root)
    (root / "images.txt").write_text(images)
    labels = root / "attributes" / "image_attribute_labels.txt"
    labels.write_text(labels.read_text() + "1 5 1 3 0.0\n")
    with pytest.raises(DatasetFormatError, match=r"line 937: duplicate pair of image id 1 and attribute id 5 "
                                                 r"\(first on line 5\)"):
        load_dataset("cub", root)
    (tmp_path / "again").mkdir()
    make_cub(tmp_path / "again")
    names = tmp_path / "again" / "attributes.txt"
    names.write_text(names.read_text().replace("has_attr::2\n", "has_attr::1\n"))
    with pytest.raises(DatasetFormatError, match=r"attributes.txt, line 2: duplicate attribute name 'has_attr::1'"):
        load_dataset("cub", tmp_path / "again" / "CUB_200_2011")


def test_csv_duplicates(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"line 1: duplicate task column 'heel' \(fields 2 and 3\)"):
        load_dataset("zappos", make_zappos(tmp_path, header="image,split,type,heel,heel,closure"))
    root = make_zappos(tmp_path)
    text = (root / "zappos_labels.csv").read_text()
    (root / "zappos_labels.csv").write_text(text + text.splitlines()[1] + "\n")
    with pytest.raises(DatasetFormatError, match=r"line 4: duplicate image 'ut-zap50k-images/Shoes/a.jpg' "
                                                 r"\(first on line 2\)"):
        load_dataset("zappos", root)


def test_cifar_non_integer_labels_and_duplicate_names(tmp_path):
    folder = make_cifar(tmp_path) / "cifar-10-batches-py"
    batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0.5, 1]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetFormatError, match=r"data_batch_2: b'labels' must be integers 0..9"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "again").mkdir()
    make_cifar(tmp_path / "again")
    meta = tmp_path / "again" / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": [b"cat"] * 10}))
    with pytest.raises(DatasetFormatError, match=r"batches.meta: duplicate label name 'cat'"):
        load_dataset("cifar10", tmp_path / "again")


@pytest.mark.parametrize("kwargs, match", [({"pixel_noise": math.inf}, "pixel_noise"),
                                           ({"label_noise": math.nan}, "label_noise"),
                                           ({"pixel_noise": -1.0}, "pixel_noise"),
                                           ({"label_noise": "0.1"}, "label_noise")])
def test_synthetic_rejects_non_finite_noise(kwargs, match):
    with pytest.raises(ValueError, match=f"{match} must be a finite number >= 0"):
        load_dataset("synthetic", num_samples=8, image_size=4, **kwargs)


@pytest.mark.parametrize("kwargs, match", [({"image_size": 0}, "image_size"), ({"image_size": 2.5}, "image_size"),
                                           ({"test_every": 0}, "test_every"), ({"test_every": 1}, "test_every")])
def test_digits_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"{match} must be an int"):
        load_dataset("digits", **kwargs)
