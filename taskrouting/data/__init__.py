"""Multi-task binary data sets: ``load_dataset(name, root=None, tasks=None, **kw)``.

Built in (no files needed): ``digits`` (scikit-learn's digits, 10 one-vs-rest tasks) and
``synthetic`` (many seeded tasks of controllable relatedness). Read from files you already
have (nothing is downloaded): ``celeba``, ``cub``, ``zappos``, ``fashionmnist``, ``cifar10``
and ``csv`` (any image set described by a CSV); each module's docstring gives its file layout.
"""
from __future__ import annotations

from .attribute_csv import load_attribute_csv
from .base import DatasetFormatError, MultiTaskDataset
from .celeba import load_celeba
from .cifar10 import load_cifar10
from .cub import load_cub
from .digits import load_digits
from .fashion_mnist import load_fashion_mnist
from .images import ImageFiles
from .synthetic import make_synthetic
from .zappos import load_zappos

__all__ = ["load_dataset", "DATASETS", "MultiTaskDataset", "DatasetFormatError", "ImageFiles",
           "load_digits", "make_synthetic", "load_celeba", "load_cub", "load_zappos", "load_fashion_mnist",
           "load_cifar10", "load_attribute_csv"]

DATASETS = {
    "digits": load_digits,
    "synthetic": make_synthetic,
    "celeba": load_celeba,
    "cub": load_cub,
    "zappos": load_zappos,
    "fashionmnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "csv": load_attribute_csv,
}
_ALIASES = {"cub200": "cub", "cub-200-2011": "cub", "ut-zappos50k": "zappos", "zappos50k": "zappos",
            "fashion-mnist": "fashionmnist", "fashion_mnist": "fashionmnist", "cifar-10": "cifar10"}


def load_dataset(name: str, root=None, tasks=None, **kwargs) -> MultiTaskDataset:
    """Load data set ``name`` (see ``DATASETS``) from ``root``; ``tasks`` keeps the first k tasks
    (an int) or the named/indexed ones (a sequence); other keywords go to the loader."""
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    dataset = DATASETS[key](root=root, **kwargs)
    return dataset if tasks is None else dataset.select_tasks(tasks)
