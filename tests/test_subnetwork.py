"""extract_subnetwork: one task's dense subnetwork gives the full model's eval-mode outputs."""
from __future__ import annotations

import pytest
import torch
from test_models import MODELS, build, image, randomize
from torch import nn

from taskrouting import TaskConditioned
from taskrouting.models import extract_subnetwork
from taskrouting.models.subnetwork import ChannelSelect
from taskrouting.nn.masks import active_per_task

NUM_TASKS = 3


def check_extraction(model, x, atol=1e-5, **options):
    """Every task's subnetwork against the full model, and the outputs differ between tasks."""
    model.eval()
    outputs = []
    for task in range(NUM_TASKS):
        sub = extract_subnetwork(model, task, **options)
        expected = model(x, task=task)
        torch.testing.assert_close(sub(x), expected, rtol=1e-5, atol=atol)
        outputs.append(expected)
    assert not torch.allclose(outputs[0], outputs[1])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("sharing_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("fused", [True, False])
def test_subnetwork_equals_full_model(name, sharing_ratio, fused):
    model = randomize(build(name, NUM_TASKS, sharing_ratio=sharing_ratio, fused=fused, seed=3))
    check_extraction(model, image(n=3))


@pytest.mark.parametrize("name", MODELS)
def test_subnetwork_is_exact_in_float64_with_bn_sliced(name):
    model = randomize(build(name, NUM_TASKS, seed=5)).double()
    check_extraction(model, image(n=2).double(), atol=1e-12, fold_bn=False)
    sub = extract_subnetwork(model, 0, fold_bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in sub.modules())


@pytest.mark.parametrize("pool_size,size", [(1, 16), (3, 16), (2, 9)])
def test_head_reads_the_pooled_layout(pool_size, size):
    model = randomize(build("vgg11_bn", NUM_TASKS, pool_size=pool_size))
    check_extraction(model, image(n=2, size=size))


@pytest.mark.parametrize("name", MODELS)
def test_subnetwork_is_dense_and_smaller(name):
    sharing_ratio = 0.5
    model = build(name, NUM_TASKS, sharing_ratio=sharing_ratio)
    sub = extract_subnetwork(model, 1)
    assert not any(isinstance(m, TaskConditioned) for m in sub.modules())
    convs = [m for m in sub.modules() if isinstance(m, nn.Conv2d)]
    full = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(full)
    assert convs[0].in_channels == 3
    for conv, original in zip(convs, full):
        assert conv.out_channels == active_per_task(original.out_channels, sharing_ratio)
    head = sub.head[0]
    assert head.in_features == active_per_task(model.heads.in_features // 4, sharing_ratio) * 4
    trunk_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("heads"))
    assert sum(p.numel() for p in sub.trunk.parameters()) < 0.4 * trunk_params
    assert not sub.training and model.training  # the model's mode is left as it was


def test_resnet_shortcuts_pick_channels_from_the_stream():
    model = build("resnet50", NUM_TASKS, sharing_ratio=0.5)
    selects = [m for m in extract_subnetwork(model, 0).modules() if isinstance(m, ChannelSelect)]
    assert len(selects) == 16 - 4  # one per identity shortcut; the first block of a stage downsamples
    assert any(m.pad for m in selects)  # some output channels are not carried by the input stream


def test_sharing_ratio_one_keeps_the_whole_trunk():
    model = build("vgg16_bn", NUM_TASKS, sharing_ratio=1.0)
    sub = extract_subnetwork(model, 2)
    full = [m.weight.shape for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.weight.shape for m in sub.modules() if isinstance(m, nn.Conv2d)] == full


def test_extract_rejects_bad_input():
    model = build("vgg11_bn", NUM_TASKS)
    with pytest.raises(IndexError, match="out of range"):
        extract_subnetwork(model, NUM_TASKS)
    with pytest.raises(TypeError, match="task must be an int"):
        extract_subnetwork(model, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="routed model"):
        extract_subnetwork(nn.Sequential(nn.Conv2d(3, 4, 3)), 0)
