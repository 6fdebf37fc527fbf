"""Checkpoints: written atomically after every epoch, with every generator's state, so a run resumes exactly."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import TrainConfig

__all__ = ["CHECKPOINT", "save_atomic", "load_checkpoint", "rng_state", "set_rng_state"]

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_atomic(obj, path: Path) -> None:
    """Write then rename, so an interrupted save leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer, config: TrainConfig, log) -> tuple[int, list]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    changed = {k: (v, getattr(config, k)) for k, v in state.get("config", {}).items()
               if k not in ("epochs", "num_workers", "device") and getattr(config, k, v) != v}
    if changed:
        log(f"warning: resuming with settings that differ from the checkpoint's: {changed}")
    return state["epoch"], state["history"]
