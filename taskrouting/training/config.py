"""The settings of one run and the model they build."""
from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import torch
from torch import nn

from .batches import TASK_SAMPLING

__all__ = ["TrainConfig", "ConfigError", "ModelBuildError", "MODELS", "BN_EVAL", "BN_EVAL_ALIASES", "SEED_LIMIT",
           "build_model", "seed_everything"]

# BatchNorm statistics at evaluation (training/evaluation.py): what the layers hold (plain model.eval()),
# re-estimated per task on training batches, or the evaluation batch's own.
BN_EVAL = ("stored", "recalibrate", "batch")
BN_EVAL_ALIASES = {"per-task": "recalibrate", "running": "stored"}  # the names before --bn-eval stored

MODELS = {"vgg11": "vgg11_bn", "vgg16": "vgg16_bn", "resnet50": "resnet50"}


SEED_LIMIT = 2 ** 32  # seeds are 0 <= seed < SEED_LIMIT (NumPy's range; epoch_plan scales them)


class ConfigError(ValueError):
    """A TrainConfig field holds a value it cannot take; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field


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
    task_sampling: str = "uniform"  # or "round-robin" (taskrouting.training.batches.epoch_plan)
    val_fraction: float = 0.0  # > 0: hold out this much of train, keep the best epoch (training.selection)
    eval_every: int = 1  # with val_fraction: evaluate on the held-out part every this many epochs
    amp: str | None = None  # "bf16" or "fp16": autocast in training and evaluation (training.precision)
    channels_last: bool = False  # model and inputs in channels_last memory format

    def __post_init__(self):
        self.bn_eval = BN_EVAL_ALIASES.get(self.bn_eval, self.bn_eval)
        if self.bn_eval not in BN_EVAL:
            raise ConfigError("bn_eval", f"must be one of {', '.join(BN_EVAL)}, got {self.bn_eval!r}")
        for name, least in (("epochs", 0), ("batch_size", 2), ("eval_batch_size", 2), ("num_workers", 0),
                            ("bn_batches", 1), ("eval_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(name, f"must be an int >= {least}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError("seed", f"must be an int in [0, 2**32), got {self.seed!r}")
        for name, ok, rule in (("lr", lambda v: v > 0, "> 0"), ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
                               ("weight_decay", lambda v: v >= 0, ">= 0")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise ConfigError(name, f"must be a finite number {rule}, got {value!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ConfigError("amp", f"must be bf16, fp16 or None, got {self.amp!r}")
        if not isinstance(self.channels_last, bool):
            raise ConfigError("channels_last", f"must be a bool, got {self.channels_last!r}")
        if self.task_sampling not in TASK_SAMPLING:
            raise ConfigError("task_sampling", f"must be one of {', '.join(TASK_SAMPLING)}, got {self.task_sampling!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be in [0, 1), got {self.val_fraction!r}")


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
