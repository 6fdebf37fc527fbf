"""Data sets: the built-in ones, and every file loader on tiny fixtures in its own format."""
from __future__ import annotations

import gzip
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from taskrouting.data import DatasetFormatError, MultiTaskDataset, load_dataset

PIL = pytest.importorskip("PIL.Image")


def save_image(path, size=(6, 5), value=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, dtype=np.uint8)
    PIL.fromarray(array, mode).save(path)


# --- built-in data sets ---------------------------------------------------------------------------

def test_digits_one_vs_rest_split_and_mean():
    data = load_dataset("digits", image_size=16)
    assert data.num_tasks == 10 and data.image_shape == (1, 16, 16) and len(data) == 1797
    assert torch.equal(data.labels.sum(1), torch.ones(len(data), dtype=torch.long))
    train, test = data.splits["train"], data.splits["test"]
    assert train.numel() + test.numel() == len(data) and not set(train.tolist()) & set(test.tolist())
    x, y = data.split("train").get_batch(torch.arange(train.numel()))
    assert x.shape == (train.numel(), 1, 16, 16) and abs(float(x.mean())) < 1e-5  # mean-normalised
    assert not data.hflip


def test_synthetic_seeded_and_relatedness():
    make = lambda **kw: load_dataset("synthetic", num_tasks=40, num_samples=600, image_size=8, **kw)
    a, b = make(seed=3), make(seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, make(seed=4).labels)

    def mean_correlation(data):
        c = torch.corrcoef(data.labels.float().T)
        return float((c.sum() - c.diag().sum()) / (c.numel() - c.shape[0]))

    corr = [mean_correlation(make(relatedness=r)) for r in (0.0, 0.5, 1.0)]
    assert abs(corr[0]) < 0.1 and corr[0] < corr[1] < corr[2] and corr[2] > 0.7
    rates = make(positive_rate=(0.1, 0.3)).positive_rate()
    assert 0.03 < float(rates.min()) and float(rates.max()) < 0.4


def test_synthetic_many_tasks_and_bad_args():
    data = load_dataset("synthetic", num_tasks=1200, num_samples=64, image_size=4, val_fraction=0.25)
    assert data.labels.shape == (64, 1200) and set(data.splits) == {"train", "val", "test"}
    for bad in ({"relatedness": 1.5}, {"num_tasks": 0}, {"positive_rate": 1.0}, {"test_fraction": 1.0}):
        with pytest.raises(ValueError):
            load_dataset("synthetic", num_samples=8, **bad)
    with pytest.raises(ValueError, match="root must be None"):
        load_dataset("synthetic", root="/tmp")


def test_select_tasks_split_and_getitem():
    data = load_dataset("synthetic", num_tasks=6, num_samples=50, image_size=4)
    assert data.select_tasks(3).task_names == data.task_names[:3]
    picked = data.select_tasks(["attr_4", 1])
    assert picked.task_names == ["attr_4", "attr_1"] and torch.equal(picked.labels, data.labels[:, [4, 1]])
    with pytest.raises(ValueError, match="no task 'nope'"):
        data.select_tasks(["nope"])
    with pytest.raises(ValueError):
        data.select_tasks(7)
    with pytest.raises(KeyError, match="no 'val' split"):
        data.split("val")
    test = data.split("test")
    x, y = test[0]
    assert x.shape == (3, 4, 4) and y.shape == (6,) and torch.equal(test.mean, data.mean)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="list_attr_celeba.txt"):
        load_dataset("celeba")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_dataset("cub", root="/nonexistent/folder")


# --- CelebA -------------------------------------------------------------------------------------

def make_celeba(root, rows=(("000001.jpg", 1, 0), ("000002.jpg", -1, 1), ("000003.jpg", 1, 2))):
    names = [f"Attr_{k}" for k in range(40)]
    lines = [str(len(rows)), " ".join(names)]
    for k, (image, sign, _) in enumerate(rows):
        values = [sign if j % 2 == 0 else -sign for j in range(40)]
        lines.append(image + "  " + " ".join(f"{v:2d}" for v in values))
        save_image(root / "img_align_celeba" / image, (10, 12), value=40 * k)
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{image} {part}\n" for image, _, part in rows))
    return root


def test_celeba(tmp_path):
    data = load_dataset("celeba", make_celeba(tmp_path), image_size=8)
    assert data.num_tasks == 40 and data.task_names[0] == "Attr_0" and data.hflip
    assert data.labels[:, :2].tolist() == [[1, 0], [0, 1], [1, 0]]
    assert {k: v.tolist() for k, v in data.splits.items()} == {"train": [0], "val": [1], "test": [2]}
    x, _ = data.get_batch([0, 2])
    assert x.shape == (2, 3, 8, 8) and torch.allclose(data.mean, torch.zeros(3), atol=1e-6)
    assert load_dataset("celeba", tmp_path, tasks=["Attr_3"]).labels.shape == (3, 1)


def test_celeba_malformed_and_missing(tmp_path):
    root = make_celeba(tmp_path)
    text = (root / "list_attr_celeba.txt").read_text().replace(" 1\n", " \n", 1)
    (root / "list_attr_celeba.txt").write_text(text)
    with pytest.raises(DatasetFormatError, match=r"list_attr_celeba.txt, line 4: expected an image name and 40"):
        load_dataset("celeba", root)
    make_celeba(root)
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        load_dataset("celeba", root)
    make_celeba(root)
    (root / "img_align_celeba" / "000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000003.jpg"):
        load_dataset("celeba", root)


# --- CUB-200-2011 -------------------------------------------------------------------------------

def make_cub(parent):
    root = parent / "CUB_200_2011"
    paths = {1: "001.Albatross/a.jpg", 2: "002.Auklet/b.jpg", 3: "002.Auklet/c.jpg"}
    for k, path in paths.items():
        save_image(root / "images" / path, value=50 * k)
    (root / "images.txt").write_text("".join(f"{k} {p}\n" for k, p in paths.items()))
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    (root / "attributes").mkdir()
    lines = [f"{i} {a} {int((i + a) % 3 == 0)} 3 1.5" for i in paths for a in range(1, 313)]
    lines[5] += " 0"  # the released file has a few lines with extra fields
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(lines) + "\n")
    (parent / "attributes.txt").write_text("".join(f"{a} has_attr::{a}\n" for a in range(1, 313)))
    return root


def test_cub(tmp_path):
    data = load_dataset("cub", make_cub(tmp_path), image_size=4)
    assert data.num_tasks == 312 and data.task_names[0] == "has_attr::1" and data.hflip
    expected = torch.tensor([[int((i + a) % 3 == 0) for a in range(1, 313)] for i in (1, 2, 3)], dtype=torch.uint8)
    assert torch.equal(data.labels, expected)
    assert data.splits["train"].tolist() == [0, 2] and data.splits["test"].tolist() == [1]
    assert data.get_batch([1])[0].shape == (1, 3, 4, 4)
    assert load_dataset("cub", tmp_path / "CUB_200_2011", tasks=10).num_tasks == 10


def test_cub_malformed_and_missing(tmp_path):
    root = make_cub(tmp_path)
    with open(root / "attributes" / "image_attribute_labels.txt", "a") as f:
        f.write("1 313 1 3 0.0\n")
    with pytest.raises(DatasetFormatError, match=r"line 937: attribute id 313 is not in 1..312"):
        load_dataset("cub", root)
    (root / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        load_dataset("cub", root)


# --- UT-Zappos50K (CSV layout) ------------------------------------------------------------------

def make_zappos(root, header="image,split,type,gender,heel,closure", split="val"):
    rows = [("ut-zap50k-images/Shoes/a.jpg", "train", "1,0,1,0"), ("ut-zap50k-images/Boots/b.jpg", split, "0,1,1,1")]
    for k, (path, _, _) in enumerate(rows):
        save_image(root / path, (8, 6), value=90 * k)
    (root / "zappos_labels.csv").write_text(header + "\n" + "".join(f"{p},{s},{v}\n" for p, s, v in rows))
    return root


def test_zappos(tmp_path):
    data = load_dataset("zappos", make_zappos(tmp_path), image_size=(4, 6))
    assert data.task_names == ["type", "gender", "heel", "closure"] and data.hflip
    assert data.labels.tolist() == [[1, 0, 1, 0], [0, 1, 1, 1]]
    assert data.splits["train"].tolist() == [0] and data.splits["val"].tolist() == [1]
    assert data.get_batch([0, 1])[0].shape == (2, 3, 4, 6)


def test_zappos_malformed_and_missing(tmp_path):
    with pytest.raises(DatasetFormatError, match="line 3: split must be one of"):
        load_dataset("zappos", make_zappos(tmp_path, split="holdout"))
    with pytest.raises(DatasetFormatError, match="line 1: expected the header"):
        load_dataset("zappos", make_zappos(tmp_path, header="path,type,gender,heel,closure"))
    with pytest.raises(FileNotFoundError, match="expected the label CSV .*other.csv"):
        load_dataset("zappos", tmp_path, labels_file="other.csv")


def test_missing_pillow_is_a_clear_error(tmp_path, monkeypatch):
    data = load_dataset("zappos", make_zappos(tmp_path))
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match=r"needs Pillow.*pip install 'taskrouting\[images\]'"):
        data.get_batch([0])


# --- Fashion-MNIST (IDX) ------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def make_fashion(root, train=5, test=3):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n, dtype=np.uint8) % 10))
    return root


def test_fashion_mnist(tmp_path):
    data = load_dataset("fashionmnist", make_fashion(tmp_path))
    assert data.image_shape == (1, 28, 28) and data.num_tasks == 10 and data.task_names[9] == "ankle_boot"
    assert data.labels.argmax(1).tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert data.splits["test"].tolist() == [5, 6, 7]
    assert load_dataset("fashion-mnist", tmp_path, image_size=32).image_shape == (1, 32, 32)


def test_fashion_mnist_malformed_and_missing(tmp_path):
    root = make_fashion(tmp_path)
    (root / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x03" + bytes(20))
    with pytest.raises(DatasetFormatError, match="t10k-labels-idx1-ubyte: not an IDX file"):
        load_dataset("fashionmnist", root)
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8))[:-1])
    with pytest.raises(DatasetFormatError, match="header says shape"):
        load_dataset("fashionmnist", root)
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte \(or t10k-labels-idx1-ubyte.gz\)"):
        load_dataset("fashionmnist", root)


# --- CIFAR-10 (python pickles) ------------------------------------------------------------------

def make_cifar(root, per_batch=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"data": np.full((per_batch, 3072), k, dtype=np.uint8), b"labels": [k % 10, (k + 1) % 10]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def test_cifar10(tmp_path):
    data = load_dataset("cifar10", make_cifar(tmp_path))
    assert data.image_shape == (3, 32, 32) and data.task_names[3] == "c3" and data.hflip
    assert data.splits["train"].numel() == 10 and data.splits["test"].tolist() == [10, 11]
    assert data.labels.argmax(1).tolist()[-2:] == [5, 6]
    assert torch.allclose(data.mean, torch.full((3,), 2 / 255))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar10_malformed_missing_and_unsafe(tmp_path):
    folder = make_cifar(tmp_path) / "cifar-10-batches-py"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"labels": [1]}))
    with pytest.raises(DatasetFormatError, match=r"data_batch_3: expected the keys b'data' and b'labels'"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DatasetFormatError, match="refusing to load builtins.print"):
        load_dataset("cifar10", tmp_path)
    (folder / "test_batch").unlink()
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_dataset_rejects_bad_labels():
    with pytest.raises(ValueError, match="0 or 1"):
        MultiTaskDataset(torch.zeros(2, 1, 2, 2), torch.tensor([[0], [2]]), ["a"], {}, name="x")
