"""Evaluation over every task: logits of each task for each sample, and per-task metrics.

BatchNorm at evaluation (``config.bn_eval``): with σ < 1 the input of every layer after the
first depends on the task's masks, so running statistics averaged over batches of all tasks fit
no single task (on digits they turn a model that is 97% right into one that predicts the
majority class everywhere). Routed models therefore keep per-task statistics (``task_stats``),
and ``bn_eval="stored"`` (the default) is plain ``model.eval()`` with what the layers hold:
each task's own statistics, or the shared ones for a model without them.
``bn_eval="recalibrate"`` re-estimates the statistics for each task from ``bn_batches``
training batches with that task active (a cumulative average, weights untouched, the model's
own statistics restored afterwards; needs the training data, T calibration passes).
``bn_eval="batch"`` normalises with each evaluation batch's own statistics (nothing kept).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..data import MultiTaskDataset
from ..nn import set_active_task
from ..nn.bn_relu_route import BATCH_NORMS
from .batches import batch_loader, progress_bar
from .config import TrainConfig
from .metrics import TaskMetrics, binary_metrics
from .precision import autocast

__all__ = ["recalibrate_bn", "predict", "evaluate"]


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]


@contextlib.contextmanager
def _kept_bn_state(model: nn.Module):
    """Restore every BatchNorm's running statistics, momentum and mode, and the model's mode, on exit."""
    layers = _bn_layers(model)
    # Every buffer but the masks: the shared running statistics and, with task_stats, the per-task ones.
    saved = [(m, m.momentum, m.training, {k: b.clone() for k, b in m.named_buffers(recurse=False)
                                          if k != "masks" and b is not None})
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
    for x, _ in batch_loader(data, batches, num_workers):
        model(x.to(device))
    model.eval()


def _calibration_batches(num_samples: int, batch_size: int, count: int, seed: int) -> list[torch.Tensor]:
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return [b for b in order[:batch_size * count].split(batch_size) if b.numel() > 1]


@torch.no_grad()
def predict(model: nn.Module, data: MultiTaskDataset, batch_size: int = 256, device: str = "cpu",
            num_workers: int = 0, progress: bool = False, calibration: MultiTaskDataset | None = None,
            calibration_batches: int = 8, seed: int = 0, batch_stats: bool = False) -> torch.Tensor:
    """Logits ``[N, T]`` of every sample for every task, in eval mode. Without ``calibration``,
    each task is set active in turn per batch (every batch is read once); with it, each task's
    BatchNorm statistics are first re-estimated on ``calibration_batches`` seeded batches of
    ``calibration`` (``recalibrate_bn``). ``batch_stats``: BatchNorm layers normalise with each
    batch's statistics instead. The model's own state is restored afterwards."""
    batches = list(torch.arange(len(data)).split(batch_size))
    logits = torch.empty(len(data), data.num_tasks)
    with _kept_bn_state(model), progress_bar(data.num_tasks if calibration else len(batches), "evaluating",
                                          progress) as bar:
        model.eval()
        if batch_stats:
            for m in _bn_layers(model):
                m.train()
        if calibration is None:
            for index, (x, _) in zip(batches, batch_loader(data, batches, num_workers)):
                x = x.to(device)
                for task in range(data.num_tasks):
                    set_active_task(model, task)
                    logits[index, task] = model(x).float().cpu()
                bar.update()
            return logits
        fitting = _calibration_batches(len(calibration), batch_size, calibration_batches, seed)
        for task in range(data.num_tasks):
            recalibrate_bn(model, calibration, task, fitting, device, num_workers)
            for index, (x, _) in zip(batches, batch_loader(data, batches, num_workers)):
                logits[index, task] = model(x.to(device)).float().cpu()
            bar.update()
    return logits


def evaluate(model: nn.Module, data: MultiTaskDataset, config: TrainConfig | None = None,
             progress: bool = False, calibration: MultiTaskDataset | None = None) -> TaskMetrics:
    """Per-task metrics of ``model`` on ``data``, BatchNorm statistics as ``config.bn_eval`` says
    (``recalibrate``: re-estimated per task on ``calibration``, the training data)."""
    config = config or TrainConfig()
    if config.bn_eval == "recalibrate" and calibration is None:
        raise ValueError('bn_eval="recalibrate" needs calibration data (the training split)')
    with autocast(config.amp, config.device):
        logits = predict(model, data, config.eval_batch_size, config.device, config.num_workers, progress,
                         calibration if config.bn_eval == "recalibrate" else None, config.bn_batches, config.seed,
                         batch_stats=config.bn_eval == "batch")
    return binary_metrics(logits, data.targets, data.task_names, config.zero_division)
