"""Checkpoints: written atomically after every epoch, with every generator's state, so a run resumes exactly.

A checkpoint file is a header line (``MAGIC``), the SHA-256 of the payload (64 hex digits and a newline),
then the payload: ``torch.save`` of plain data and tensors only, read back with ``weights_only=True`` (so
loading never runs code) once the hash matches (so a truncated or altered file is refused). One file,
written to a temporary name then renamed, keeps the write atomic.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import TrainConfig

__all__ = ["CHECKPOINT", "MAGIC", "CheckpointError", "save_atomic", "save_checkpoint", "read_checkpoint",
           "load_checkpoint", "check_run_settings", "rng_state", "set_rng_state", "non_finite_parameters"]

CHECKPOINT = "checkpoint.pt"
MAGIC = b"taskrouting checkpoint v2\n"
_HASH_LEN = 64


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupted, of an older format, or of another run."""

    def __init__(self, path, message: str):
        super().__init__(f"checkpoint {str(path)!r}: {message}")


def rng_state() -> dict:
    """Every global generator's state as tensors and plain numbers (loadable with ``weights_only=True``)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def set_rng_state(state: dict) -> None:
    python, numpy = state["python"], state["numpy"]
    torch.set_rng_state(state["torch"])
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_atomic(obj, path: Path) -> None:
    """Write ``obj`` in the checkpoint format to a temporary file, then rename it over ``path``, so an
    interrupted save leaves the previous checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    _write_bytes(tmp, MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    os.replace(tmp, path)


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding a NaN or an infinity."""
    return [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]


def save_checkpoint(path: Path, model: nn.Module, optimizer, epoch: int, history: list, config: TrainConfig,
                    run: dict, selection: dict | None = None) -> None:
    """The end-of-epoch state of a run (``selection``: the best-epoch choice so far, if any); refused
    (nothing written) when the model holds non-finite values."""
    bad = non_finite_parameters(model)
    if bad:
        raise ValueError(f"not saving {path}: non-finite values in {', '.join(bad[:5])}")
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "history": history, "rng": rng_state(), "config": dataclasses.asdict(config), "run": run,
                 "selection": selection}, path)


def read_checkpoint(path: Path) -> dict:
    """The state saved at ``path``, after checking its header and SHA-256; CheckpointError otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(path, f"cannot read it: {exc.strerror or exc}") from None
    if not data:
        raise CheckpointError(path, "the file is empty")
    if not data.startswith(MAGIC):
        if data.startswith(b"PK"):
            raise CheckpointError(path, "written by an older taskrouting (unverified format, loading it could run "
                                        "code); delete it or train without --resume")
        raise CheckpointError(path, "not a taskrouting checkpoint (unknown header)")
    digest, payload = data[len(MAGIC):len(MAGIC) + _HASH_LEN], data[len(MAGIC) + _HASH_LEN + 1:]
    if data[len(MAGIC) + _HASH_LEN:len(MAGIC) + _HASH_LEN + 1] != b"\n" or \
            hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(path, "corrupted or truncated (its SHA-256 does not match the one recorded at save)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(path, f"holds something other than tensors and plain data: {exc}") from None
    missing = [k for k in ("model", "optimizer", "epoch", "history", "rng", "config", "run")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(path, f"missing entries: {', '.join(missing)}")
    return state


def _same(saved, current) -> bool:
    if isinstance(saved, float) and isinstance(current, float) and math.isnan(saved) and math.isnan(current):
        return True
    return saved == current


# Settings that change what the checkpoint's weights and masks mean; the backend only changes which kernel runs.
_RUN_FREE = ("backend",)


def check_run_settings(path: Path, saved: dict, current: dict) -> None:
    """CheckpointError naming the first model setting in which the checkpoint differs from this run."""
    for key in sorted(set(saved) | set(current)):
        if key == "model_kwargs":
            old, new = saved.get(key) or {}, current.get(key) or {}
            for name in sorted(set(old) | set(new)):
                if name not in _RUN_FREE and not _same(old.get(name), new.get(name)):
                    raise CheckpointError(path, f"was written with {name}={old.get(name)!r}, this run has "
                                                f"{name}={new.get(name)!r}; resume with the same setting or use "
                                                f"another --out")
        elif not _same(saved.get(key), current.get(key)):
            raise CheckpointError(path, f"was written with {key}={saved.get(key)!r}, this run has "
                                        f"{key}={current.get(key)!r}; resume with the same setting or use another "
                                        f"--out")


def load_checkpoint(path: Path, model: nn.Module, optimizer, config: TrainConfig, log, run: dict | None = None
                    ) -> tuple[int, list]:
    """Restore ``model``, ``optimizer`` and the generators from ``path``; returns (epochs done, history).
    Checked first, so a refused checkpoint changes nothing: integrity, then ``run`` (the model settings)."""
    state = read_checkpoint(path)
    if run is not None:
        check_run_settings(path, state["run"], run)
    current = model.state_dict()
    misfits = sorted(set(current) ^ set(state["model"])) + [k for k, v in state["model"].items()
                                                            if k in current and current[k].shape != v.shape]
    if misfits:
        raise CheckpointError(path, f"its weights do not fit this model (e.g. {misfits[0]!r})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    changed = {k: (v, getattr(config, k)) for k, v in state["config"].items()
               if k not in ("epochs", "num_workers", "device") and getattr(config, k, v) != v}
    if changed:
        log(f"warning: resuming with settings that differ from the checkpoint's: {changed}")
    return state["epoch"], state["history"]
