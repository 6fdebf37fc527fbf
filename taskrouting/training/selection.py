"""Model selection on a validation split held out of the training data.

``with_holdout`` moves a seeded ``val_fraction`` of the train split into a ``val`` split;
``BestEpoch`` evaluates on it every ``eval_every`` epochs (and after the last one), keeps a copy
of the weights with the best mean F1 (the earliest on a tie) and puts them back before the test
split is scored, so a run reports the test scores of the epoch validation chose.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from ..data import MultiTaskDataset
from .checkpoints import read_checkpoint
from .config import TrainConfig
from .evaluation import evaluate

__all__ = ["with_holdout", "BestEpoch", "SELECT_SPLIT", "SELECT_SCORE"]

SELECT_SPLIT = "val"
SELECT_SCORE = "f1"


def with_holdout(dataset: MultiTaskDataset, fraction: float, seed: int) -> MultiTaskDataset:
    """``dataset`` with ``round(fraction * train size)`` train samples (chosen by ``seed``) moved to
    a ``val`` split; the images are shared, not copied. A dataset that has a ``val`` split already
    is refused rather than silently overwritten."""
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction!r}")
    if SELECT_SPLIT in dataset.splits:
        raise ValueError(f"{dataset.name} has a {SELECT_SPLIT!r} split already: val_fraction would replace it")
    if "train" not in dataset.splits:
        raise ValueError(f"{dataset.name} has no 'train' split to hold a validation part out of")
    train = dataset.splits["train"]
    count = int(round(fraction * train.numel()))
    if count < 2 or train.numel() - count < 2:
        raise ValueError(f"val_fraction={fraction} of {train.numel()} train samples leaves too few on one side")
    order = torch.randperm(train.numel(), generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(train.numel(), dtype=torch.bool)
    held[order[:count]] = True
    held_out = copy.copy(dataset)  # shallow: the same images and labels; a mean not yet computed is the new train's
    held_out.splits = {**dataset.splits, "train": train[~held], SELECT_SPLIT: train[held]}
    return held_out


class BestEpoch:
    """Tracks validation scores over epochs and the weights of the best one (see module docstring)."""

    def __init__(self, val_data: MultiTaskDataset, train_data: MultiTaskDataset, config: TrainConfig):
        self.val_data, self.train_data, self.config = val_data, train_data, config
        self.best_epoch, self.best_score, self.best_state = 0, -math.inf, None

    def due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (1-based) is evaluated: every ``eval_every``-th and the last."""
        return epoch % self.config.eval_every == 0 or epoch == self.config.epochs

    def observe(self, model: nn.Module, epoch: int, record: dict) -> None:
        """After epoch ``epoch`` (1-based): when due, score the validation split into ``record``
        (``val_<metric>`` entries) and keep the weights if the mean F1 is the best so far."""
        if not self.due(epoch):
            return
        means = evaluate(model, self.val_data, self.config, False, self.train_data).means()
        record.update({f"val_{k}": v for k, v in means.items()})
        score = means[SELECT_SCORE]
        if math.isnan(score):
            raise ValueError(f"validation mean {SELECT_SCORE} is NaN at epoch {epoch}: cannot choose an epoch")
        if score > self.best_score:
            self.best_epoch, self.best_score = epoch, score
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def restore_best(self, model: nn.Module) -> None:
        """Load the best epoch's weights into ``model`` (no-op when no epoch was evaluated)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_score": self.best_score, "best_state": self.best_state}

    def load(self, checkpoint: Path) -> None:
        """The selection state saved with a checkpoint (none in one written without selection)."""
        state = read_checkpoint(checkpoint).get("selection")
        if state is not None:
            self.best_epoch, self.best_score, self.best_state = (state["best_epoch"], state["best_score"],
                                                                 state["best_state"])

    def summary(self) -> dict:
        return {"split": SELECT_SPLIT, "score": SELECT_SCORE, "best_epoch": self.best_epoch,
                "best_val_score": self.best_score, "val_samples": len(self.val_data),
                "eval_every": self.config.eval_every}
