"""The settings of one run and the model they build."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from torch import nn

__all__ = ["TrainConfig", "ModelBuildError", "MODELS", "BN_EVAL", "BN_EVAL_ALIASES", "build_model",
           "seed_everything"]

# BatchNorm statistics at evaluation (training/evaluation.py): what the layers hold (plain model.eval()),
# re-estimated per task on training batches, or the evaluation batch's own.
BN_EVAL = ("stored", "recalibrate", "batch")
BN_EVAL_ALIASES = {"per-task": "recalibrate", "running": "stored"}  # the names before --bn-eval stored

MODELS = {"vgg11": "vgg11_bn", "vgg16": "vgg16_bn", "resnet50": "resnet50"}


class ModelBuildError(ValueError):
    """The model cannot be built with these settings (e.g. σ = 0 with more tasks than channels)."""


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of one run (defaults: the paper's, Section 4.3)."""

    epochs: int = 35
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.5
    weight_decay: float = 0.0
    seed: int = 0
    hflip: bool | None = None  # None: flip when the dataset says flips suit its images
    eval_split: str = "test"
    eval_batch_size: int = 256
    num_workers: int = 0  # DataLoader workers decoding batches (image files); 0 = in this process
    device: str = "cpu"
    zero_division: float = 0.0
    bn_eval: str = "stored"  # or "recalibrate", "batch"; see training/evaluation.py
    bn_batches: int = 8  # training batches (of eval_batch_size) per task for bn_eval="recalibrate"

    def __post_init__(self):
        self.bn_eval = BN_EVAL_ALIASES.get(self.bn_eval, self.bn_eval)
        if self.bn_eval not in BN_EVAL:
            raise ValueError(f"bn_eval must be one of {', '.join(BN_EVAL)}, got {self.bn_eval!r}")
        for name, least in (("epochs", 0), ("batch_size", 2), ("eval_batch_size", 2), ("num_workers", 0),
                            ("bn_batches", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise ValueError("need lr > 0, 0 <= momentum < 1 and weight_decay >= 0")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def build_model(name: str, num_tasks: int, sharing_ratio: float, *, seed: int = 0, in_channels: int = 3,
                **kwargs) -> nn.Module:
    """A routed model from ``taskrouting.models`` (``vgg11``, ``vgg16``, ``resnet50``): masks drawn
    from ``seed``, weights initialised after ``torch.manual_seed(seed)``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    from .. import models

    torch.manual_seed(seed)
    return getattr(models, MODELS[name])(num_tasks, sharing_ratio=sharing_ratio, seed=seed,
                                         in_channels=in_channels, **kwargs)
