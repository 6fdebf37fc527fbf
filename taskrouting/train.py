"""Training with Task Routing (the paper's Algorithm 1) and evaluation over every task.

Each mini-batch: sample one task uniformly, ``set_active_task(model, task)``, forward, binary
cross-entropy with logits on that task's labels, SGD step (paper defaults: lr 0.01, momentum
0.5, batch 64). The sample order, task draws and flips of epoch ``e`` come from a generator
seeded by ``(seed, e)``, so a run resumed from an end-of-epoch checkpoint replays exactly the
batches an uninterrupted run would have seen.

BatchNorm at evaluation: a routed model's running statistics average over batches of all
tasks, but with σ < 1 the input of every layer after the first depends on the task's masks, so
that mixture fits no single task (on digits it turns a model that is 97% right with batch
statistics into one that predicts the majority class everywhere). By default (``bn_eval=
"per-task"``) evaluation therefore re-estimates the statistics for each task from
``bn_batches`` training batches with that task active (a cumulative average, weights untouched,
the model's own statistics restored afterwards); ``bn_eval="running"`` uses the model's running
statistics as they are (plain ``model.eval()``).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import MultiTaskDataset
from .metrics import TaskMetrics, binary_metrics, majority_baseline
from .router import set_active_task

__all__ = ["TrainConfig", "ModelBuildError", "MODELS", "build_model", "seed_everything", "epoch_plan", "train_epoch",
           "recalibrate_bn", "predict", "evaluate", "fit", "run_experiment", "write_results", "write_json", "write_csv", "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"
BN_EVAL = ("per-task", "running")
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
    bn_eval: str = "per-task"  # or "running"; see the module docstring
    bn_batches: int = 8  # training batches (of eval_batch_size) per task for bn_eval="per-task"

    def __post_init__(self):
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
    from . import models

    torch.manual_seed(seed)
    return getattr(models, MODELS[name])(num_tasks, sharing_ratio=sharing_ratio, seed=seed,
                                         in_channels=in_channels, **kwargs)


def epoch_plan(num_samples: int, num_tasks: int, batch_size: int, seed: int, epoch: int):
    """Batches of sample indices, one task per batch and flip flags for epoch ``epoch``: a pure
    function of its arguments. A final batch of one sample is dropped (BatchNorm needs two)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = list(torch.randperm(num_samples, generator=g).split(batch_size))
    if batches and batches[-1].numel() < 2:
        batches.pop()
    tasks = torch.randint(num_tasks, (len(batches),), generator=g).tolist()
    flips = [torch.rand(b.numel(), generator=g) < 0.5 for b in batches]
    return batches, tasks, flips


class _Batches(torch.utils.data.Dataset):
    """Item k is the whole k-th batch, so DataLoader workers can decode batches in parallel."""

    def __init__(self, data: MultiTaskDataset, batches):
        self.data, self.batches = data, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return self.data.get_batch(self.batches[k])


def _loader(data: MultiTaskDataset, batches, num_workers: int):
    if num_workers == 0:
        return (data.get_batch(b) for b in batches)
    return torch.utils.data.DataLoader(_Batches(data, batches), batch_size=None, num_workers=num_workers)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: MultiTaskDataset, epoch: int,
                config: TrainConfig, progress: bool = True) -> dict:
    """One epoch of Algorithm 1 over ``data``; returns mean loss, samples, seconds, samples/s."""
    model.train()
    batches, tasks, flips = epoch_plan(len(data), data.num_tasks, config.batch_size, config.seed, epoch)
    hflip = data.hflip if config.hflip is None else config.hflip
    total_loss, samples, start = 0.0, 0, time.perf_counter()
    with _progress(len(batches), f"epoch {epoch + 1}/{config.epochs}", progress) as bar:
        for (x, y), task, flip in zip(_loader(data, batches, config.num_workers), tasks, flips):
            if hflip:
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            x, target = x.to(config.device), y[:, task].to(config.device)
            set_active_task(model, task)
            loss = F.binary_cross_entropy_with_logits(model(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * x.shape[0]
            samples += x.shape[0]
            rate = samples / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{total_loss / samples:.4f}", img_s=f"{rate:.0f}")
            bar.update()
    seconds = time.perf_counter() - start
    return {"epoch": epoch + 1, "loss": total_loss / max(samples, 1), "samples": samples, "seconds": seconds,
            "samples_per_s": samples / max(seconds, 1e-9)}


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def _kept_bn_state(model: nn.Module):
    """Restore every BatchNorm's running statistics, momentum and mode, and the model's mode, on exit."""
    layers = _bn_layers(model)
    saved = [(m, m.momentum, m.training, {k: getattr(m, k).clone()
                                          for k in ("running_mean", "running_var", "num_batches_tracked")})
             for m in layers]
    was_training = model.training
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for m, momentum, training, buffers in saved:
                m.momentum = momentum
                m.train(training)
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: MultiTaskDataset, task: int, batches, device: str = "cpu",
                   num_workers: int = 0) -> None:
    """Replace every BatchNorm's running statistics by their cumulative average over ``batches``
    (index tensors into ``data``) with ``task`` active; leaves the model in eval mode."""
    layers = _bn_layers(model)
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    set_active_task(model, task)
    for x, _ in _loader(data, batches, num_workers):
        model(x.to(device))
    model.eval()


def _calibration_batches(num_samples: int, batch_size: int, count: int, seed: int) -> list[torch.Tensor]:
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return [b for b in order[:batch_size * count].split(batch_size) if b.numel() > 1]


@torch.no_grad()
def predict(model: nn.Module, data: MultiTaskDataset, batch_size: int = 256, device: str = "cpu",
            num_workers: int = 0, progress: bool = False, calibration: MultiTaskDataset | None = None,
            calibration_batches: int = 8, seed: int = 0) -> torch.Tensor:
    """Logits ``[N, T]`` of every sample for every task, in eval mode. Without ``calibration``,
    each task is set active in turn per batch (every batch is read once); with it, each task's
    BatchNorm statistics are first re-estimated on ``calibration_batches`` seeded batches of
    ``calibration`` (``recalibrate_bn``). The model's own state is restored afterwards."""
    batches = list(torch.arange(len(data)).split(batch_size))
    logits = torch.empty(len(data), data.num_tasks)
    with _kept_bn_state(model), _progress(data.num_tasks if calibration else len(batches), "evaluating",
                                          progress) as bar:
        model.eval()
        if calibration is None:
            for index, (x, _) in zip(batches, _loader(data, batches, num_workers)):
                x = x.to(device)
                for task in range(data.num_tasks):
                    set_active_task(model, task)
                    logits[index, task] = model(x).float().cpu()
                bar.update()
            return logits
        fitting = _calibration_batches(len(calibration), batch_size, calibration_batches, seed)
        for task in range(data.num_tasks):
            recalibrate_bn(model, calibration, task, fitting, device, num_workers)
            for index, (x, _) in zip(batches, _loader(data, batches, num_workers)):
                logits[index, task] = model(x.to(device)).float().cpu()
            bar.update()
    return logits


def evaluate(model: nn.Module, data: MultiTaskDataset, config: TrainConfig | None = None,
             progress: bool = False, calibration: MultiTaskDataset | None = None) -> TaskMetrics:
    """Per-task metrics of ``model`` on ``data``; with ``config.bn_eval == "per-task"``, BatchNorm
    statistics re-estimated per task on ``calibration`` (the training data)."""
    config = config or TrainConfig()
    if config.bn_eval == "per-task" and calibration is None:
        raise ValueError('bn_eval="per-task" needs calibration data (the training split)')
    logits = predict(model, data, config.eval_batch_size, config.device, config.num_workers, progress,
                     calibration if config.bn_eval == "per-task" else None, config.bn_batches, config.seed)
    return binary_metrics(logits, data.labels, data.task_names, config.zero_division)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _save(obj, path: Path) -> None:
    """Write then rename, so an interrupted save leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model: nn.Module, optimizer, config: TrainConfig, log) -> tuple[int, list]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    changed = {k: (v, getattr(config, k)) for k, v in state.get("config", {}).items()
               if k not in ("epochs", "num_workers", "device") and getattr(config, k, v) != v}
    if changed:
        log(f"warning: resuming with settings that differ from the checkpoint's: {changed}")
    return state["epoch"], state["history"]


def fit(model: nn.Module, dataset: MultiTaskDataset, config: TrainConfig, out=None, resume: bool = False,
        progress: bool = True, log=print, info: dict | None = None) -> dict:
    """Train on ``dataset``'s train split, evaluate on ``config.eval_split``; with ``out``, checkpoint
    after every epoch (``resume`` continues from it) and write the results there. Returns them
    (``info``: extra entries for the results, e.g. how the model was built)."""
    out = Path(out) if out is not None else None
    train_data, eval_data = dataset.split("train"), dataset.split(config.eval_split)
    model.to(config.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    start_epoch, history = 0, []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and (out / CHECKPOINT).is_file():
            start_epoch, history = _load_checkpoint(out / CHECKPOINT, model, optimizer, config, log)
            log(f"resumed from {out / CHECKPOINT} after epoch {start_epoch}")
    for epoch in range(start_epoch, config.epochs):
        history.append(train_epoch(model, optimizer, train_data, epoch, config, progress))
        h = history[-1]
        log(f"epoch {h['epoch']}/{config.epochs}: loss {h['loss']:.4f}, {h['samples_per_s']:.0f} samples/s, "
            f"{h['seconds']:.1f} s")
        if out is not None:
            _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                   "history": history, "rng": _rng_state(), "config": dataclasses.asdict(config)}, out / CHECKPOINT)
    start = time.perf_counter()
    metrics = evaluate(model, eval_data, config, progress, train_data)
    eval_seconds = time.perf_counter() - start
    baseline = majority_baseline(train_data.labels, eval_data.labels, eval_data.task_names, config.zero_division)
    results = {
        "dataset": dataset.name, "num_tasks": dataset.num_tasks, "eval_split": config.eval_split,
        "train_samples": len(train_data), "eval_samples": len(eval_data),
        "model": type(model).__name__, **(info or {}), "parameters": sum(p.numel() for p in model.parameters()),
        "config": dataclasses.asdict(config), "history": history,
        "train_seconds": sum(h["seconds"] for h in history), "eval_seconds": eval_seconds,
        "means": metrics.means(), "majority_baseline": baseline.means(),
        "per_task": [dict(row, majority_accuracy=b["accuracy"]) for row, b in zip(metrics.rows(), baseline.rows())],
    }
    if out is not None:
        write_results(results, out)
    results["metrics"], results["baseline"] = metrics, baseline  # objects, for callers; not serialised
    return results


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(obj, path: Path) -> None:
    """JSON with nan/inf written as null."""
    path.write_text(json.dumps(_json_safe(obj), indent=2) + "\n")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def write_results(results: dict, out: Path) -> None:
    """``results.json`` (everything), ``per_task.csv`` and ``history.csv``."""
    serialisable = {k: v for k, v in results.items() if k not in ("metrics", "baseline")}
    write_json(serialisable, out / "results.json")
    write_csv(results["per_task"], out / "per_task.csv")
    write_csv(results["history"], out / "history.csv")


def run_experiment(dataset: MultiTaskDataset, model_name: str, sharing_ratio: float, config: TrainConfig,
                   model_kwargs: dict | None = None, out=None, resume: bool = False, progress: bool = True,
                   log=print) -> dict:
    """Seed everything, build ``model_name`` for ``dataset``'s tasks and channels (ModelBuildError
    when it cannot be built), ``fit`` it."""
    seed_everything(config.seed)
    try:
        model = build_model(model_name, dataset.num_tasks, sharing_ratio, seed=config.seed,
                            in_channels=dataset.image_shape[0], **(model_kwargs or {}))
    except (ValueError, TypeError) as exc:
        raise ModelBuildError(f"cannot build {model_name} with sharing_ratio={sharing_ratio} for "
                              f"{dataset.num_tasks} tasks: {exc}") from exc
    info = {"model_name": model_name, "sharing_ratio": sharing_ratio, "model_kwargs": dict(model_kwargs or {})}
    return fit(model, dataset, config, out, resume, progress, log, info)
