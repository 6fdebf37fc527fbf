"""Swap-in, end to end (issue 11): the authors' model converts with ``fuse`` and trains with their
loop; PyTorch's OpInfo batch_norm samples; per-task BatchNorm statistics; ``--bn-eval`` modes;
``fuse`` keeps shared modules and converts all or nothing (issue 14, item 5)."""
from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_models import build, image, randomize
from torch import nn

import taskrouting as tr
from taskrouting import ops
from taskrouting.data import load_dataset
from taskrouting.models import ReferenceBNReLURoute2d, extract_subnetwork
from taskrouting.nn import BNReLURoute1d, BNReLURoute2d, BNReLURoute3d, fuse, make_masks
from taskrouting.nn.task_stats import TASK_BUFFERS
from taskrouting.ops.schemas import NATIVE_TASK_UPDATE
from taskrouting.training import TrainConfig, predict
from taskrouting.training.evaluation import evaluate

BACKENDS = ["reference"] + [b for b in ("cpu",) if b in ops.available_backends("cpu")]


# ----------------------------------------------------------------------------- the authors' layer
class AuthorsTaskRouter(nn.Module):
    """Stand-in for gstrezoski/TaskRouting's ``TaskRouter``: a float ``[T, C]`` Parameter
    ``_unit_mapping`` (1 = keep), ``sigma`` units zeroed per task, ``active_task``."""

    def __init__(self, unit_count, task_count, sigma, name="TaskRouter"):
        super().__init__()
        self.name, self.unit_count, self.active_task = name, unit_count, 0
        mapping = torch.ones(task_count, unit_count)
        g = torch.Generator().manual_seed(unit_count)
        for t in range(task_count):
            mapping[t, torch.randperm(unit_count, generator=g)[:sigma]] = 0
        self._unit_mapping = nn.Parameter(mapping)

    def set_active_task(self, active_task):
        self.active_task = active_task
        return active_task

    def forward(self, x):
        return x * self._unit_mapping[self.active_task].view(1, -1, 1, 1)


def authors_model(order="router_relu", tasks=3, widths=(6, 8), sigma=3):
    """Their ``make_layers(batch_norm=True)``: Conv → BN → TaskRouter → ReLU(inplace), then a head."""
    layers, c = [], 3
    for i, w in enumerate(widths):
        router, relu = AuthorsTaskRouter(w, tasks, sigma, f"router{i}"), nn.ReLU(inplace=True)
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w),
                   *((router, relu) if order == "router_relu" else (relu, router))]
        c = w
    model = nn.Sequential(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def their_task_switch(model, task):
    """The authors' loop: ``set_active_task`` on every module that has ``active_task``."""
    for m in model.modules():
        if hasattr(m, "active_task"):
            m.set_active_task(task)


def trainable(model):
    return [p for n, p in model.named_parameters() if not n.endswith("_unit_mapping")]


@pytest.mark.parametrize("order", ["router_relu", "relu_router"])
def test_authors_model_converts_trains_and_matches(order):
    torch.manual_seed(0)
    theirs = authors_model(order)
    ours = fuse(copy.deepcopy(theirs))
    fused = [m for m in ours.modules() if isinstance(m, BNReLURoute2d)]
    assert len(fused) == 2 and not any(isinstance(m, AuthorsTaskRouter) for m in ours.modules())
    for m, w in zip(fused, (6, 8)):
        assert m.masks.dtype == torch.bool and "masks" in dict(m.named_buffers())
        assert m.sharing_ratio == pytest.approx(1 - 3 / w)  # σ = 1 − their sigma / C
    assert not any(n.endswith("_unit_mapping") for n, _ in ours.named_parameters())
    opt_theirs = torch.optim.SGD(trainable(theirs), lr=0.1, momentum=0.5)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.5)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        task = step % 3
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 2, (8,), generator=g).float()
        grads = []
        for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
            their_task_switch(model, task)
            out = model(x).squeeze(1)
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(out, y).backward()
            grads.append([p.grad.clone() for p in trainable(model)])
            opt.step()
        # Their masks are a Parameter: autograd sees them there, never in ours.
        assert theirs[0][2 if order == "router_relu" else 3]._unit_mapping.grad is not None
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    for mode in (True, False):
        theirs.train(mode), ours.train(mode)
        for task in range(3):
            their_task_switch(theirs, task), their_task_switch(ours, task)
            x = torch.randn(5, 3, 6, 6, generator=g)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(dict(ours.state_dict()), {k: v for k, v in theirs.state_dict().items()
                                                         if "_unit_mapping" not in k} | {
        k: v for k, v in ours.state_dict().items() if k.endswith("masks")})


def test_every_task_conditioned_module_has_set_active_task():
    model = build("vgg11_bn")
    their_task_switch(model, 2)
    assert all(m.active_task == 2 for m in model.modules() if hasattr(m, "active_task"))
    with pytest.raises(TypeError, match="task must be"):
        model.heads.set_active_task(1.5)


# ----------------------------------------------------------------------------- fuse: sharing, all or nothing
def _routers(c, tasks=2):
    return make_masks(tasks, c, 0.5, torch.Generator().manual_seed(c))


def test_fuse_keeps_a_shared_batchnorm_shared():
    from taskrouting.nn import TaskRouter

    torch.manual_seed(0)
    bn, masks = nn.BatchNorm2d(4), _routers(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.ReLU(), TaskRouter(4, masks=masks),
                          nn.Conv2d(4, 4, 1), bn, nn.ReLU(), TaskRouter(4, masks=masks))
    x = torch.randn(3, 4, 5, 5)
    before_params = sum(p.numel() for p in model.parameters())
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, TaskRouter):
            m.active_task = 1
    out_ref = reference(x)
    fuse(model)
    for m in model.modules():
        if isinstance(m, BNReLURoute2d):
            m.active_task = 1
    assert model[1] is model[5] and isinstance(model[1], BNReLURoute2d)
    assert sum(p.numel() for p in model.parameters()) == before_params
    torch.testing.assert_close(model(x), out_ref)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)


def test_fuse_is_all_or_nothing():
    from taskrouting.nn import TaskRouter

    good = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), TaskRouter(4, masks=_routers(4)))
    bad = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), TaskRouter(5, masks=_routers(5)))
    model = nn.Sequential(good, bad)
    before = list(model.modules())
    with pytest.raises(ValueError, match="4 channels but the TaskRouter has 5"):
        fuse(model)
    assert list(model.modules()) == before  # the first run was not converted either
    bn = nn.BatchNorm2d(4)
    shared = nn.Sequential(bn, nn.ReLU(), TaskRouter(4, masks=_routers(4)),
                           bn, nn.ReLU(), TaskRouter(4, masks=~_routers(4) | _routers(4)))
    before = list(shared.modules())
    with pytest.raises(ValueError, match="shared by runs whose routers have different masks"):
        fuse(shared)
    assert list(shared.modules()) == before


# ----------------------------------------------------------------------------- PyTorch's OpInfo samples
FUSED_BY_RANK = {2: BNReLURoute1d, 3: BNReLURoute1d, 4: BNReLURoute2d, 5: BNReLURoute3d}


def _opinfo_samples():
    from torch.testing._internal.common_methods_invocations import op_db

    op = next(o for o in op_db if o.name == "nn.functional.batch_norm")
    return list(op.sample_inputs("cpu", torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opinfo_batch_norm_samples_match_with_everything_shared(backend):
    """Every OpInfo sample the fused layer can express (input rank 2-5, at least one channel)
    matches relu(F.batch_norm) and F.batch_norm's running-stat update, at σ = 1. The samples of
    1-D input (shape (0,): no channel dim) are skipped; on torch 2.13 that is 2 of 12."""
    matched, skipped = 0, 0
    for s in _opinfo_samples():
        x, (rm, rv, w, b) = s.input, s.args
        training, momentum, eps = s.kwargs.get("training", False), s.kwargs.get("momentum", 0.1), \
            s.kwargs.get("eps", 1e-5)
        if x.dim() not in FUSED_BY_RANK:
            skipped += 1
            continue
        c = x.shape[1]
        layer = FUSED_BY_RANK[x.dim()](c, eps, momentum, affine=w is not None, track_running_stats=rm is not None,
                                       num_tasks=1, sharing_ratio=1.0, backend=backend).train(training)
        with torch.no_grad():
            for name, t in (("weight", w), ("bias", b), ("running_mean", rm), ("running_var", rv)):
                if t is not None:
                    getattr(layer, name).copy_(t)
        rm_ref, rv_ref = (None if t is None else t.clone() for t in (rm, rv))
        expected = F.relu(F.batch_norm(x, rm_ref, rv_ref, w, b, training, momentum, eps))
        torch.testing.assert_close(layer(x, task=0), expected, msg=lambda m: f"{s}: {m}")
        if rm is not None:
            torch.testing.assert_close(layer.running_mean, rm_ref)
            torch.testing.assert_close(layer.running_var, rv_ref)
        matched += 1
    assert matched >= 10 and skipped <= 2


# ----------------------------------------------------------------------------- per-task statistics
def _layer(backend, momentum=0.1, tasks=3, c=6):
    return BNReLURoute2d(c, momentum=momentum, num_tasks=tasks, sharing_ratio=0.5, seed=0, task_stats=True,
                         backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_task_per_batch_rows_equal_a_batchnorm_per_task(backend, momentum):
    """Each row is an nn.BatchNorm that saw only its task's batches, moving by 1 - (1 - m)**g for a
    task last seen g batches ago (momentum=None: the plain average of its own batches)."""
    layer = _layer(backend, momentum)
    per_task = [nn.BatchNorm2d(6, momentum=momentum) for _ in range(3)]
    shared = nn.BatchNorm2d(6, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    last = [0, 0, 0]
    for batch, t in enumerate((0, 1, 0, 2, 0, 0), start=1):
        if momentum is not None:
            per_task[t].momentum = 1 - (1 - momentum) ** (batch - last[t])  # gaps 1, 2, 2, 4, 2, 1
        last[t] = batch
        x = torch.randn(4, 6, 3, 3, generator=g) * (t + 1) + t
        torch.testing.assert_close(layer(x, task=t), F.relu(per_task[t](x)) * layer.masks[t].view(1, -1, 1, 1))
        shared(x)
    assert layer.task_last_batch.tolist() == last
    for t in range(3):
        torch.testing.assert_close(layer.task_running_mean[t], per_task[t].running_mean)
        torch.testing.assert_close(layer.task_running_var[t], per_task[t].running_var)
        assert int(layer.task_num_batches_tracked[t]) == int(per_task[t].num_batches_tracked)
    torch.testing.assert_close(layer.running_mean, shared.running_mean)  # nn.BatchNorm's meaning kept
    torch.testing.assert_close(layer.running_var, shared.running_var)
    layer.eval(), [m.eval() for m in per_task]
    x = torch.randn(5, 6, 3, 3, generator=g)
    for t in range(3):
        torch.testing.assert_close(layer(x, task=t), F.relu(per_task[t](x)) * layer.masks[t].view(1, -1, 1, 1))


@pytest.mark.parametrize("momentum", [0.1, None, -1.2])
def test_task_row_update_in_pytorch_ops_equals_the_compiled_op(momentum, monkeypatch):
    """Where no compiled ``update_task_running_stats`` exists, the PyTorch-ops fallback (no host read)
    keeps the same rows and counts as the compiled op."""
    if not NATIVE_TASK_UPDATE["cpu"]:
        pytest.skip("needs the compiled extension")
    compiled, fallback = _layer("reference", momentum), _layer("reference", momentum)
    g = torch.Generator().manual_seed(1)
    for t in (0, 2, 2, 1, 0, 2):
        x = torch.randn(4, 6, 3, 3, generator=g) + t
        expected = compiled(x, task=t)
        with monkeypatch.context() as patch:
            patch.setitem(NATIVE_TASK_UPDATE, "cpu", False)
            torch.testing.assert_close(fallback(x, task=t), expected)
    torch.testing.assert_close(fallback.state_dict(), compiled.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_tasks_normalise_each_task_group_on_its_own(backend):
    layer = _layer(backend).double()
    reference = ReferenceBNReLURoute2d(6, masks=layer.masks, sharing_ratio=0.5, task_stats=True).double()
    reference.load_state_dict(layer.state_dict())
    per_task = [nn.BatchNorm2d(6).double() for _ in range(3)]
    shared = nn.BatchNorm2d(6).double()
    task = torch.tensor([2, 0, 2, 2, 0, 1, 1])
    x = torch.randn(7, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    y = layer(x, task=task)
    shared(x.detach())
    for t in range(3):
        idx = (task == t).nonzero().flatten()
        torch.testing.assert_close(y[idx], F.relu(per_task[t](x[idx])) * layer.masks[t].view(1, -1, 1, 1))
        torch.testing.assert_close(layer.task_running_mean[t], per_task[t].running_mean)
        torch.testing.assert_close(layer.task_running_var[t], per_task[t].running_var)
    torch.testing.assert_close(layer.running_mean, shared.running_mean)
    torch.testing.assert_close(layer.running_var, shared.running_var)
    grad = torch.autograd.grad(y.square().sum(), x)[0]
    x_ref = x.detach().requires_grad_()
    y_ref = reference(x_ref, task=task)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grad, torch.autograd.grad(y_ref.square().sum(), x_ref)[0])
    torch.testing.assert_close(layer.state_dict(), reference.state_dict())
    layer.eval(), reference.eval()
    out = layer(x, task=task)
    torch.testing.assert_close(out, reference(x, task=task))
    for t in range(3):  # eval: each sample with its own task's row, as in a one-task batch
        idx = (task == t).nonzero().flatten()
        torch.testing.assert_close(out[idx], layer(x[idx], task=t))


def _eval_layers():
    """Every layer with per-task rows, in eval with trained-looking rows, parameters and a forward taking
    ``(x, residual, task)``."""
    torch.manual_seed(0)
    fused, tail = _layer("cpu" if "cpu" in BACKENDS else "reference"), tr.BNAddReLURoute2d(
        6, num_tasks=3, sharing_ratio=0.5, seed=0, task_stats=True)
    unrouted = tr.nn.TaskBatchNorm2d(6, num_tasks=3)
    unfused = ReferenceBNReLURoute2d(6, masks=fused.masks, sharing_ratio=0.5, task_stats=True)
    for layer in (fused, tail, unrouted, unfused):
        with torch.no_grad():
            layer.task_running_mean.uniform_(-1, 1), layer.task_running_var.uniform_(0.5, 2)
            layer.weight.uniform_(-1.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
        layer.eval()
    plain = (lambda layer: lambda x, r, t: layer(x, task=t))
    return {"fused": plain(fused), "tail": lambda x, r, t: tail(x, r, task=t), "unrouted": plain(unrouted),
            "unfused": plain(unfused)}, {"fused": fused, "tail": tail, "unrouted": unrouted, "unfused": unfused}


@pytest.mark.parametrize("name", ["fused", "tail", "unrouted", "unfused"])
@pytest.mark.parametrize("dtype, channels_last", [(torch.float64, False), (torch.float32, True),
                                                   (torch.bfloat16, False)])
def test_per_sample_eval_is_each_sample_with_its_own_task_in_one_pass(name, dtype, channels_last):
    """Eval with a task per sample: one broadcast pass (no task groups) that equals each sample run alone with
    its task, in output and every gradient; NaN in a sample's masked channels enters nothing."""
    forwards, layers = _eval_layers()
    forward, layer = forwards[name], layers[name]
    if dtype == torch.float64:
        layer.double()
    task = torch.tensor([2, 0, 2, 1, 0, 1, 1])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 6, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    r = torch.randn(7, 6, 3, 4, generator=g, dtype=torch.float64).to(dtype)
    if name in ("fused", "tail"):  # NaN where the sample's task masks the channel (the unfused layers are
        # BatchNorm2d's own composition: NaN * 0 reaches grad_weight there as in PyTorch)
        x = torch.where(layer.masks[task].view(7, 6, 1, 1), x, float("nan"))
    if channels_last:
        x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    params = [layer.weight, layer.bias]

    def run(xs, rs, t):
        xs, rs = xs.detach().requires_grad_(), rs.detach().requires_grad_()
        y = forward(xs, rs, t)
        grads = torch.autograd.grad(y.float().square().sum(), [xs, *params] + ([rs] if name == "tail" else []))
        return y, grads

    y, grads = run(x, r, task)
    alone = [run(x[i:i + 1], r[i:i + 1], int(t)) for i, t in enumerate(task)]
    tol = {} if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, torch.cat([a[0] for a in alone]), **tol)
    assert not y.isnan().any()
    torch.testing.assert_close(grads[0], torch.cat([a[1][0] for a in alone]), **tol)
    for k in range(1, len(grads)):
        want = torch.cat([a[1][k] for a in alone]) if k == 3 else sum(a[1][k] for a in alone)
        torch.testing.assert_close(grads[k], want, **tol)
        assert grads[k].isfinite().all()


def test_per_sample_eval_of_a_task_stats_model_compiles_fullgraph():
    model = build("vgg11_bn").eval()  # task_stats by default
    x, task = image(4), torch.tensor([0, 2, 1, 0])
    with torch.no_grad():
        want = model(x, task=task)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x, task=task)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_per_sample_task_with_a_lonely_single_value_is_refused_before_any_update():
    layer = _layer("reference")
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*task\(s\) \[1\]"):
        layer(torch.randn(3, 6, 1, 1), task=torch.tensor([0, 0, 1]))
    torch.testing.assert_close(layer.state_dict(), before)


def test_task_stats_needs_tracked_running_stats():
    with pytest.raises(ValueError, match="task_stats=True .* needs track_running_stats=True"):
        BNReLURoute2d(4, track_running_stats=False, num_tasks=2, task_stats=True)
    with pytest.raises(TypeError, match="task_stats must be a bool"):
        BNReLURoute2d(4, num_tasks=2, task_stats="yes")


def test_task_stats_state_dict_round_trip_and_old_checkpoints_load():
    layer = _layer("reference")
    for t in (0, 1, 2, 1):
        layer(torch.randn(4, 6, 3, 3) + t, task=t)
    assert set(TASK_BUFFERS) == {"task_running_mean", "task_running_var", "task_num_batches_tracked",
                                 "task_last_batch"}
    assert set(TASK_BUFFERS) <= set(layer.state_dict())
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    again = _layer("reference")
    again.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(again.state_dict(), layer.state_dict())
    old = BNReLURoute2d(6, num_tasks=3, sharing_ratio=0.5, seed=0)  # saved before task_stats existed
    old(torch.randn(4, 6, 3, 3) * 2 + 1, task=0)
    fresh = _layer("reference")
    with pytest.warns(UserWarning, match="no per-task statistics"):
        fresh.load_state_dict(old.state_dict())
    for t in range(3):
        torch.testing.assert_close(fresh.task_running_mean[t], old.running_mean)
        torch.testing.assert_close(fresh.task_running_var[t], old.running_var)
    assert fresh.task_num_batches_tracked.tolist() == [1, 1, 1]
    assert fresh.task_last_batch.tolist() == [1, 1, 1]
    saved = layer.state_dict()  # saved with task_stats, before task_last_batch existed
    del saved["task_last_batch"]
    again = _layer("reference")
    again.load_state_dict(saved)
    assert again.task_last_batch.tolist() == [4, 4, 4]  # every row as recent as the last batch


def _train_a_little(model, steps=6):
    g = torch.Generator().manual_seed(3)
    model.train()
    with torch.no_grad():
        for step in range(steps):
            model(torch.randn(6, 3, 16, 16, generator=g) * (1 + step % 2), task=step % model.num_tasks)
    return model.eval()


@pytest.mark.parametrize("fused", [True, False])
def test_models_keep_task_stats_and_the_subnetwork_folds_them(fused):
    model = _train_a_little(randomize(build("vgg11_bn", fused=fused, task_stats=True)))
    layers = [m for m in model.modules() if getattr(m, "task_stats", False)]
    assert len(layers) == 8
    assert not torch.allclose(layers[3].task_running_mean[0], layers[3].task_running_mean[1])
    x = image()
    for task in range(model.num_tasks):
        sub = extract_subnetwork(model, task)
        torch.testing.assert_close(sub(x), model(x, task=task), rtol=1e-4, atol=1e-5)


def test_models_keep_task_stats_by_default_and_resnet_in_its_unrouted_batchnorms_too():
    from taskrouting.models import resnet50
    from taskrouting.nn import TaskBatchNorm2d

    model = build("vgg11_bn")
    assert sum(getattr(m, "task_stats", False) for m in model.modules()) == 8
    assert not any(getattr(m, "task_stats", False) for m in build("vgg11_bn", task_stats=False).modules())
    resnet = resnet50(3, width_mult=1 / 16)
    block = resnet.layer1[0]
    assert block.bn3.task_stats and type(block.downsample[1]) is TaskBatchNorm2d  # bn3: the fused tail
    assert type(resnet50(3, width_mult=1 / 16, fused=False).layer1[0].bn3) is TaskBatchNorm2d
    assert all(getattr(m, "task_stats", True) for m in resnet.modules() if isinstance(m, nn.BatchNorm2d))
    plain = resnet50(3, width_mult=1 / 16, task_stats=False, fused=False)
    bn3 = plain.layer1[0].bn3  # nn.BatchNorm2d itself, with the same state_dict (and syncable on CPU)
    assert type(bn3) is TaskBatchNorm2d and not bn3.task_stats
    assert set(bn3.state_dict()) == set(nn.BatchNorm2d(4).state_dict())
    assert set(plain.state_dict()) == {k for k in resnet.state_dict() if not k.rsplit(".", 1)[-1].startswith("task_")}


def test_task_batch_norm_rows_and_eval_equal_a_batchnorm_per_task():
    from taskrouting.nn import TaskBatchNorm2d

    layer = TaskBatchNorm2d(5, num_tasks=2)
    per_task, shared = [nn.BatchNorm2d(5) for _ in range(2)], nn.BatchNorm2d(5)
    g = torch.Generator().manual_seed(2)
    last = [0, 0]
    for batch, t in enumerate((0, 0, 1, 0), start=1):  # gaps 1, 1, 3 (task 1 first seen), 2
        per_task[t].momentum, last[t] = 1 - 0.9 ** (batch - last[t]), batch
        x = torch.randn(4, 5, 3, 3, generator=g) * (t + 1)
        torch.testing.assert_close(layer.set_active_task(t)(x), per_task[t](x))
        shared(x)
    torch.testing.assert_close(layer.running_var, shared.running_var)
    for t in range(2):
        torch.testing.assert_close(layer.task_running_var[t], per_task[t].running_var)
        torch.testing.assert_close(layer.task_running_mean[t], per_task[t].running_mean)
    layer.eval(), [m.eval() for m in per_task]
    x = torch.randn(4, 5, 3, 3, generator=g)
    torch.testing.assert_close(layer(x, task=torch.tensor([1, 0, 0, 1])),
                               torch.stack([per_task[t](x[i:i + 1])[0] for i, t in enumerate([1, 0, 0, 1])]))
    synced = tr.convert_sync_batchnorm(nn.Sequential(layer))[0]  # the same buffers, synced on CPU and CUDA
    assert type(synced) is tr.nn.SyncTaskBatchNorm2d and synced.task_running_mean is layer.task_running_mean


# ----------------------------------------------------------------------------- --bn-eval modes
@pytest.fixture(scope="module")
def tiny():
    data = load_dataset("synthetic", num_tasks=3, num_samples=120, image_size=8, num_factors=3, relatedness=0.5,
                        seed=1)
    torch.manual_seed(0)
    model = build("vgg11_bn", num_tasks=3, in_channels=data.image_shape[0], width_mult=1 / 32, pool_size=1)
    return data, _train_a_little_on(model, data)


def _train_a_little_on(model, data):
    model.train()
    with torch.no_grad():
        for step, batch in enumerate(torch.arange(len(data)).split(20)):
            model(data.get_batch(batch)[0], task=step % 3)
    return model.eval()


def test_bn_eval_names_and_aliases():
    assert TrainConfig().bn_eval == "stored"  # plain model.eval(): each task's own statistics
    assert TrainConfig(bn_eval="per-task").bn_eval == "recalibrate"
    assert TrainConfig(bn_eval="running").bn_eval == "stored"
    with pytest.raises(ValueError, match="bn_eval must be one of stored, recalibrate, batch"):
        TrainConfig(bn_eval="shared")


def test_bn_eval_modes_on_a_tiny_model(tiny):
    data, model = tiny
    before = copy.deepcopy(model.state_dict())
    x = data.get_batch(torch.arange(len(data)))[0]
    stored = predict(model, data, batch_size=len(data))
    for t in range(3):  # stored: plain model.eval()
        torch.testing.assert_close(stored[:, t], model(x, task=t))
    batch = predict(model, data, batch_size=len(data), batch_stats=True)
    train_mode = copy.deepcopy(model).train()
    for t in range(3):
        with torch.no_grad():
            torch.testing.assert_close(batch[:, t], train_mode(x, task=t))
    recalibrated = predict(model, data, batch_size=40, calibration=data, calibration_batches=2)
    assert recalibrated.shape == (len(data), 3) and not torch.allclose(recalibrated, stored)
    torch.testing.assert_close(model.state_dict(), before)  # every mode restores the model
    assert not model.training
    for mode in ("stored", "recalibrate", "batch"):
        metrics = evaluate(model, data, TrainConfig(bn_eval=mode, eval_batch_size=40, bn_batches=2),
                           calibration=data)
        assert len(metrics.rows()) == 3
    torch.testing.assert_close(model.state_dict(), before)


def test_cli_rejects_an_unknown_bn_eval_in_one_line():
    result = subprocess.run([sys.executable, "-m", "taskrouting", "train", "--data", "synthetic", "--bn-eval",
                             "shared"], capture_output=True, text=True)
    assert result.returncode == 2 and "--bn-eval" in result.stderr and "Traceback" not in result.stderr


def test_resnet_subnetwork_folds_each_task_statistics_of_its_unrouted_batchnorms():
    from taskrouting.models import resnet50

    torch.manual_seed(0)
    model = resnet50(3, width_mult=1 / 16, seed=0).train()
    with torch.no_grad():
        for step in range(6):
            model(torch.randn(4, 3, 32, 32) * (1 + step % 2), task=step % 3)
    bn3 = model.layer1[0].bn3
    assert not torch.allclose(bn3.task_running_var[0], bn3.task_running_var[1])
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    for task in range(3):
        torch.testing.assert_close(extract_subnetwork(model, task)(x), model(x, task=task), rtol=1e-4, atol=1e-5)
