"""Multi-process routed BatchNorm and training: 2 processes, gloo on the CPU, file / localhost rendezvous.

Each parity check compares what two processes with a shard each compute against one process on
the whole batch (the plain fused layer): outputs, grad_x, summed weight/bias gradients, running stats.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import taskrouting as tr
from taskrouting.nn.bn_relu_route import BATCH_NORMS
from taskrouting.nn.task_stats import TASK_BUFFERS
from taskrouting.ops.recompute import recompute_outputs, saved_tensors_meter
from taskrouting.training.checkpoints import read_checkpoint
from taskrouting.training.config import TrainConfig
from taskrouting.training.distributed import prepare_model

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2

# (name, layer rank, per-sample task, stats, shard sizes)
CASES = [
    ("batch_task", 4, False, "batch", (5, 3)),
    ("sample_task", 4, True, "batch", (4, 4)),
    ("sample_task_routed", 4, True, "routed", (3, 5)),
    ("rank_tasks", 4, "rank", "batch", (4, 4)),  # a different task on each process
    ("uneven_1d", 3, True, "batch", (6, 1)),
    ("empty_shard", 4, True, "batch", (8, 0)),
    ("empty_shard_routed", 4, False, "routed", (0, 8)),
    ("flat_1d", 2, True, "batch", (5, 3)),
    ("task_stats", 4, False, "batch", (5, 3)),  # per-task rows, from the merged statistics
    # BNAddReLURoute2d, a ResNet block's fused tail: the residual added before the ReLU
    ("tail", "tail", False, "batch", (5, 3)),
    ("tail_sample_task", "tail", True, "batch", (4, 4)),
    ("tail_routed_empty_shard", "tail", True, "routed", (8, 0)),
    ("tail_task_stats", "tail", False, "batch", (3, 5)),
    # TaskBatchNorm2d, a routed ResNet's unrouted BatchNorm (SyncTaskBatchNorm2d: on the CPU too)
    ("bn", "bn", True, "batch", (5, 3)),
    ("bn_empty_shard_cumulative", "bn", False, "batch", (0, 8)),  # momentum=None: the cumulative average
    ("bn_task_stats", "bn", False, "batch", (3, 5)),
]
TRITON_CASES = ("batch_task", "sample_task_routed", "empty_shard", "task_stats", "tail")  # interpreted: a few
LAYERS = {2: tr.BNReLURoute1d, 3: tr.BNReLURoute1d, 4: tr.BNReLURoute2d, "tail": tr.BNAddReLURoute2d,
          "bn": tr.nn.TaskBatchNorm2d}
BACKEND_FREE = "bn"  # the unrouted BatchNorm has no backend argument: its cases run once, as "cpu"


def _runs(name: str, backend: str) -> bool:
    if name.startswith(BACKEND_FREE):
        return backend == "cpu"
    return backend != "triton" or name in TRITON_CASES


def _case_inputs(rank_dims, per_sample, sizes):
    """x, grad_y, task and (for the fused tail, ``rank_dims == "tail"``) the residual, else None."""
    tail = rank_dims == "tail"
    rank_dims = 4 if rank_dims in ("tail", "bn") else rank_dims
    g = torch.Generator().manual_seed(rank_dims * 7 + sum(sizes) + tail)
    n, c = sum(sizes), 12
    shape = (n, c) + (3, 5, 4, 3)[:rank_dims - 2]
    x = torch.randn(shape, generator=g) * 2 + 0.5
    grad = torch.randn(shape, generator=g)
    if per_sample == "rank":
        task = torch.cat([torch.full((s,), r) for r, s in enumerate(sizes)])
    else:
        task = torch.randint(4, (n,), generator=g) if per_sample else 2
    residual = torch.randn(shape, generator=g) if tail else None
    return x, grad, task, residual


def _layer(cls, rank_dims, stats, backend, task_stats=False, momentum=0.3):
    torch.manual_seed(1)
    if cls is tr.nn.TaskBatchNorm2d:
        layer = cls(12, num_tasks=4, momentum=momentum, task_stats=task_stats)
    else:
        layer = cls(12, num_tasks=4, sharing_ratio=0.5, seed=3, stats=stats, backend=backend, momentum=momentum,
                    task_stats=task_stats)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def _run(layer, x, grad, task, residual=None, steps=2):
    """Two training steps (the second with running stats already moved), then one in eval mode."""
    outs = []
    inputs = (lambda x, r: (x,)) if residual is None else (lambda x, r: (x, r))
    for _ in range(steps):
        x = x.detach().requires_grad_()
        r = None if residual is None else residual.detach().requires_grad_()
        layer.zero_grad()
        y = layer(*inputs(x, r), task)
        y.backward(grad)
        outs.append((y.detach(), x.grad, None if r is None else r.grad))
    layer.eval()
    evaluated = layer(*inputs(x.detach(), residual), task)
    layer.train()
    return {"y": [o[0] for o in outs], "grad_x": [o[1] for o in outs], "grad_residual": [o[2] for o in outs],
            "eval": evaluated, "grad_weight": layer.weight.grad, "grad_bias": layer.bias.grad,
            **{k: b for k, b in layer.named_buffers() if k != "masks"}}


def _layer_worker(rank, init_file, out_dir, backends):
    if "triton" in backends:
        os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for backend in backends:
        for name, dims, per_sample, stats, sizes in CASES:
            if not _runs(name, backend):
                continue
            x, grad, task, residual = _case_inputs(dims, per_sample, sizes)
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            local_task = task[lo:hi] if isinstance(task, torch.Tensor) else task
            if per_sample == "rank":
                local_task = rank
            layer = _layer(LAYERS[dims], dims, stats, backend, *_options(name))
            layer = tr.convert_sync_batchnorm(nn.Sequential(layer))[0]
            results[backend, name] = _run(layer, x[lo:hi], grad[lo:hi], local_task,
                                          None if residual is None else residual[lo:hi])
    for cls in (tr.BNReLURoute2d, tr.nn.TaskBatchNorm2d):
        layer = tr.convert_sync_batchnorm(_layer(cls, 4, "batch", "cpu", task_stats=True))
        try:  # per-sample tasks would pair up the collectives of different task groups: refused
            layer(torch.randn(4, 12, 3, 3), torch.tensor([0, 1, 0, 1]))
        except ValueError as exc:
            results["per_sample_task_stats", cls.__name__] = (str(exc), layer.num_batches_tracked.item(),
                                                              layer.task_num_batches_tracked.tolist())
    for cls in (tr.BNReLURoute2d, tr.nn.TaskBatchNorm2d):
        layer = tr.convert_sync_batchnorm(_layer(cls, 4, "batch", "cpu"))
        x = torch.randn(4, 12, 3, 3, requires_grad=True)
        grad_x, = torch.autograd.grad(layer(x, 1).square().sum(), x, create_graph=True)
        try:  # the synced backward is not differentiable: a second derivative raises instead of being wrong
            grad_x.sum().backward()
        except RuntimeError as exc:
            results["double_backward", cls.__name__] = str(exc)
    layer, conv = tr.convert_sync_batchnorm(_layer(tr.BNReLURoute2d, 4, "batch", "cpu")), nn.Conv2d(12, 3, 1)
    x = torch.randn(5, 12, 3, 3, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    for recompute in (False, True):  # memory_efficient: the conv's saved input is the synced output's recipe
        with saved_tensors_meter() as meter, recompute_outputs() if recompute else contextlib.nullcontext():
            out = conv(layer(x, 1))
        grads = torch.autograd.grad(out.square().sum(), [x, layer.weight, conv.weight])
        results["recompute", recompute] = (grads, meter.recomputed_bytes)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _options(name: str) -> tuple[bool, float | None]:
    """task_stats and momentum of a case, from its name."""
    return name.endswith("task_stats"), None if name.endswith("cumulative") else 0.3


def _backends():
    backends = ["cpu", "reference"]
    try:
        import triton  # noqa: F401
        backends.append("triton")
    except ImportError:
        pass
    return backends


@pytest.fixture(scope="module")
def layer_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_layers")
    backends = _backends()
    mp.spawn(_layer_worker, args=(str(tmp / "init"), str(tmp), backends), nprocs=WORLD, join=True)
    return backends, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_two_processes_compute_what_one_computes_on_the_whole_batch(layer_results, case, monkeypatch):
    backends, ranks = layer_results
    name, dims, per_sample, stats, sizes = case
    for backend in backends:
        if not _runs(name, backend):
            continue
        if backend == "triton":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        x, grad, task, residual = _case_inputs(dims, per_sample, sizes)
        want = _run(_layer(LAYERS[dims], dims, stats, backend, *_options(name)), x, grad, task, residual)
        got = [r[backend, name] for r in ranks]
        tol = dict(rtol=1e-5, atol=1e-5)
        for key in ("y", "grad_x") + (("grad_residual",) if residual is not None else ()):
            for step in range(2):
                torch.testing.assert_close(torch.cat([g[key][step] for g in got]), want[key][step], **tol,
                                           msg=lambda m: f"{backend} {key} step {step}: {m}")
        torch.testing.assert_close(torch.cat([g["eval"] for g in got]), want["eval"], **tol)
        for key in ("grad_weight", "grad_bias"):
            torch.testing.assert_close(sum(g[key] for g in got), want[key], **tol,
                                       msg=lambda m: f"{backend} {key}: {m}")
        buffers = ("running_mean", "running_var", "num_batches_tracked")
        buffers += TASK_BUFFERS if _options(name)[0] else ()
        for g in got:
            assert set(buffers) <= set(g)
            for key in buffers:
                torch.testing.assert_close(g[key], want[key], **tol, msg=lambda m: f"{backend} {key}: {m}")


def test_per_sample_tasks_with_task_stats_are_refused_across_processes_before_any_update(layer_results):
    for rank in layer_results[1]:
        for cls in ("BNReLURoute2d", "TaskBatchNorm2d"):
            message, batches, task_batches = rank["per_sample_task_stats", cls]
            assert "per-sample tasks is not synchronised" in message
            assert batches == 0 and task_batches == [0, 0, 0, 0]


def test_double_backward_through_synced_layers_raises(layer_results):
    for rank in layer_results[1]:
        for cls in ("BNReLURoute2d", "TaskBatchNorm2d"):
            assert "once_differentiable" in rank.get(("double_backward", cls), ""), cls


def test_synced_outputs_are_recomputed_in_memory_efficient_mode_with_the_same_gradients(layer_results):
    for rank in layer_results[1]:
        (kept, none), (rebuilt, recomputed) = rank["recompute", False], rank["recompute", True]
        assert none == 0 and recomputed == 5 * 12 * 3 * 3 * 4  # the layer's float32 output
        for a, b in zip(kept, rebuilt):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_one_process_sync_layer_is_the_fused_layer():
    x, grad, task, _ = _case_inputs(4, True, (4, 4))
    want = _run(_layer(tr.BNReLURoute2d, 4, "batch", "cpu"), x, grad, task)
    got = _run(_layer(tr.SyncBNReLURoute2d, 4, "batch", "cpu"), x, grad, task)
    for key in ("y", "grad_x"):
        torch.testing.assert_close(got[key], want[key])
    for key in ("grad_weight", "running_mean", "running_var"):
        torch.testing.assert_close(got[key], want[key])


def _routed_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), tr.BNReLURoute2d(8, num_tasks=3, seed=0), nn.Conv2d(8, 8, 1),
                         nn.BatchNorm2d(8), tr.BNReLURoute1d(8, num_tasks=3, seed=1, stats="routed"))


def test_convert_sync_batchnorm_keeps_routing_state_and_parameters():
    model = _routed_model()
    model[1].active_task = 2
    model[1].eval()
    params = {id(p) for p in model.parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = tr.convert_sync_batchnorm(model)
    assert converted is model
    assert type(model[1]) is tr.SyncBNReLURoute2d and isinstance(model[1], tr.BNReLURoute2d)
    assert type(model[3]) is nn.SyncBatchNorm
    assert type(model[4]) is tr.SyncBNReLURoute1d and model[4].stats == "routed"
    assert model[1].active_task == 2 and not model[1].training and model[1].process_group is None
    assert {id(p) for p in model.parameters()} == params  # the optimizer's parameters stay valid
    assert model.state_dict().keys() == state.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    plain = tr.BNReLURoute2d(8, num_tasks=3, seed=0)
    plain.load_state_dict(model[1].state_dict())  # checkpoints load either way


def test_pytorch_converter_no_longer_drops_routing():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(_routed_model())
    assert type(model[1]) is tr.BNReLURoute2d and type(model[4]) is tr.BNReLURoute1d
    assert type(model[3]) is nn.SyncBatchNorm
    assert isinstance(model[1], nn.modules.batchnorm._NormBase) and isinstance(model[1], BATCH_NORMS)


def test_convert_rejects_unknown_routed_batchnorm_and_changes_nothing():
    from taskrouting.models import ReferenceBNReLURoute2d

    model = nn.Sequential(tr.BNReLURoute2d(4, num_tasks=2, seed=0),
                          ReferenceBNReLURoute2d(4, masks=tr.make_masks(2, 4, 0.5), sharing_ratio=0.5))
    with pytest.raises(TypeError, match="cannot synchronise ReferenceBNReLURoute2d"):
        tr.convert_sync_batchnorm(model)
    assert type(model[0]) is tr.BNReLURoute2d
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        tr.convert_sync_batchnorm("model")


TRAIN_ARGS = ["train", "--data", "digits", "--width-mult", "0.125", "--epochs", "2", "--batch-size", "32",
              "--tasks", "3", "--bn-batches", "2", "--eval-batch-size", "128", "--no-progress", "--threads", "1"]


def _train(out: Path, launcher: list[str], args: list[str] | None = None) -> dict:
    """``taskrouting train`` (``TRAIN_ARGS`` with ``args`` replacing their data and training options)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    common = ["train", "--tasks", "3", "--no-progress", "--threads", "1"]
    proc = subprocess.run([*launcher, "-m", "taskrouting", *(TRAIN_ARGS if args is None else common + args),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "results.json").read_text())


def _torchrun(port_offset: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(29500 + (os.getpid() + port_offset) % 1000)]


SHORT_ARGS = ["--data", "synthetic", "--data-arg", "num_samples=60", "--data-arg", "image_size=16", "--epochs", "1",
              "--batch-size", "16", "--lr", "0.01"]


@pytest.mark.parametrize("model", ["vgg11", "resnet50"])
def test_torchrun_steps_equal_one_process(tmp_path, model):
    """A few steps (48 samples x 3 tasks, batches of 16), default options (per-task statistics, a ResNet's
    unrouted BatchNorms synced on the CPU): VGG's weights and statistics on 2 processes equal 1 process's to
    float32 rounding. A 16-pixel ResNet (1x1 maps from layer3 on, 8 samples per BatchNorm and process)
    amplifies float32 rounding ~1e5-fold per step, so there it is the float64 model test below that compares."""
    args = [*SHORT_ARGS, "--model", model, "--width-mult", "0.125" if model == "vgg11" else "0.0625"]
    _train(tmp_path / "one", [sys.executable], args)
    _train(tmp_path / "two", _torchrun(1), args)
    one = read_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    two = read_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    assert two.keys() == one.keys() and any(k.endswith("task_running_var") for k in one)
    for key, want in one.items():
        if not want.is_floating_point():
            assert torch.equal(two[key], want), key
        elif model == "vgg11":  # to the tensor's scale: a conv bias before a BatchNorm stays ~1e-10
            torch.testing.assert_close(two[key], want, rtol=0, atol=1e-4 * float(want.abs().max()) + 1e-9,
                                       msg=lambda m: f"{key}: {m}")
        else:
            assert two[key].shape == want.shape and bool(two[key].isfinite().all()), key


def _resnet_step(model, x, target, world):
    """One training step of task 1 on ``x``: the output, and the loss scaled as ``training.distributed.Shard``
    scales it (so DDP's average is the gradient of the whole batch's mean loss)."""
    y = model(x, task=1)
    (F.binary_cross_entropy_with_logits(y, target, reduction="sum") * (world / 16)).backward()
    return y.detach()


def _resnet_case():
    torch.manual_seed(0)
    model = tr.models.resnet50(3, width_mult=1 / 16).double()
    g = torch.Generator().manual_seed(5)
    return model, torch.randn(16, 3, 16, 16, generator=g).double(), torch.rand(16, generator=g).round().double()


def _resnet_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model, x, target = _resnet_case()
    ddp = prepare_model(model, TrainConfig(device="cpu"))
    y = _resnet_step(ddp, x[8 * rank:8 * rank + 8], target[8 * rank:8 * rank + 8], WORLD)
    grads = {k: p.grad for k, p in model.named_parameters()}
    torch.save((y, grads, dict(model.named_buffers())), Path(out_dir) / f"resnet{rank}.pt")
    dist.destroy_process_group()


def test_resnet_step_on_two_processes_equals_one_process_in_float64(tmp_path):
    """A fused ResNet-50 with per-task statistics, as training wraps it (synced routed layers, fused tails and
    unrouted BatchNorms, DDP): output, every gradient and every statistic equal one process's."""
    mp.spawn(_resnet_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model, x, target = _resnet_case()
    y = _resnet_step(model, x, target, 1)
    got = [torch.load(tmp_path / f"resnet{r}.pt") for r in range(WORLD)]
    tol = dict(rtol=1e-7, atol=1e-9)  # float64 rounding, amplified as the float32 note above says
    torch.testing.assert_close(torch.cat([g[0] for g in got]), y, **tol)
    for key, p in model.named_parameters():
        for g in got:
            torch.testing.assert_close(g[1][key], p.grad, **tol, msg=lambda m: f"grad {key}: {m}")
    for key, b in model.named_buffers():
        for g in got:
            torch.testing.assert_close(g[2][key], b, **tol, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
def test_torchrun_training_equals_one_process(tmp_path):
    _, one = _train(tmp_path / "one", [sys.executable])
    proc, two = _train(tmp_path / "two", _torchrun())
    assert proc.stdout.count("majority-class baseline") == 1  # printed once, by rank 0
    assert [h["samples"] for h in two["history"]] == [h["samples"] for h in one["history"]]
    # One step matches to float rounding (the layer tests above); over an epoch, max-pool ties and
    # ReLU thresholds on the 8x8 digits amplify the reductions' rounding differences, so the
    # tolerances here are those of the amplified rounding, not of one reduction.
    assert two["history"][0]["loss"] == pytest.approx(one["history"][0]["loss"], rel=1e-2)  # measured: 4e-3
    assert two["history"][1]["loss"] == pytest.approx(one["history"][1]["loss"], rel=5e-2)
    for key in ("accuracy",):
        assert two["means"][key] == pytest.approx(one["means"][key], abs=0.02), key
    state_one = read_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"]
    state_two = read_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    assert {k: v.shape for k, v in state_two.items()} == {k: v.shape for k, v in state_one.items()}
