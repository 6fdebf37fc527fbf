"""Reliability of training runs: checkpoints that are verified, loaded without running code and refused
for another run; runs that stop when they diverge; and a fault test: a run SIGKILLed at several points
(mid-epoch, mid-checkpoint-write, before and after the rename) resumes to bit-identical weights."""
from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing
import os
import pickle
import random
import signal
import sys

import numpy as np
import pytest
import torch
from torch import nn

from taskrouting.cli import main
from taskrouting.data import load_dataset
from taskrouting.training import CHECKPOINT, CheckpointError, ConfigError, TrainConfig, TrainingDiverged, fit
from taskrouting.training.checkpoints import MAGIC, read_checkpoint, rng_state, save_atomic, set_rng_state

TINY = ["--data", "synthetic", "--data-arg", "num_tasks=2", "--data-arg", "num_samples=64", "--data-arg",
        "image_size=8", "--width-mult", "0.125", "--pool-size", "1", "--embedding-dim", "8", "--batch-size", "16",
        "--bn-batches", "1", "--eval-batch-size", "32", "--threads", "1", "--no-progress"]
STEPS_PER_EPOCH = 3  # 51 train samples in batches of 16


def quiet(_):
    pass


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_tasks=2, num_samples=64, image_size=8)


class Tiny(nn.Module):
    """A linear logit of the mean pixel per task (no masks): enough for the loop's checks."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_tasks))
        self.unused = nn.Parameter(torch.zeros(1))
        self.active_task = 0

    def forward(self, x):
        return x.mean(dim=(1, 2, 3)) * self.weight[self.active_task]


# --- checkpoints -----------------------------------------------------------------------------------

def _train_tiny(tmp_path, *extra):
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path), *extra]) == 0


def test_checkpoint_holds_plain_data_and_the_run(tmp_path):
    _train_tiny(tmp_path)
    raw = (tmp_path / CHECKPOINT).read_bytes()
    assert raw.startswith(MAGIC)
    payload = raw[len(MAGIC) + 65:]
    assert raw[len(MAGIC):len(MAGIC) + 64].decode() == hashlib.sha256(payload).hexdigest()
    state = torch.load(io.BytesIO(payload), weights_only=True)  # plain data and tensors only
    assert state["epoch"] == 1 and state["run"]["sharing_ratio"] == 0.5 and state["run"]["seed"] == 0
    assert state["run"]["model_kwargs"]["width_mult"] == 0.125 and state["run"]["task_names"] == ["attr_0", "attr_1"]


def test_rng_state_round_trips():
    state = rng_state()
    expected = (random.random(), float(torch.rand(1)), np.random.rand())
    random.seed(1), torch.manual_seed(1), np.random.seed(1)
    set_rng_state(state)
    assert (random.random(), float(torch.rand(1)), np.random.rand()) == expected


def _corruptions(raw: bytes):
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01
    return {"empty": (b"", "empty"), "truncated": (raw[:len(raw) // 2], "SHA-256"),
            "flipped byte": (bytes(flipped), "SHA-256"), "garbage": (b"\x00garbage" * 10, "not a taskrouting"),
            "header only": (MAGIC, "SHA-256")}


def test_corrupted_checkpoints_are_refused(tmp_path):
    _train_tiny(tmp_path)
    path = tmp_path / CHECKPOINT
    raw = path.read_bytes()
    for name, (content, match) in _corruptions(raw).items():
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=match):
            read_checkpoint(path)
    path.write_bytes(raw)
    assert read_checkpoint(path)["epoch"] == 1


def test_cli_refuses_corrupted_checkpoint_in_one_line(tmp_path, capsys):
    _train_tiny(tmp_path)
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:-10])
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SHA-256" in err and str(path) in err and "Traceback" not in err


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_with_code_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"model": _RunsCode()}, protocol=2)
    (tmp_path / "evil.pt").write_bytes(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    with pytest.raises(CheckpointError, match="tensors and plain data"):
        read_checkpoint(tmp_path / "evil.pt")
    torch.save({"model": {}, "rng": {"numpy": np.zeros(3)}}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="older taskrouting"):
        read_checkpoint(tmp_path / "old.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("flags, setting", [(["--sharing-ratio", "0.3"], "sharing_ratio=0.5"),
                                            (["--seed", "1"], "seed=0"), (["--width-mult", "0.25"], "width_mult"),
                                            (["--data-arg", "num_tasks=3"], "task_names")])
def test_resume_refuses_another_runs_checkpoint(tmp_path, capsys, flags, setting):
    _train_tiny(tmp_path)
    before = (tmp_path / CHECKPOINT).read_bytes()
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path), "--resume", *flags]) == 2
    err = capsys.readouterr().err
    assert setting in err and "resume with the same setting" in err and err.count("\n") == 1
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_resume_may_change_the_backend(tmp_path, capsys):
    _train_tiny(tmp_path)
    assert main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path), "--resume", "--backend", "reference"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_save_atomic_replaces_only_complete_files(tmp_path):
    save_atomic({"a": torch.ones(2)}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt.tmp").exists()
    assert torch.equal(torch.load(io.BytesIO((tmp_path / "c.pt").read_bytes()[len(MAGIC) + 65:]))["a"],
                       torch.ones(2))


# --- divergence and hyper-parameters --------------------------------------------------------------

def test_diverging_run_stops_without_results(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "3", "--lr", "1e12", "--momentum", "0.9", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "run failed: training diverged" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()
    if (tmp_path / CHECKPOINT).exists():  # an epoch may have ended before the loss blew up: finite weights only
        state = read_checkpoint(tmp_path / CHECKPOINT)
        assert all(bool(v.isfinite().all()) for v in state["model"].values() if v.is_floating_point())


def test_non_finite_weights_stop_the_run_before_a_checkpoint(data, tmp_path):
    model = Tiny(data.num_tasks)
    with torch.no_grad():
        model.unused.fill_(math.inf)  # the loss stays finite; the weights are not
    with pytest.raises(TrainingDiverged, match="non-finite weights after epoch 1 .in unused"):
        fit(model, data, TrainConfig(epochs=2, batch_size=16, bn_batches=1), tmp_path, progress=False, log=quiet)
    assert not (tmp_path / CHECKPOINT).exists() and not (tmp_path / "results.json").exists()


def test_nan_loss_stops_before_the_step(data):
    model = Tiny(data.num_tasks)
    with torch.no_grad():
        model.weight.fill_(math.nan)
    with pytest.raises(TrainingDiverged, match="loss nan at epoch 1, batch 1"):
        fit(model, data, TrainConfig(epochs=1, batch_size=16, bn_batches=1), progress=False, log=quiet)


@pytest.mark.parametrize("field, value", [("lr", math.inf), ("lr", math.nan), ("lr", 0.0), ("momentum", math.nan),
                                          ("momentum", 1.0), ("weight_decay", -math.inf), ("lr", "0.1"),
                                          ("seed", 2 ** 70), ("seed", -1), ("seed", 1.0)])
def test_config_rejects_bad_numbers(field, value):
    with pytest.raises(ConfigError, match=field) as info:
        TrainConfig(**{field: value})
    assert info.value.field == field


def test_empty_train_split_is_refused(capsys):
    argv = ["train", *TINY[:4], "--data-arg", "num_samples=4", "--data-arg", "test_fraction=0.9", *TINY[6:]]
    assert main([*argv, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "'train' split" in err and err.count("\n") == 1


# --- the fault test ---------------------------------------------------------------------------------

def _killed_run(argv, kill):
    """Child process: ``taskrouting train argv``, SIGKILLed at ``kill`` = (where, n) within this process:
    the n-th batch ("step"), half-way through writing the n-th checkpoint ("write"), after writing it but
    before the rename ("rename"), or right after the rename ("saved")."""
    from taskrouting.training import checkpoints, loop

    where, n = kill if kill else (None, 0)
    calls = []

    def counted(original, before=None, after=None):
        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == n and before:
                before(*args)
            result = original(*args, **kwargs)
            if len(calls) == n and after:
                after(*args)
            return result
        return wrapper

    def die(*_):
        os.kill(os.getpid(), signal.SIGKILL)

    def half_written(path, data):
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        die()

    if where == "step":
        loop._check_loss = counted(loop._check_loss, before=die)
    elif where == "write":
        checkpoints._write_bytes = counted(checkpoints._write_bytes, before=half_written)
    elif where in ("rename", "saved"):
        checkpoints.os = type(sys)("os_with_kill")
        checkpoints.os.__dict__.update(os.__dict__)
        checkpoints.os.replace = counted(os.replace, **{"before" if where == "rename" else "after": die})
    sys.exit(main(argv))


def _spawn(context, argv, kill=None) -> int:
    process = context.Process(target=_killed_run, args=(argv, kill))
    process.start()
    process.join(120)
    assert process.exitcode is not None, "child hung"
    return process.exitcode


def test_run_killed_at_many_points_resumes_bit_identical(tmp_path):
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["taskrouting.cli", "taskrouting.training.loop"])
    argv = ["train", *TINY, "--epochs", "3", "--flip", "--resume"]
    assert _spawn(context, [*argv, "--out", str(tmp_path / "straight")]) == 0

    draw = random.Random(14)
    # Each process resumes from the last complete checkpoint; counts are within that process.
    kills = [("step", draw.randint(1, STEPS_PER_EPOCH)),   # epoch 1, no checkpoint yet
             ("write", 1),                                 # half of the first checkpoint's temporary file
             ("rename", 1),                                # complete temporary file, not renamed
             ("saved", 1),                                 # checkpoint of epoch 1 in place
             ("step", draw.randint(1, STEPS_PER_EPOCH)),   # epoch 2
             ("write", 1),                                 # epoch 2's checkpoint half-written
             ("rename", 2)]                                # epoch 3's checkpoint not renamed
    out = tmp_path / "killed"
    epochs_done = []
    for kill in kills:
        assert _spawn(context, [*argv, "--out", str(out)], kill) == -signal.SIGKILL, kill
        epochs_done.append(read_checkpoint(out / CHECKPOINT)["epoch"] if (out / CHECKPOINT).exists() else 0)
        if kill[0] in ("write", "rename"):
            assert (out / (CHECKPOINT + ".tmp")).exists()
    assert epochs_done == [0, 0, 0, 1, 1, 1, 2]
    assert _spawn(context, [*argv, "--out", str(out)]) == 0

    straight, resumed = read_checkpoint(tmp_path / "straight" / CHECKPOINT), read_checkpoint(out / CHECKPOINT)
    assert straight["epoch"] == resumed["epoch"] == 3
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in straight["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"])
    a, b = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "straight", out))
    assert a["means"] == b["means"] and [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
