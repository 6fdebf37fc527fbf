"""Per-task metrics against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from taskrouting.training.metrics import binary_metrics, format_table, majority_baseline, metrics_from_predictions

# 4 samples x 3 tasks. Task a: TP1 FP1 FN1 TN1. Task b: no positives, none predicted (TN4).
# Task c: TP2 FP1 FN0 TN1.
LOGITS = torch.tensor([[1.0, -1.0, 2.0], [-1.0, -1.0, -3.0], [2.0, -2.0, 1.0], [-1.0, -1.0, 1.0]])
LABELS = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]])


def test_hand_computed_values():
    m = binary_metrics(LOGITS, LABELS, ["a", "b", "c"])
    assert m.tp.tolist() == [1, 0, 2] and m.fp.tolist() == [1, 0, 1]
    assert m.fn.tolist() == [1, 0, 0] and m.tn.tolist() == [1, 4, 1]
    assert m.accuracy.tolist() == pytest.approx([0.5, 1.0, 0.75])
    assert m.precision.tolist() == pytest.approx([0.5, 0.0, 2 / 3])
    assert m.recall.tolist() == pytest.approx([0.5, 0.0, 1.0])
    assert m.f1.tolist() == pytest.approx([0.5, 0.0, 0.8])
    assert m.means() == pytest.approx({"accuracy": 0.75, "precision": (0.5 + 2 / 3) / 3, "recall": 0.5,
                                       "f1": 1.3 / 3})


def test_logit_zero_is_negative_and_1d_input():
    m = binary_metrics(torch.tensor([0.0, 0.1]), torch.tensor([1, 1]))
    assert (m.tp.item(), m.fn.item()) == (1, 1) and m.task_names == ["task_0"]


def test_zero_division_choices():
    ones = binary_metrics(LOGITS, LABELS, zero_division=1.0)
    assert ones.precision[1] == 1.0 and ones.recall[1] == 1.0 and ones.f1[1] == 1.0
    nan = binary_metrics(LOGITS, LABELS, zero_division=math.nan)
    assert math.isnan(nan.precision[1]) and nan.means()["precision"] == pytest.approx((0.5 + 2 / 3) / 2)
    # Positives but no predicted positives: precision undefined, recall 0, F1 0.
    m = metrics_from_predictions(torch.tensor([0, 0]), torch.tensor([1, 0]), zero_division=1.0)
    assert (m.precision.item(), m.recall.item(), m.f1.item()) == (1.0, 0.0, 0.0)


def test_majority_baseline():
    train = torch.tensor([[1, 0], [1, 0], [0, 1]])
    test = torch.tensor([[1, 0], [0, 0], [0, 1], [1, 1]])
    base = majority_baseline(train, test, ["x", "y"])
    assert base.accuracy.tolist() == [0.5, 0.5]
    assert base.precision.tolist() == [0.5, 0.0] and base.recall.tolist() == [1.0, 0.0]


def test_table_and_rows():
    m = binary_metrics(LOGITS, LABELS, ["a", "b", "c"])
    table = format_table(m, majority_baseline(LABELS, LABELS))
    lines = table.splitlines()
    assert lines[0].split() == ["task", "pos%", "acc", "prec", "rec", "f1", "majority", "acc"]
    assert lines[4].split() == ["c", "50.0", "75.0", "66.7", "100.0", "80.0", "50.0"]
    assert lines[-1].split() == ["mean", "(3", "tasks)", "33.3", "75.0", "38.9", "50.0", "43.3", "66.7"]
    short = format_table(m, max_rows=1)
    assert "... 2 more tasks" in short and "\nb " not in short
    assert m.rows()[2] == {"task": "c", "support": 4, "positives": 2, "positive_rate": 0.5, "accuracy": 0.75,
                           "precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                           "tp": 2, "fp": 1, "fn": 0, "tn": 1}


def test_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        binary_metrics(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="0 or 1"):
        binary_metrics(torch.zeros(2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="task names"):
        binary_metrics(torch.zeros(2, 2), torch.zeros(2, 2), ["only"])
