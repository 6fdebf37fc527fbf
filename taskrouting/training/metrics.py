"""Per-task binary classification metrics (accuracy, precision, recall, F1), their means, a table.

A prediction is positive when its logit is > 0 (probability > 0.5). Undefined ratios:
precision with no predicted positives (TP + FP = 0), recall with no positives (TP + FN = 0)
and F1 with neither (TP + FP + FN = 0, F1 = 2TP / (2TP + FP + FN)) take ``zero_division``:
0.0 by default (scikit-learn's ``zero_division=0``), or 1.0, or ``nan``, which leaves those
tasks out of the means. Means are macro averages over tasks, as in the paper's tables.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

__all__ = ["TaskMetrics", "binary_metrics", "metrics_from_predictions", "majority_baseline", "format_table",
           "METRICS"]

METRICS = ("accuracy", "precision", "recall", "f1")


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, zero_division: float) -> torch.Tensor:
    out = numerator.double() / denominator.clamp(min=1).double()
    return torch.where(denominator > 0, out, torch.full_like(out, zero_division))


@dataclasses.dataclass
class TaskMetrics:
    """Per-task counts and scores (tensors ``[T]``) and the task names."""

    task_names: list[str]
    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    tn: torch.Tensor
    zero_division: float = 0.0

    @property
    def support(self) -> torch.Tensor:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def positives(self) -> torch.Tensor:
        return self.tp + self.fn

    @property
    def accuracy(self) -> torch.Tensor:
        return _ratio(self.tp + self.tn, self.support, self.zero_division)

    @property
    def precision(self) -> torch.Tensor:
        return _ratio(self.tp, self.tp + self.fp, self.zero_division)

    @property
    def recall(self) -> torch.Tensor:
        return _ratio(self.tp, self.tp + self.fn, self.zero_division)

    @property
    def f1(self) -> torch.Tensor:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn, self.zero_division)

    def means(self) -> dict[str, float]:
        """Macro means over tasks (tasks whose value is nan are left out)."""
        out = {}
        for name in METRICS:
            values = getattr(self, name)
            values = values[~values.isnan()]
            out[name] = float(values.mean()) if values.numel() else math.nan
        return out

    def rows(self) -> list[dict]:
        """One dict per task: name, counts, positive rate and the four scores."""
        scores = {name: getattr(self, name).tolist() for name in METRICS}
        rows = []
        for t, task in enumerate(self.task_names):
            support = int(self.support[t])
            rows.append({"task": task, "support": support, "positives": int(self.positives[t]),
                         "positive_rate": int(self.positives[t]) / support if support else math.nan,
                         **{name: scores[name][t] for name in METRICS},
                         "tp": int(self.tp[t]), "fp": int(self.fp[t]), "fn": int(self.fn[t]), "tn": int(self.tn[t])})
        return rows


def metrics_from_predictions(predictions: torch.Tensor, labels: torch.Tensor, task_names: Sequence[str] | None = None,
                             zero_division: float = 0.0) -> TaskMetrics:
    """Metrics of 0/1 (or bool) ``predictions`` against 0/1 ``labels``, both ``[N, T]`` (or ``[N]``);
    a NaN label is missing: that sample counts for none of its task's counts."""
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    if predictions.dim() == 1:
        predictions, labels = predictions[:, None], labels[:, None]
    if predictions.dim() != 2:
        raise ValueError(f"predictions must be [N, T] or [N], got {tuple(predictions.shape)}")
    known = ~labels.isnan() if labels.is_floating_point() else torch.ones(labels.shape, dtype=torch.bool)
    if labels.numel() and not bool(((labels == 0) | (labels == 1) | ~known).all()):
        raise ValueError("labels must be 0 or 1 (or NaN for a missing label)")
    pred, true = predictions.bool() & known, (labels.nan_to_num(0) if labels.is_floating_point() else labels).bool()
    names = list(task_names) if task_names is not None else [f"task_{t}" for t in range(labels.shape[1])]
    if len(names) != labels.shape[1]:
        raise ValueError(f"{len(names)} task names for {labels.shape[1]} tasks")
    return TaskMetrics(names, (pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0),
                       (~pred & ~true & known).sum(0), zero_division)


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor, task_names: Sequence[str] | None = None,
                   zero_division: float = 0.0) -> TaskMetrics:
    """Metrics of ``logits`` (positive when > 0) against 0/1 ``labels``, both ``[N, T]`` (or ``[N]``)."""
    return metrics_from_predictions(logits > 0, labels, task_names, zero_division)


def majority_baseline(train_labels: torch.Tensor, test_labels: torch.Tensor, task_names: Sequence[str] | None = None,
                      zero_division: float = 0.0) -> TaskMetrics:
    """A constant predictor per task: the class that is the majority in ``train_labels``
    (negative on a tie), scored on ``test_labels`` (both ``[N, T]``; NaN labels are missing)."""
    majority = train_labels.float().nanmean(0) > 0.5  # NaN (no known label) compares False: negative
    return metrics_from_predictions(majority.expand_as(test_labels), test_labels, task_names, zero_division)


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def format_table(metrics: TaskMetrics, baseline: TaskMetrics | None = None, max_rows: int | None = None) -> str:
    """A fixed-width table (scores in %): one row per task, then the means; with ``baseline``,
    a column with its accuracy. ``max_rows`` keeps the first tasks and says how many were left out."""
    headers = ["task", "pos%", "acc", "prec", "rec", "f1"] + (["majority acc"] if baseline is not None else [])
    table, rows = [], metrics.rows()
    base_rows = baseline.rows() if baseline is not None else None
    shown = rows if max_rows is None else rows[:max_rows]
    for t, row in enumerate(shown):
        cells = [row["task"], _percent(row["positive_rate"])] + [_percent(row[m]) for m in METRICS]
        table.append(cells + ([_percent(base_rows[t]["accuracy"])] if base_rows else []))
    means = metrics.means()
    positive_rate = float(metrics.positives.sum() / metrics.support.sum().clamp(min=1))
    footer = [f"mean ({len(rows)} tasks)", _percent(positive_rate)]
    footer += [_percent(means[m]) for m in METRICS]
    footer += [_percent(baseline.means()["accuracy"])] if baseline is not None else []
    widths = [max(len(str(r[i])) for r in [headers, footer, *table]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(headers))
    out = [line(headers), rule, *map(line, table)]
    if len(shown) < len(rows):
        out.append(f"... {len(rows) - len(shown)} more tasks")
    return "\n".join(out + [rule, line(footer)])
