"""Algorithm 1 training, evaluation over every task, checkpoints and resume, and the σ sweep.

Most tests use a stand-in model that only follows the models' interface (``set_active_task``,
then ``model(x)`` gives one logit per sample); ``build_model`` is checked with the real VGG-11.
"""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taskrouting import BNReLURoute2d, TaskConditioned, set_active_task
from taskrouting.data import load_dataset
from taskrouting.training import (
    CHECKPOINT,
    ModelBuildError,
    TrainConfig,
    build_model,
    epoch_plan,
    fit,
    predict,
    recalibrate_bn,
    run_experiment,
    seed_everything,
)
from taskrouting.training.checkpoints import read_checkpoint
from taskrouting.training.sweep import format_markdown, sweep


class TaskLinear(nn.Module, TaskConditioned):
    """One linear head per task: one logit per sample for the active task (int or [N])."""

    def __init__(self, features: int, num_tasks: int):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(num_tasks, features))
        self.bias = nn.Parameter(torch.zeros(num_tasks))
        self.active_task = None

    def forward(self, x):
        task = self.active_task
        if isinstance(task, torch.Tensor):
            return (x * self.weight[task]).sum(1) + self.bias[task]
        return x @ self.weight[task] + self.bias[task]


class StandIn(nn.Module):
    """conv → BNReLURoute2d → 2x2 average pool → per-task linear heads."""

    def __init__(self, num_tasks: int, sharing_ratio: float = 0.5, seed: int = 0, in_channels: int = 3, width=16):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.route = BNReLURoute2d(width, num_tasks=num_tasks, sharing_ratio=sharing_ratio, seed=seed)
        self.heads = TaskLinear(width * 4, num_tasks)

    def forward(self, x):
        return self.heads(F.adaptive_avg_pool2d(self.route(self.conv(x)), 2).flatten(1))


FAST = dict(batch_size=32, lr=0.05, momentum=0.9)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_tasks=4, num_samples=400, image_size=8, num_factors=4, relatedness=0.5,
                        seed=1)


def stand_in(data, seed=0, **kw):
    seed_everything(seed)
    return StandIn(data.num_tasks, in_channels=data.image_shape[0], **kw)


def quiet(_):
    pass


def test_epoch_plan_is_deterministic_and_covers_the_data():
    batches, tasks, flips = epoch_plan(65, 5, 16, seed=3, epoch=2)
    assert [b.numel() for b in batches] == [16, 16, 16, 16]  # the last batch of 1 is dropped
    assert len(set(torch.cat(batches).tolist())) == 64 and all(0 <= t < 5 for t in tasks)
    again = epoch_plan(65, 5, 16, seed=3, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(batches, again[0])) and tasks == again[1]
    assert tasks != epoch_plan(65, 5, 16, seed=3, epoch=3)[1] or not torch.equal(
        batches[0], epoch_plan(65, 5, 16, seed=3, epoch=3)[0][0])


@pytest.mark.parametrize("bn_eval", ["per-task", "running"])
def test_training_reduces_loss_and_beats_chance(data, bn_eval):
    results = fit(stand_in(data), data, TrainConfig(epochs=8, bn_eval=bn_eval, **FAST), progress=False, log=quiet)
    losses = [h["loss"] for h in results["history"]]
    assert losses[-1] < 0.6 * losses[0]
    assert results["means"]["accuracy"] > results["majority_baseline"]["accuracy"] + 0.2
    assert results["means"]["accuracy"] > 0.8


def test_predict_sets_each_task_and_restores_training_mode(data):
    model, test = stand_in(data), data.split("test")
    model.train()
    logits = predict(model, test, batch_size=7)
    assert model.training and logits.shape == (len(test), data.num_tasks)
    model.eval()
    x, _ = test.get_batch(torch.arange(len(test)))
    with torch.no_grad():
        for task in range(data.num_tasks):
            set_active_task(model, task)
            torch.testing.assert_close(logits[:, task], model(x))
        set_active_task(model, torch.arange(len(test)) % data.num_tasks)  # per-sample tasks agree
        torch.testing.assert_close(model(x), logits[torch.arange(len(test)), torch.arange(len(test)) % 4])


def test_per_task_bn_statistics_leave_the_model_as_it_was(data):
    model, train, test = stand_in(data, sharing_ratio=0.25), data.split("train"), data.split("test")
    fit(model, data, TrainConfig(epochs=1, **FAST), progress=False, log=quiet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = predict(model, test, batch_size=50, calibration=train, calibration_batches=2, seed=4)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.route.momentum == 0.1
    assert not torch.allclose(logits, predict(model, test, batch_size=50))  # the statistics did change
    batches = [b for b in torch.randperm(len(train), generator=torch.Generator().manual_seed(4))[:100].split(50)]
    recalibrate_bn(model, train, 2, batches)
    assert not model.training and int(model.route.num_batches_tracked) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(test.get_batch(torch.arange(len(test)))[0]), logits[:, 2])


def test_resume_matches_uninterrupted_run(data, tmp_path):
    config = dict(FAST, hflip=True, seed=5)
    straight = stand_in(data)
    full = fit(straight, data, TrainConfig(epochs=3, **config), tmp_path / "a", progress=False, log=quiet)

    fit(stand_in(data), data, TrainConfig(epochs=1, **config), tmp_path / "b", progress=False, log=quiet)
    torch.manual_seed(1234)  # disturb the global RNG: resume restores it
    resumed_model = stand_in(data, seed=99)  # different init: the checkpoint overwrites it
    messages = []
    resumed = fit(resumed_model, data, TrainConfig(epochs=3, **config), tmp_path / "b", resume=True,
                  progress=False, log=messages.append)
    assert any("resumed" in m and "after epoch 1" in m for m in messages)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    assert resumed["means"] == full["means"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


def test_outputs_and_checkpoint_contents(data, tmp_path):
    results = fit(stand_in(data), data, TrainConfig(epochs=1, **FAST), tmp_path, progress=False, log=quiet)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["means"] == pytest.approx(results["means"]) and saved["config"]["lr"] == FAST["lr"]
    assert set(saved["majority_baseline"]) == {"accuracy", "precision", "recall", "f1"}
    with open(tmp_path / "per_task.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == data.task_names and "majority_accuracy" in rows[0]
    assert (tmp_path / "history.csv").read_text().startswith("epoch,loss")
    state = read_checkpoint(tmp_path / CHECKPOINT)
    assert state["epoch"] == 1 and "route.masks" in state["model"] and "optimizer" in state and "rng" in state


def test_progress_bar_can_be_shown(data, capsys):
    fit(stand_in(data), data, TrainConfig(epochs=1, **FAST), progress=True, log=quiet)
    assert "img_s" in capsys.readouterr().err


def test_build_model_real_vgg_and_errors(data):
    model = build_model("vgg11", 4, 0.5, seed=0, in_channels=3, width_mult=1 / 16, pool_size=1, embedding_dim=8)
    set_active_task(model, 2)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2,)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("alexnet", 4, 0.5)
    many = data.select_tasks(3)
    with pytest.raises(ModelBuildError, match="sharing_ratio=0"):
        run_experiment(load_dataset("synthetic", num_tasks=9, num_samples=40, image_size=4), "vgg11", 0.0,
                       TrainConfig(epochs=1), {"width_mult": 1 / 16}, progress=False, log=quiet)
    results = run_experiment(many, "vgg11", 0.5, TrainConfig(epochs=1, **FAST),
                             {"width_mult": 1 / 16, "pool_size": 1, "embedding_dim": 8}, progress=False, log=quiet)
    assert results["model_name"] == "vgg11" and results["num_tasks"] == 3


def test_sweep_table_plot_and_resume(data, tmp_path, monkeypatch):
    kwargs = {"width_mult": 1 / 32, "pool_size": 1, "embedding_dim": 8}  # 2 channels in the first layer
    config = TrainConfig(epochs=1, **FAST)
    rows = sweep(data, [0.0, 0.5, 1.0], [2, 4], "vgg11", kwargs, config, tmp_path, progress=False, log=quiet)
    assert [(r["num_tasks"], r["sharing_ratio"]) for r in rows] == [(2, 0.0), (2, 0.5), (2, 1.0),
                                                                   (4, 0.0), (4, 0.5), (4, 1.0)]
    assert math.isnan(rows[3]["accuracy"]) and "sharing_ratio=0" in rows[3]["error"]  # 4 tasks > 2 channels
    assert all(0 <= r["accuracy"] <= 1 for r in rows if not r["error"])
    for name in ("sweep.csv", "sweep.json", "sweep.md", "sweep.png", "sweep_tasks.png"):
        assert (tmp_path / name).stat().st_size > 0
    markdown = (tmp_path / "sweep.md").read_text().splitlines()
    assert markdown[0].startswith("| Approach | 2 tasks Accuracy") and markdown[2].startswith("| σ = 0 |")
    assert markdown[3].startswith("| σ = 1 |") and markdown[-1].startswith("| majority class |")
    assert "n/a" in markdown[2]

    def no_training(*args, **kwargs):
        raise AssertionError("finished runs must be read back, not trained again")

    monkeypatch.setattr("taskrouting.training.sweep.run_experiment", no_training)
    monkeypatch.setattr("taskrouting.training.sweep.ModelBuildError", AssertionError)
    again = sweep(data, [0.5, 1.0], [2, 4], "vgg11", kwargs, config, tmp_path / ".", resume=True, progress=False,
                  log=quiet)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows if r["sharing_ratio"] > 0]
    assert format_markdown(again).count("**") >= 2
