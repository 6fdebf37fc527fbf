"""TaskRouter (the reference TRL) and the active-task switch."""
import pytest
import torch
from torch import nn

from taskrouting import BNReLURoute2d, TaskRouter, active_task, set_active_task


def test_router_multiplies_by_the_task_mask():
    router = TaskRouter(6, num_tasks=4, sharing_ratio=0.5, seed=1)
    x = torch.randn(3, 6, 2, 2)
    router.active_task = 2
    torch.testing.assert_close(router(x), x * router.masks[2].view(1, 6, 1, 1).float())
    tasks = torch.tensor([0, 3, 3])
    router.active_task = tasks
    torch.testing.assert_close(router(x), x * router.masks[tasks].view(3, 6, 1, 1).float())
    torch.testing.assert_close(router(x[:, :, 0, 0], task=1), x[:, :, 0, 0] * router.masks[1].float())


def test_masks_are_a_saved_bool_buffer():
    router = TaskRouter(8, num_tasks=3, seed=0)
    assert list(router.parameters()) == []
    assert router.state_dict()["masks"].dtype == torch.bool
    other = TaskRouter(8, num_tasks=3, seed=5)
    other.load_state_dict(router.state_dict())
    assert torch.equal(other.masks, router.masks)
    assert router.to(torch.float64).masks.dtype == torch.bool


def test_seeded_masks_and_distinct_layers():
    assert torch.equal(TaskRouter(16, 10, seed=3).masks, TaskRouter(16, 10, seed=3).masks)
    torch.manual_seed(0)
    a, b = TaskRouter(16, 10), TaskRouter(16, 10)
    assert not torch.equal(a.masks, b.masks)


def test_user_masks():
    masks = torch.tensor([[True, False, True], [False, True, False]])
    router = TaskRouter(3, masks=masks)
    assert router.num_tasks == 2 and torch.equal(router.masks, masks)
    with pytest.raises(ValueError, match="have none"):
        TaskRouter(3, masks=torch.tensor([[True, False, True], [False, False, False]]))
    with pytest.raises(ValueError, match="num_tasks=3"):
        TaskRouter(3, num_tasks=3, masks=masks)


def test_set_active_task_reaches_every_routing_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), BNReLURoute2d(4, num_tasks=5), nn.Conv2d(4, 4, 1), TaskRouter(4, 5))
    set_active_task(model, 3)
    assert model[1].active_task == 3 and model[3].active_task == 3
    with active_task(model, 1):
        assert model[1].active_task == 1 and model[3].active_task == 1
    assert model[1].active_task == 3
    tasks = torch.tensor([0, 4])
    set_active_task(model, tasks)
    assert model[3].active_task is tasks
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 4, 4, 4)


def test_bad_inputs_name_the_argument():
    router = TaskRouter(4, 3, seed=0)
    with pytest.raises(ValueError, match="task is not set"):
        router(torch.randn(2, 4))
    router.active_task = 3
    with pytest.raises(IndexError, match="out of range"):
        router(torch.randn(2, 4))
    router.active_task = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        router(torch.randn(2, 4))
    with pytest.raises(ValueError, match="5 channels but the router has 4"):
        router(torch.randn(2, 5), task=0)
    with pytest.raises(TypeError, match="task must be"):
        set_active_task(router, 1.5)
    with pytest.raises(TypeError, match="seed"):
        TaskRouter(4, 3, seed="x")
    with pytest.raises(ValueError, match="sharing_ratio"):
        TaskRouter(4, 3, sharing_ratio=2)
