"""Multi-seed sweeps (merging across invocations), validation split and best epoch, Δm, missing labels,
round-robin task sampling and grouped synthetic tasks."""
from __future__ import annotations

import json
import math

import pytest
import torch

from taskrouting.data import MultiTaskDataset, load_dataset
from taskrouting.training import TrainConfig, epoch_plan, metrics_from_predictions
from taskrouting.training.baselines import delta_m, sample_tasks
from taskrouting.training.loop import fit, train_epoch
from taskrouting.training.metrics import majority_baseline
from taskrouting.training.selection import BestEpoch, with_holdout
from taskrouting.training.sweep import format_markdown, summarize, sweep

KWARGS = {"width_mult": 1 / 32, "pool_size": 1, "embedding_dim": 8}
FAST = dict(batch_size=32, lr=0.05, momentum=0.9, bn_batches=1)


def quiet(_):
    pass


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_tasks=2, num_samples=120, image_size=8, num_factors=4, seed=1)


def test_seeds_split_across_invocations_merge_into_one_table(data, tmp_path):
    config = TrainConfig(epochs=1, **FAST)
    first = sweep(data, [0.5, 1.0], None, "vgg11", KWARGS, config, tmp_path, progress=False, log=quiet, seeds=[0])
    second = sweep(data, [0.5, 1.0], None, "vgg11", KWARGS, config, tmp_path, progress=False, log=quiet, seeds=[1, 2])
    merged = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["sharing_ratio"], r["seed"]) for r in merged] == [(s, n) for s in (0.5, 1.0) for n in (0, 1, 2)]
    summary = json.loads((tmp_path / "sweep_summary.json").read_text())
    by_sigma = {r["sharing_ratio"]: r for r in summary}
    for sigma in (0.5, 1.0):
        values = [r["accuracy"] for r in first + second if r["sharing_ratio"] == sigma]
        entry = by_sigma[sigma]
        assert entry["seeds"] == [0, 1, 2] and entry["accuracy_per_seed"] == pytest.approx(values)
        mean = sum(values) / 3
        assert entry["accuracy_mean"] == pytest.approx(mean)
        assert entry["accuracy_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2))
    table = (tmp_path / "sweep.md").read_text()
    assert " ± " in table and table.count("| σ = ") == 2
    with pytest.raises(ValueError, match="other settings"):  # a run of other settings is not merged silently
        sweep(data, [0.5], None, "vgg11", KWARGS, TrainConfig(epochs=1, **{**FAST, "lr": 0.01}), tmp_path,
              progress=False, log=quiet, seeds=[3])


def test_summary_of_hand_made_rows():
    rows = [{"num_tasks": 2, "sharing_ratio": 0.5, "seed": s, "accuracy": a, "precision": 0.5, "recall": 0.5,
             "f1": 0.5, "majority_accuracy": 0.5, "error": ""} for s, a in ((0, 0.7), (1, 0.9))]
    rows.append({"num_tasks": 2, "sharing_ratio": 0.0, "seed": 0, "accuracy": math.nan, "error": "cannot build"})
    summary = {r["sharing_ratio"]: r for r in summarize(rows)}
    assert summary[0.5]["accuracy_mean"] == pytest.approx(0.8)
    assert summary[0.5]["accuracy_std"] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(summary[0.0]["accuracy_mean"]) and summary[0.0]["error"] == "cannot build"
    assert "80.0 ± 14.1" in format_markdown(rows)


def test_holdout_split_is_seeded_disjoint_and_refuses_an_existing_val(data):
    held = with_holdout(data, 0.25, seed=3)
    train, val = held.splits["train"], held.splits["val"]
    assert val.numel() == round(0.25 * data.splits["train"].numel())
    assert set(train.tolist()) | set(val.tolist()) == set(data.splits["train"].tolist())
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(with_holdout(data, 0.25, seed=3).splits["val"], val)
    assert not torch.equal(with_holdout(data, 0.25, seed=4).splits["val"], val)
    assert torch.equal(held.splits["test"], data.splits["test"]) and "val" not in data.splits
    with pytest.raises(ValueError, match="val"):
        with_holdout(held, 0.25, seed=3)
    with pytest.raises(ValueError, match="val_fraction"):
        with_holdout(data, 1.0, seed=3)


class Scripted(torch.nn.Module):
    """A model whose weight is set from outside; used to check which epoch's weights are kept."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def test_best_epoch_keeps_the_weights_of_the_best_validation_f1(data, monkeypatch):
    config = TrainConfig(epochs=5, eval_every=2, bn_eval="running")
    scores = iter([0.4, 0.7, 0.7])  # epochs 2, 4 and 5 (the last) are evaluated; the tie keeps epoch 4

    class Means:
        def __init__(self):
            self.value = next(scores)

        def means(self):
            return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": self.value}

    monkeypatch.setattr("taskrouting.training.selection.evaluate", lambda *a, **k: Means())
    model, best = Scripted(), BestEpoch(data, data, config)
    records = []
    for epoch in range(1, 6):
        with torch.no_grad():
            model.w.fill_(epoch)
        records.append({"epoch": epoch})
        best.observe(model, epoch, records[-1])
    assert [("val_f1" in r) for r in records] == [False, True, False, True, True]
    assert best.best_epoch == 4 and best.best_score == 0.7
    best.restore_best(model)
    assert float(model.w.detach()) == 4.0


def test_fit_with_val_fraction_reports_the_chosen_epoch(data, tmp_path):
    from taskrouting.training import build_model

    config = TrainConfig(epochs=2, val_fraction=0.25, **FAST)
    model = build_model("vgg11", data.num_tasks, 0.5, **KWARGS)
    results = fit(model, data, config, tmp_path, progress=False, log=quiet)
    selection = results["selection"]
    assert selection["best_epoch"] in (1, 2) and selection["val_samples"] == round(0.25 * 96)
    assert results["train_samples"] == 96 - selection["val_samples"]
    best = results["history"][selection["best_epoch"] - 1]["val_f1"]
    assert best == max(h["val_f1"] for h in results["history"]) == selection["best_val_score"]
    assert "val_f1" in (tmp_path / "history.csv").read_text().splitlines()[0]


def test_delta_m_against_hand_computed_values():
    single = {"a": {"f1": 0.5}, "b": {"f1": 0.8}, "c": {"f1": 0.0}}
    multi = {"a": {"f1": 0.6}, "b": {"f1": 0.6}, "c": {"f1": 0.3}, "d": {"f1": 1.0}}
    value, used = delta_m(multi, single, "f1")
    assert used == 2 and value == pytest.approx((0.2 - 0.25) / 2)  # (+20 % and -25 %) / 2; c has no baseline
    assert delta_m({"a": {"f1": 0.5}}, {"a": {"f1": 0.0}}, "f1")[1] == 0
    with pytest.raises(ValueError, match="lack"):
        delta_m({"a": {"f1": 0.5}}, single, "f1")
    assert sample_tasks(10, 3) == sample_tasks(10, 3) and len(set(sample_tasks(10, 3))) == 3
    assert sample_tasks(4, None) == sample_tasks(4, 9) == [0, 1, 2, 3]


def test_missing_labels_are_left_out_of_metrics_and_majority_baseline():
    nan = math.nan
    labels = torch.tensor([[1.0, 0.0], [nan, 1.0], [0.0, nan], [1.0, 1.0]])
    predictions = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 1]])
    m = metrics_from_predictions(predictions, labels)
    # task 0 (rows 0, 2, 3): tp 1, fp 1, fn 1, tn 0; task 1 (rows 0, 1, 3): tp 2, fp 1
    assert m.tp.tolist() == [1, 2] and m.fp.tolist() == [1, 1] and m.fn.tolist() == [1, 0]
    assert m.tn.tolist() == [0, 0] and m.support.tolist() == [3, 3]
    base = majority_baseline(labels, labels)  # known positive rates 2/3 and 2/3: predict positive
    assert base.tp.tolist() == [2, 2] and base.support.tolist() == [3, 3]


def test_missing_labels_in_the_dataset_and_the_loss():
    nan = math.nan
    labels = torch.tensor([[1.0, nan], [0.0, 1.0], [nan, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, nan]])
    data = MultiTaskDataset(torch.randn(6, 1, 4, 4), labels, ["a", "b"], {"train": torch.arange(6)}, name="t")
    assert data.known.tolist() == (~labels.isnan()).tolist() and data.labels.dtype == torch.uint8
    assert torch.equal(data.targets.isnan(), labels.isnan())
    assert torch.equal(data.select_tasks(["b"]).targets[:, 0].isnan(), labels[:, 1].isnan())
    assert torch.equal(data.split("train").get_batch([0, 2])[1].isnan(), labels[[0, 2]].isnan())
    assert data.positive_rate().tolist() == pytest.approx([3 / 5, 2 / 4])

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            seen.append(x.shape[0])
            return self.w * x.flatten(1).sum(1)

    model = Recorder()
    config = TrainConfig(epochs=1, batch_size=6, hflip=False)
    result = train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), data, 0, config, progress=False)
    _, tasks, _ = epoch_plan(6, 2, 6, 0, 0)
    assert seen == [int((~labels[:, tasks[0]].isnan()).sum())] and result["samples"] == seen[0]
    assert math.isfinite(result["loss"])


def test_round_robin_sampling_cycles_over_tasks_across_epochs():
    _, tasks0, flips0 = epoch_plan(50, 3, 10, 0, 0, "round-robin")
    _, tasks1, _ = epoch_plan(50, 3, 10, 0, 1, "round-robin")
    assert tasks0 + tasks1 == [k % 3 for k in range(10)]
    _, _, flips_uniform = epoch_plan(50, 3, 10, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(flips0, flips_uniform))
    with pytest.raises(ValueError, match="task_sampling"):
        TrainConfig(task_sampling="random")


def test_grouped_synthetic_tasks_share_factors_only_within_a_group():
    data = load_dataset("synthetic", num_tasks=8, num_samples=3000, num_factors=8, groups=2, relatedness=0.9,
                        label_noise=0.0, seed=0)
    corr = torch.corrcoef(data.labels.float().T)
    same = [corr[i, j] for i in range(8) for j in range(i + 1, 8) if i % 2 == j % 2]
    other = [corr[i, j] for i in range(8) for j in range(i + 1, 8) if i % 2 != j % 2]
    assert min(same) > 0.4 and max(abs(c) for c in other) < 0.1
    ungrouped = load_dataset("synthetic", num_tasks=3, num_samples=50, seed=2)
    assert torch.equal(ungrouped.labels, load_dataset("synthetic", num_tasks=3, num_samples=50, seed=2,
                                                      groups=1).labels)
    with pytest.raises(ValueError, match="groups"):
        load_dataset("synthetic", num_tasks=3, num_factors=4, groups=5)
    with pytest.raises(ValueError, match="between_relatedness"):
        load_dataset("synthetic", num_tasks=3, between_relatedness=0.5)


def test_csv_loader_reads_empty_cells_as_missing_labels(tmp_path):
    from PIL import Image

    for k in range(3):
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / f"{k}.png")
    (tmp_path / "labels.csv").write_text("image,split,a,b\n0.png,train,1,\n1.png,train,0,1\n2.png,test,,0\n")
    data = load_dataset("csv", tmp_path, image_size=8)
    assert data.targets.isnan().tolist() == [[False, True], [False, False], [True, False]]
    assert data.targets.nan_to_num(-1).tolist() == [[1, -1], [0, 1], [-1, 0]]
