"""Training with Task Routing (the paper's Algorithm 1).

Each mini-batch: sample one task uniformly, ``set_active_task(model, task)``, forward, binary
cross-entropy with logits on that task's labels, SGD step (paper defaults: lr 0.01, momentum
0.5, batch 64). The sample order, task draws and flips of epoch ``e`` come from a generator
seeded by ``(seed, e)``, so a run resumed from an end-of-epoch checkpoint replays exactly the
batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import MultiTaskDataset
from ..nn import set_active_task
from . import distributed
from .batches import batch_loader, epoch_plan, labelled, progress_bar
from .checkpoints import CHECKPOINT, load_checkpoint, non_finite_parameters, save_checkpoint
from .config import ModelBuildError, TrainConfig, build_model, seed_everything
from .evaluation import evaluate
from .metrics import majority_baseline
from .precision import autocast, grad_scaler, in_layout, model_in_layout
from .results import write_results
from .selection import SELECT_SPLIT, BestEpoch, with_holdout

__all__ = ["TrainingDiverged", "train_epoch", "fit", "run_experiment"]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: the run stops, and nothing of it is saved."""


def _check_loss(loss: float, epoch: int, batch: int, task: int, config: TrainConfig) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"training diverged: loss {loss} at epoch {epoch + 1}, batch {batch + 1} (task "
                               f"{task}); try a smaller learning rate than lr={config.lr:g}")


def _check_weights(model: nn.Module, epoch: int, config: TrainConfig) -> None:
    bad = non_finite_parameters(model)
    if bad:
        raise TrainingDiverged(f"training diverged: non-finite weights after epoch {epoch + 1} (in {bad[0]}); "
                               f"try a smaller learning rate than lr={config.lr:g}")


def _split(dataset: MultiTaskDataset, name: str, least: int) -> MultiTaskDataset:
    data = dataset.split(name)
    if len(data) < least:
        raise ValueError(f"{dataset.name}: the {name} split has {len(data)} samples; a run needs at least {least}")
    return data


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: MultiTaskDataset, epoch: int,
                config: TrainConfig, progress: bool = True, scaler: torch.amp.GradScaler | None = None) -> dict:
    """One epoch of Algorithm 1 over ``data``; returns mean loss, samples, seconds, samples/s.
    ``scaler``: the fp16 loss scaler carried across epochs (made here when None)."""
    model.train()
    scaler = scaler if scaler is not None else grad_scaler(config.amp, config.device)
    batches, tasks, flips = epoch_plan(len(data), data.num_tasks, config.batch_size, config.seed, epoch,
                                       config.task_sampling)
    part = distributed.shard(batches, flips)  # this process's samples of each batch under torchrun, else None
    if part is not None:
        batches, flips = part.batches, part.flips
    hflip = data.hflip if config.hflip is None else config.hflip
    total_loss, samples, start = 0.0, 0, time.perf_counter()
    with progress_bar(len(batches), f"epoch {epoch + 1}/{config.epochs}", progress) as bar:
        for k, ((x, y), task, flip) in enumerate(zip(batch_loader(data, batches, config.num_workers), tasks, flips)):
            if hflip:
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            x, target = labelled(x, y[:, task])
            if target.numel() < 2:  # missing labels left fewer than BatchNorm needs: skip the step
                bar.update()
                continue
            x, target = in_layout(x.to(config.device), config.channels_last), target.to(config.device)
            set_active_task(model, task)
            with autocast(config.amp, config.device):
                logits = model(x).float()
            loss = F.binary_cross_entropy_with_logits(logits, target) if part is None else part.loss(logits, target, k)
            value = float(loss.detach())
            _check_loss(value, epoch, k, task, config)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += value * (x.shape[0] if part is None else part.loss_weight(k))
            samples += x.shape[0]
            rate = samples / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{total_loss / samples:.4f}", img_s=f"{rate:.0f}")
            bar.update()
    if part is not None:
        total_loss, samples = part.totals(total_loss, samples)
    seconds = time.perf_counter() - start
    return {"epoch": epoch + 1, "loss": total_loss / max(samples, 1), "samples": samples, "seconds": seconds,
            "samples_per_s": samples / max(seconds, 1e-9)}


def _run_settings(dataset: MultiTaskDataset, config: TrainConfig, info: dict | None) -> dict:
    """What a checkpoint must match to be resumed by this run: the data's tasks, the seed (masks, batches)
    and how the model was built."""
    return {"dataset": dataset.name, "task_names": list(dataset.task_names), "seed": config.seed, **(info or {})}


def fit(model: nn.Module, dataset: MultiTaskDataset, config: TrainConfig, out=None, resume: bool = False,
        progress: bool = True, log=print, info: dict | None = None) -> dict:
    """Train on ``dataset``'s train split, evaluate on ``config.eval_split``; with ``out``, checkpoint
    after every epoch (``resume`` continues from it) and write the results there. Returns them
    (``info``: extra entries for the results, e.g. how the model was built)."""
    out = Path(out) if out is not None else None
    if config.val_fraction:
        dataset = with_holdout(dataset, config.val_fraction, config.seed)
    train_data, eval_data = _split(dataset, "train", 2), _split(dataset, config.eval_split, 1)
    selection = BestEpoch(dataset.split(SELECT_SPLIT), train_data, config) if config.val_fraction else None
    model_in_layout(model.to(config.device), config.channels_last)
    trained = distributed.prepare_model(model, config)  # DDP with synced BatchNorm under torchrun, else model
    if not distributed.is_main():
        log, progress = (lambda *args, **kwargs: None), False
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    start_epoch, history = 0, []
    scaler = grad_scaler(config.amp, config.device)
    run = _run_settings(dataset, config, info)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and (out / CHECKPOINT).is_file():
            start_epoch, history = load_checkpoint(out / CHECKPOINT, model, optimizer, config, log, run)
            log(f"resumed from {out / CHECKPOINT} after epoch {start_epoch}")
            if selection is not None:
                selection.load(out / CHECKPOINT)
    for epoch in range(start_epoch, config.epochs):
        history.append(train_epoch(trained, optimizer, train_data, epoch, config, progress, scaler))
        h = history[-1]
        if selection is not None:
            selection.observe(model, epoch + 1, h)
        log(f"epoch {h['epoch']}/{config.epochs}: loss {h['loss']:.4f}, {h['samples_per_s']:.0f} samples/s, "
            f"{h['seconds']:.1f} s")
        _check_weights(model, epoch, config)
        if out is not None and distributed.is_main():
            save_checkpoint(out / CHECKPOINT, model, optimizer, epoch + 1, history, config, run,
                            selection=selection.state_dict() if selection is not None else None)
    if selection is not None:
        selection.restore_best(model)
    start = time.perf_counter()
    with distributed.local_statistics(model):
        metrics = evaluate(model, eval_data, config, progress, train_data)
    eval_seconds = time.perf_counter() - start
    baseline = majority_baseline(train_data.targets, eval_data.targets, eval_data.task_names, config.zero_division)
    results = {
        "dataset": dataset.name, "num_tasks": dataset.num_tasks, "eval_split": config.eval_split,
        "train_samples": len(train_data), "eval_samples": len(eval_data),
        "model": type(model).__name__, **(info or {}), "parameters": sum(p.numel() for p in model.parameters()),
        "config": dataclasses.asdict(config), "history": history,
        "train_seconds": sum(h["seconds"] for h in history), "eval_seconds": eval_seconds,
        "means": metrics.means(), "majority_baseline": baseline.means(),
        "selection": selection.summary() if selection is not None else None,
        "per_task": [dict(row, majority_accuracy=b["accuracy"]) for row, b in zip(metrics.rows(), baseline.rows())],
    }
    if out is not None and distributed.is_main():
        write_results(results, out)
    results["metrics"], results["baseline"] = metrics, baseline  # objects, for callers; not serialised
    return results


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
