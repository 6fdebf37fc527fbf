"""Single-task baselines and the multi-task gain Δm over them.

A single-task baseline is the same architecture trained on one task alone (σ = 1: with one task
there is nothing to route) with the same settings and seed. Δm is the MTL literature's measure
(e.g. Maninis et al. 2019, Vandenhende et al. 2021): the mean over tasks of the relative change
of a higher-is-better score, ``Δm = 1 / T * sum_t (M_multi,t - M_single,t) / M_single,t`` (a
fraction, like the scores; tables show it in %).
A task whose baseline score is 0 has no relative change; it is left out and the count of tasks
used is reported next to the value.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..data import MultiTaskDataset
from .config import TrainConfig
from .loop import run_experiment

__all__ = ["sample_tasks", "single_task_baselines", "delta_m", "DELTA_SCORES"]

DELTA_SCORES = ("accuracy", "f1")


def sample_tasks(num_tasks: int, count: int | None, seed: int = 0) -> list[int]:
    """``count`` task indices below ``num_tasks``, a seeded sample in increasing order (all when
    ``count`` is None or at least ``num_tasks``)."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"the number of single-task baselines must be an int >= 1, got {count!r}")
    if count is None or count >= num_tasks:
        return list(range(num_tasks))
    return sorted(torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def _finished(run_dir: Path | None, epochs: int) -> dict | None:
    if run_dir is None or not (run_dir / "results.json").is_file():
        return None
    results = json.loads((run_dir / "results.json").read_text())
    history = results.get("history") or []
    return results if history and history[-1]["epoch"] >= epochs else None


def single_task_baselines(dataset: MultiTaskDataset, tasks, model_name: str, model_kwargs: dict | None,
                          config: TrainConfig, out=None, resume: bool = False, progress: bool = True,
                          log=print) -> dict[str, dict]:
    """Train one single-task model per task index in ``tasks``; returns ``{task name: per-task row}``
    (the scores of ``per_task.csv``). With ``out``, run t writes into ``out/<task name>/``, and with
    ``resume`` finished runs are read back."""
    out = Path(out) if out is not None else None
    rows = {}
    for t in tasks:
        name = dataset.task_names[t]
        run_dir = out / name if out is not None else None
        results = _finished(run_dir, config.epochs) if resume else None
        if results is None:
            log(f"== single-task baseline: {name}")
            results = run_experiment(dataset.select_tasks([t]), model_name, 1.0, config, model_kwargs, run_dir,
                                     resume, progress, log)
        rows[name] = results["per_task"][0]
    return rows


def delta_m(multi: dict[str, dict], single: dict[str, dict], score: str) -> tuple[float, int]:
    """``(Δm as a fraction (x 100 for %), tasks used)`` of per-task rows ``multi`` against ``single``
    (both ``{task: row}``, rows holding ``score``) over the tasks of ``single``; NaN and 0 when no task has a non-zero
    baseline. A task of ``single`` missing from ``multi`` is an error, not a silent skip."""
    missing = sorted(set(single) - set(multi))
    if missing:
        raise ValueError(f"the multi-task results lack the baseline tasks {missing[:5]}")
    changes = [(multi[t][score] - row[score]) / row[score] for t, row in single.items()
               if row[score] is not None and row[score] > 0 and multi[t][score] is not None]
    return (sum(changes) / len(changes), len(changes)) if changes else (math.nan, 0)
