"""Routed VGG-11/16 and ResNet-50, and the batched task heads."""
from __future__ import annotations

import copy
import io
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from taskrouting import BNAddReLURoute2d, BNReLURoute2d, TaskRouter, active_task, set_active_task
from taskrouting.models import ReferenceBNReLURoute2d, TaskHeads, resnet50, vgg11_bn, vgg16_bn
from taskrouting.nn.bn_relu_route import BATCH_NORMS
from taskrouting.nn.masks import active_per_task

MODELS = {"vgg11_bn": vgg11_bn, "vgg16_bn": vgg16_bn, "resnet50": resnet50}
ROUTING_LAYERS = {"vgg11_bn": 8, "vgg16_bn": 13, "resnet50": 1 + 16 * 3}


def build(name: str, num_tasks: int = 4, **options) -> nn.Module:
    """A small model (1/16 of the width) for CPU tests."""
    options = {"seed": 0, "width_mult": 1 / 16, "pool_size": 2, "embedding_dim": 8, **options}
    return MODELS[name](num_tasks, **options)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and running stats, so that eval mode is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BATCH_NORMS):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
                m.bias.copy_(0.3 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
    return model


def routing_layers(model: nn.Module) -> list[nn.Module]:
    kinds = (BNReLURoute2d, BNAddReLURoute2d, ReferenceBNReLURoute2d, TaskRouter)
    return [m for m in model.modules() if isinstance(m, kinds)]


def image(n=4, size=16, seed=1, channels=3):
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, channels, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("name,size", [("vgg11_bn", 8), ("vgg11_bn", (8, 20)), ("vgg16_bn", 16),
                                       ("vgg16_bn", 1), ("resnet50", 16), ("resnet50", 8)])
def test_output_is_one_logit_per_sample(name, size):
    model = build(name, num_tasks=3)
    set_active_task(model, 2)
    y = model(image(size=size))
    assert y.shape == (4,) and torch.isfinite(y).all()
    y.sum().backward()
    model.eval()
    assert model(image(n=1, size=size)).shape == (1,)


def test_options_reach_the_layers():
    model = build("vgg11_bn", in_channels=1, pool_size=3, embedding_dim=5, sharing_ratio=0.25,
                  stats="routed", backend="reference")
    assert model.features[0].in_channels == 1 and model.features[0].out_channels == 4
    assert model.heads.in_features == 32 * 9 and model.heads.embedding_dim == 5
    for layer in routing_layers(model):
        assert (layer.stats, layer.backend, layer.sharing_ratio) == ("routed", "reference", 0.25)
    set_active_task(model, 0)
    assert model(image(channels=1)).shape == (4,)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fused", [True, False])
def test_routing_after_every_conv_block(name, fused):
    model = build(name, fused=fused)
    layers = routing_layers(model)
    assert len(layers) == ROUTING_LAYERS[name]
    bn_type = BNReLURoute2d if fused else ReferenceBNReLURoute2d
    # ResNet: each bottleneck's output, routed by its fused tail (bn_add_relu_route) or a TaskRouter
    tail_type = BNAddReLURoute2d if fused else TaskRouter
    tails = [m for m in layers if isinstance(m, tail_type)]
    assert all(isinstance(m, (bn_type, tail_type)) for m in layers)
    assert len(tails) == (16 if name == "resnet50" else 0)


def test_fused_resnet_tail_is_one_op_and_keeps_the_state_dict():
    """A fused bottleneck's tail is BNAddReLURoute2d (no route module); its masks are saved as route.masks, as
    the unfused model's, so a checkpoint loads into either (test_state_dict_round_trip_... runs them)."""
    fused, unfused = build("resnet50"), build("resnet50", fused=False)
    block = fused.layer2[0]
    assert isinstance(block.bn3, BNAddReLURoute2d) and "route" not in block._modules
    assert block.output_router is block.bn3 and unfused.layer2[0].output_router is unfused.layer2[0].route
    keys = fused.state_dict().keys()
    assert keys == unfused.state_dict().keys() and "layer2.0.route.masks" in keys and "layer2.0.bn3.masks" not in keys
    assert torch.equal(fused.state_dict()["layer2.0.route.masks"], unfused.state_dict()["layer2.0.route.masks"])
    with pytest.raises(RuntimeError, match="masks have 3 channels"):  # checked as any routing layer's masks
        state = fused.state_dict()
        state["layer2.0.route.masks"] = state["layer2.0.route.masks"][:, :3]
        fused.load_state_dict(state)


def test_vgg_feature_indices_follow_torchvision():
    model = vgg11_bn(2, pool_size=1)
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    assert convs == [0, 4, 8, 11, 15, 18, 22, 25]  # torchvision's vgg11_bn
    keys = model.state_dict()
    assert keys["features.0.bias"].shape == (64,) and keys["features.1.running_var"].shape == (64,)
    assert keys["features.1.masks"].shape == (2, 64)


def test_resnet_names_follow_torchvision():
    keys = resnet50(2, width_mult=1 / 16).state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer4.2.bn3.weight",
                "layer3.5.conv2.weight", "layer1.0.bn1.masks", "layer4.2.route.masks"):
        assert key in keys
    assert keys["layer4.2.conv3.weight"].shape == (128, 32, 1, 1)


# ----------------------------------------------------------------------------- masks
def all_masks(model):
    return [m.masks for m in routing_layers(model)]


@pytest.mark.parametrize("name", MODELS)
def test_masks_reproducible_from_seed_and_distinct_per_layer(name):
    first, again = all_masks(build(name, seed=7)), all_masks(build(name, seed=7, fused=False))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = all_masks(build(name, seed=8))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    for i, a in enumerate(first):
        assert a.dtype == torch.bool and (a.sum(1) == active_per_task(a.shape[1], 0.5)).all()
        for b in first[i + 1:]:
            assert a.shape != b.shape or not torch.equal(a, b)


def test_sharing_ratio_zero_gives_disjoint_tasks():
    for masks in all_masks(build("vgg11_bn", num_tasks=3, sharing_ratio=0.0)):
        assert (masks.sum(0) == 1).all()


# ----------------------------------------------------------------------------- routing
@pytest.mark.parametrize("name", MODELS)
def test_per_sample_task_equals_each_sample_alone(name):
    model = randomize(build(name, num_tasks=5)).eval()
    x, task = image(n=6), torch.tensor([3, 0, 4, 3, 1, 0])
    y = model(x, task=task)
    alone = torch.cat([model(x[i:i + 1], task=int(task[i])) for i in range(6)])
    torch.testing.assert_close(y, alone, rtol=1e-5, atol=1e-6)
    assert len(set(model(x[:1], task=t).item() for t in range(5))) == 5  # tasks differ


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stats", ["batch", "routed"])
def test_per_batch_task_equals_same_task_per_sample(name, stats):
    a = build(name, stats=stats).double()
    b = copy.deepcopy(a)
    x = image().double()
    torch.testing.assert_close(a(x, task=2), b(x, task=torch.full((4,), 2)))
    torch.testing.assert_close(a.state_dict(), b.state_dict())  # same running stats
    a.eval(), b.eval()
    torch.testing.assert_close(a(x, task=1), b(x, task=torch.ones(4, dtype=torch.long)))


def test_set_active_task_and_task_argument():
    model = randomize(build("vgg11_bn")).eval()
    x = image()
    set_active_task(model, 1)
    y1 = model(x)
    torch.testing.assert_close(model(x, task=3), model(x, task=torch.tensor(3)))
    assert all(m.active_task == 1 for m in model.modules() if hasattr(m, "active_task"))
    torch.testing.assert_close(model(x), y1)
    with active_task(model, 3):
        torch.testing.assert_close(model(x), model(x, task=3))
    assert not torch.allclose(model(x), model(x, task=3))


# ----------------------------------------------------------------------------- fused vs reference
def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_fused_matches_reference_modules(name, per_sample):
    # float64, so that a deep net's rounding differences do not hide a real mismatch
    fused = randomize(build(name)).double()
    reference = build(name, fused=False, seed=123).double()
    assert fused.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(fused.state_dict())
    x = image().double()
    # Two samples per task: with per-task statistics (the default) a task's samples are normalised
    # together, and one sample is a single value per channel 1x1 deep in.
    task = torch.tensor([0, 3, 3, 0]) if per_sample else 2
    for model in (fused, reference):
        model(x, task=task).square().sum().backward()
    # Train-mode BN over a few values per channel (1x1 deep in) amplifies rounding: compare
    # each gradient to the largest one, not element by element.
    expected = grads(reference)
    scale = max(g.abs().max() for g in expected.values())
    torch.testing.assert_close(grads(fused), expected, rtol=1e-7, atol=1e-9 * scale)
    torch.testing.assert_close(fused.state_dict(), reference.state_dict())  # running stats too
    fused.eval(), reference.eval()
    torch.testing.assert_close(fused(x, task=task), reference(x, task=task))


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_between_fused_and_reference(name):
    source, x = randomize(build(name, fused=False)).eval(), image()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    for fused in (True, False):
        target = build(name, seed=99, fused=fused).eval()
        buffer.seek(0)
        target.load_state_dict(torch.load(buffer))
        assert all(torch.equal(a, b) for a, b in zip(all_masks(source), all_masks(target)))
        torch.testing.assert_close(target(x, task=1), source(x, task=1))
        source = target  # fused → reference and back


# ----------------------------------------------------------------------------- heads
def heads_by_loop(heads: TaskHeads, x, task):
    """Each sample through its own task's Linear → ReLU → Linear."""
    out = []
    for xi, t in zip(x, task.tolist()):
        h = F.relu(F.linear(xi, heads.weight1[t], heads.bias1[t]))
        out.append(h @ heads.weight2[t] + heads.bias2[t])
    return torch.stack(out)


@pytest.mark.parametrize("task", [[2, 0, 2, 5, 2, 0, 1], [4] * 7, [6, 5, 4, 3, 2, 1, 0]])
@pytest.mark.parametrize("path", ["forward", "_per_sample_gathered"])  # the second: under compile
def test_heads_per_sample_match_a_loop_over_samples(task, path):
    heads = TaskHeads(6, num_tasks=7, embedding_dim=5)
    x, task = torch.randn(7, 6, requires_grad=True), torch.tensor(task)
    expected = heads_by_loop(heads, x, task)
    y = getattr(heads, path)(x, task)
    torch.testing.assert_close(y, expected)
    g_expected = torch.autograd.grad(expected.sum(), [x, *heads.parameters()])
    torch.testing.assert_close(torch.autograd.grad(y.sum(), [x, *heads.parameters()]), g_expected)
    torch.testing.assert_close(heads(x, task=4), heads_by_loop(heads, x, torch.full((7,), 4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_heads_per_sample_without_autograd_loop_over_task_groups_on_views(monkeypatch, dtype):
    """Without autograd, large heads on the CPU run task group by task group on weight views: the same
    logits as the grouped bmm and as each sample alone, and no weight slice is copied."""
    heads = TaskHeads(6, num_tasks=7, embedding_dim=5, dtype=dtype)
    x, task = torch.randn(9, 6, dtype=dtype), torch.tensor([2, 0, 2, 5, 2, 0, 1, 6, 5])
    with torch.no_grad():
        grouped = heads(x, task=task)
        monkeypatch.setattr(TaskHeads, "LOOP_MIN_SLICE_BYTES", 0)
        with LargestOutput() as largest:
            looped = heads(x, task=task)
        with torch.inference_mode():
            torch.testing.assert_close(heads(x, task=task), looped, rtol=0, atol=0)
    assert largest.numel <= heads.weight1[0].numel()  # views of one slice at most, no [U, E, F] gather
    torch.testing.assert_close(looped, grouped)
    torch.testing.assert_close(looped, heads_by_loop(heads, x, task))
    with torch.enable_grad():  # autograd keeps the grouped bmm (one dense weight gradient)
        assert not heads._loops(x)


def test_heads_compile_without_graph_breaks():
    heads, x = TaskHeads(6, num_tasks=5, embedding_dim=4), torch.randn(7, 6)
    compiled = torch.compile(heads, fullgraph=True, backend="eager")
    for task in (torch.tensor([0, 1, 4, 4, 2, 0, 1]), 3, torch.tensor(2)):
        torch.testing.assert_close(compiled(x, task), heads(x, task))


def test_heads_empty_batch():
    heads = TaskHeads(6, num_tasks=3, embedding_dim=5)
    assert heads(torch.randn(0, 6), task=torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert heads(torch.randn(0, 6), task=1).shape == (0,)


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def forward_cost(num_tasks, task):
    heads, x = TaskHeads(64, num_tasks, embedding_dim=32), torch.randn(16, 64)
    with FlopCounterMode(display=False) as flops, LargestOutput() as largest:
        heads(x, task=task)
    return flops.get_total_flops(), largest.numel


@pytest.mark.parametrize("task", [1, torch.tensor([0, 1] * 8)])
def test_heads_forward_cost_does_not_grow_with_tasks(task):
    assert forward_cost(2, task) == forward_cost(1000, task)
    heads, x = TaskHeads(256, 1000, embedding_dim=128), torch.randn(64, 256)
    start = time.perf_counter()
    heads(x, task=999), heads(x, task=torch.arange(936, 1000))
    assert time.perf_counter() - start < 0.5


# ----------------------------------------------------------------------------- bad input
def test_heads_reject_bad_tasks():
    heads, x = TaskHeads(6, num_tasks=3, embedding_dim=5), torch.randn(4, 6)
    with pytest.raises(ValueError, match="task is not set"):
        heads(x)
    for bad, error in ((3, IndexError), (-1, IndexError), (torch.tensor([0, 1, 3, 0]), IndexError),
                       (torch.tensor([0, -1, 0, 0]), IndexError), (1.0, TypeError), (True, TypeError),
                       (torch.tensor([0.0, 1, 0, 0]), TypeError), (torch.tensor([0, 1]), ValueError),
                       (torch.zeros(4, 1, dtype=torch.long), ValueError)):
        with pytest.raises(error, match="task"):
            heads(x, task=bad)
    with pytest.raises(ValueError, match=r"x must be \[N, 6\]"):
        heads(torch.randn(4, 5), task=0)
    for bad in ({"in_features": 0}, {"num_tasks": 0}, {"embedding_dim": 2.5}):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            TaskHeads(**{"in_features": 6, "num_tasks": 3, **bad})


@pytest.mark.parametrize("name", MODELS)
def test_models_reject_bad_input(name):
    model = build(name, num_tasks=3)
    with pytest.raises(ValueError, match="task is not set"):
        model(image())
    with pytest.raises(IndexError, match="out of range"):
        model(image(), task=3)
    with pytest.raises(IndexError, match="task ids"):
        model(image(), task=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="per-sample task"):
        model(image(), task=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="task"):
        model(image(), task=0.5)
    with pytest.raises(ValueError, match=r"x must be \[N, 3, H, W\]"):
        model(image(channels=1), task=0)
    with pytest.raises(ValueError, match=r"x must be \[N, 3, H, W\]"):
        model(torch.randn(3, 16, 16), task=0)


@pytest.mark.parametrize("options,error,match", [
    ({"num_tasks": 0}, ValueError, "num_tasks"), ({"num_tasks": 2.0}, TypeError, "num_tasks"),
    ({"width_mult": 0}, ValueError, "width_mult"), ({"width_mult": "1"}, TypeError, "width_mult"),
    ({"sharing_ratio": 1.5}, ValueError, "sharing_ratio"), ({"stats": "global"}, ValueError, "stats"),
    ({"fused": False, "stats": "routed"}, ValueError, "routed"), ({"seed": 1.0}, TypeError, "seed"),
    ({"in_channels": 0}, ValueError, "in_channels"), ({"pool_size": 0}, ValueError, "pool_size"),
    ({"backend": "gpu"}, ValueError, "backend"),
    ({"num_tasks": 5, "sharing_ratio": 0.0}, ValueError, "more than num_channels"),
])
def test_models_reject_bad_options(options, error, match):
    options = {"num_tasks": 2, "width_mult": 1 / 32, **options}
    with pytest.raises(error, match=match):
        vgg11_bn(options.pop("num_tasks"), **options)


def test_resnet_fused_tail_option():
    with pytest.raises(TypeError, match="fused_tail must be a bool"):
        resnet50(2, width_mult=1 / 32, fused_tail=1)
    unfused_tail = randomize(build("resnet50", fused_tail=False)).double()
    block = unfused_tail.layer1[0]
    assert isinstance(block.bn1, BNReLURoute2d) and isinstance(block.route, TaskRouter)
    fused = build("resnet50").double()
    fused.load_state_dict(unfused_tail.state_dict())
    x = image().double()  # float64: train-mode BN over a few values per channel deep in amplifies rounding
    for training in (True, False):
        fused.train(training), unfused_tail.train(training)
        torch.testing.assert_close(fused(x, task=1), unfused_tail(x, task=1))


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet50"])
def test_fused_models_deploy_with_torch_export(name):
    """An eval-mode fused model exports (torch.export), saves and loads as one graph of the taskrouting ops (the
    ResNet tail as one bn_add_relu_route), and the loaded program computes what the model does."""
    model = randomize(build(name)).eval()
    set_active_task(model, 2)
    x = image()
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "taskrouting.bn_relu_route.default" in targets
    assert ("taskrouting.bn_add_relu_route.default" in targets) == (name == "resnet50")
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    torch.testing.assert_close(loaded.module()(x), model(x))


def test_fused_resnet_tail_under_autocast():
    """Under bf16 autocast the tail takes the convolution's and the shortcut's bf16 outputs as they are (no cast
    around the op): a training step runs, and in eval the output matches float32 to bf16 precision. (Gradients
    are not checked for finiteness: this 1/16-wide model normalises 4 values per channel deep in, and PyTorch's
    own bf16 CPU backward of it, the unfused reference included, gives non-finite ones for some weight draws.)"""
    torch.manual_seed(0)
    model = randomize(build("resnet50", task_stats=False))
    x = image()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, task=1)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model.layer4[0].conv3.weight.grad is not None
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, task=1)
    torch.testing.assert_close(y.float(), model(x, task=1), rtol=0.05, atol=0.05)
