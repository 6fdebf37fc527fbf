"""make_masks: σ convention, reproducibility, the σ = 0 partition, checks."""
import pytest
import torch

from taskrouting import make_masks
from taskrouting.nn.masks import check_masks
from taskrouting.ops.route import select_route


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("tasks,channels,sigma,keep", [(5, 10, 0.5, 5), (3, 7, 0.1, 1), (4, 64, 1.0, 64),
                                                        (2, 9, 0.25, 2), (6, 3, 0.01, 1), (2, 10, 0.45, 5)])
def test_each_task_keeps_round_sigma_c(tasks, channels, sigma, keep):
    masks = make_masks(tasks, channels, sigma, gen())
    assert masks.dtype == torch.bool and masks.shape == (tasks, channels)
    assert (masks.sum(1) == keep).all()


def test_same_seed_same_masks_on_every_machine():
    expected = [[0, 0, 1, 1, 1, 0, 1, 0], [0, 0, 1, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 1, 0]]
    assert make_masks(3, 8, 0.5, gen(0)).int().tolist() == expected
    assert torch.equal(make_masks(50, 32, 0.3, gen(7)), make_masks(50, 32, 0.3, gen(7)))
    assert not torch.equal(make_masks(50, 32, 0.3, gen(7)), make_masks(50, 32, 0.3, gen(8)))


@pytest.mark.parametrize("tasks,channels", [(1, 1), (3, 8), (8, 8), (5, 64), (7, 100)])
def test_sigma_zero_is_a_balanced_disjoint_partition(tasks, channels):
    masks = make_masks(tasks, channels, 0.0, gen(3))
    assert (masks.sum(0) == 1).all()  # disjoint and covering
    sizes = masks.sum(1)
    assert sizes.max() - sizes.min() <= 1 and sizes.min() >= 1


def test_sigma_zero_with_more_tasks_than_channels():
    with pytest.raises(ValueError, match="num_tasks=9 is more than num_channels=8"):
        make_masks(9, 8, 0.0)


@pytest.mark.parametrize("bad,error", [(-0.1, ValueError), (1.5, ValueError), ("0.5", TypeError), (True, TypeError)])
def test_bad_sharing_ratio(bad, error):
    with pytest.raises(error, match="sharing_ratio"):
        make_masks(2, 4, bad)


def test_bad_counts_and_generator():
    with pytest.raises(ValueError, match="num_tasks"):
        make_masks(0, 4, 0.5)
    with pytest.raises(TypeError, match="num_channels"):
        make_masks(2, 4.0, 0.5)
    with pytest.raises(TypeError, match="generator"):
        make_masks(2, 4, 0.5, generator=0)


def test_check_masks():
    with pytest.raises(ValueError, match=r"task\(s\) \[1\] have none"):
        check_masks(torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="num_tasks, num_channels"):
        check_masks(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="3 channels but num_channels=2"):
        check_masks(torch.ones(2, 3, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="binary"):
        check_masks(torch.full((2, 2), 0.5))
    assert check_masks(torch.tensor([[1, 0], [0, 1]])).dtype == torch.bool


def test_select_route():
    masks = make_masks(4, 6, 0.5, gen())
    assert torch.equal(select_route(masks, 2, 3), masks[2])
    assert torch.equal(select_route(masks, torch.tensor(2), 3), masks[2])
    assert torch.equal(select_route(masks, torch.tensor([3, 0, 3]), 3), masks[[3, 0, 3]])
    with pytest.raises(IndexError, match="task 4 is out of range for 4 tasks"):
        select_route(masks, 4, 3)
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        select_route(masks, torch.tensor([0, -1, 2]), 3)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        select_route(masks, torch.tensor([0, 1]), 3)
    with pytest.raises(TypeError, match="integer"):
        select_route(masks, torch.tensor([0.0, 1.0, 2.0]), 3)
    with pytest.raises(TypeError, match="task must be an int"):
        select_route(masks, 1.0, 3)
    with pytest.raises(ValueError, match="task is not set"):
        select_route(masks, None, 3)
