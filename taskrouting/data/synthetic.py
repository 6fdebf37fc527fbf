"""``synthetic``: many binary attributes of images rendered from a few latent factors, with a
relatedness knob that goes from independent tasks to identical ones."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .base import MultiTaskDataset

__all__ = ["make_synthetic"]


def _positive_rates(positive_rate, num_tasks: int, generator: torch.Generator) -> torch.Tensor:
    low, high = (positive_rate, positive_rate) if isinstance(positive_rate, numbers.Real) else positive_rate
    if not 0 < low <= high < 1:
        raise ValueError(f"positive_rate must be in (0, 1) or a (low, high) range inside it, got {positive_rate!r}")
    return low + (high - low) * torch.rand(num_tasks, generator=generator, dtype=torch.float64)


def _task_directions(num_tasks: int, num_factors: int, relatedness: float, groups: int, between: float,
                     g: torch.Generator) -> torch.Tensor:
    """Unit task directions ``[T, num_factors]`` (see ``make_synthetic``)."""
    if groups == 1:  # the draws of the ungrouped set, kept so that its seeded data stay the same
        shared = F.normalize(torch.randn(num_factors, generator=g), dim=0)
        own = F.normalize(torch.randn(num_tasks, num_factors, generator=g), dim=1)
        return F.normalize(math.sqrt(relatedness) * shared + math.sqrt(1 - relatedness) * own, dim=1)
    block = torch.arange(num_factors) % groups  # factor k belongs to group k % groups
    member = (block[None, :] == (torch.arange(num_tasks) % groups)[:, None]).float()  # [T, num_factors]
    shared = torch.randn(groups, num_factors, generator=g)[torch.arange(num_tasks) % groups] * member
    own = torch.randn(num_tasks, num_factors, generator=g) * member
    within = F.normalize(math.sqrt(relatedness) * F.normalize(shared, dim=1)
                         + math.sqrt(1 - relatedness) * F.normalize(own, dim=1), dim=1)
    common = F.normalize(torch.randn(num_factors, generator=g), dim=0)
    return F.normalize(math.sqrt(between) * common + math.sqrt(1 - between) * within, dim=1)


def make_synthetic(root=None, num_tasks: int = 300, num_factors: int = 16, relatedness: float = 0.5,
                   num_samples: int = 4000, image_size: int = 16, channels: int = 3,
                   label_noise: float = 0.2, pixel_noise: float = 0.5, positive_rate=0.5,
                   test_fraction: float = 0.2, val_fraction: float = 0.0, seed: int = 0, groups: int = 1,
                   between_relatedness: float = 0.0) -> MultiTaskDataset:
    """A seeded many-task image set.

    Each sample has ``num_factors`` latent factors ``z ~ N(0, I)``; its image is
    ``sum_k z_k * pattern_k + pixel_noise * noise`` with fixed smooth random patterns
    (per-pixel variance about 1 before the noise). Task t is a noisy linear threshold of the
    factors: ``label_t = [w_t . z + label_noise * eps > b_t]`` with
    ``w_t = normalise(sqrt(r) * u + sqrt(1 - r) * v_t)``: ``u`` one direction shared by all tasks,
    ``v_t`` each task's own random direction, ``r = relatedness``. So r = 1 gives identical tasks
    (up to label noise), r = 0 independent random directions (pairwise score correlation about
    ``r`` in between, plus O(1/sqrt(num_factors)) chance overlap). ``b_t`` sets each task's
    positive rate: ``positive_rate`` (a float, or a ``(low, high)`` range drawn per task).
    Splits: a seeded random ``test_fraction`` is test, ``val_fraction`` val, the rest train.

    Groups of related tasks (``groups`` > 1): the factors are dealt into ``groups`` disjoint
    blocks and task t belongs to group ``t % groups`` (so the first k tasks span every group);
    its ``u`` and ``v_t`` live in its group's block, so ``relatedness`` is the relatedness within
    a group and tasks of different groups share no factor. ``between_relatedness`` (b) then mixes
    in one direction over all factors shared by every task:
    ``w_t = normalise(sqrt(b) * s + sqrt(1 - b) * w_t^group)``. With ``groups=1``, b must be 0
    and the set is the one described above.
    """
    if root is not None:
        raise ValueError("synthetic data is generated: root must be None")
    for value, name in ((num_tasks, "num_tasks"), (num_factors, "num_factors"), (num_samples, "num_samples"),
                        (image_size, "image_size"), (channels, "channels")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0.0 <= relatedness <= 1.0:
        raise ValueError(f"relatedness must be in [0, 1], got {relatedness}")
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= num_factors:
        raise ValueError(f"groups must be an int in [1, num_factors={num_factors}], got {groups!r}")
    if not 0.0 <= between_relatedness <= 1.0 or (groups == 1 and between_relatedness):
        raise ValueError(f"between_relatedness must be in [0, 1] (and 0 when groups=1), got {between_relatedness}")
    for value, name in ((label_noise, "label_noise"), (pixel_noise, "pixel_noise")):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (0 <= test_fraction and 0 <= val_fraction and test_fraction + val_fraction < 1):
        raise ValueError("test_fraction and val_fraction must be >= 0 and sum to less than 1")
    g = torch.Generator().manual_seed(seed)

    coarse = torch.randn(num_factors, channels, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False)
    patterns = patterns.flatten(1)
    pixels = patterns.shape[1]
    patterns = patterns / patterns.norm(dim=1, keepdim=True) * math.sqrt(pixels / num_factors)
    factors = torch.randn(num_samples, num_factors, generator=g)
    images = factors @ patterns + pixel_noise * torch.randn(num_samples, pixels, generator=g)

    weights = _task_directions(num_tasks, num_factors, relatedness, groups, between_relatedness, g)
    scores = factors @ weights.T + label_noise * torch.randn(num_samples, num_tasks, generator=g)
    rates = _positive_rates(positive_rate, num_tasks, g)
    # w_t.z is N(0, 1) for unit w_t, so the score is N(0, 1 + noise^2): threshold at its quantile.
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    thresholds = (normal.icdf(1 - rates) * math.sqrt(1 + label_noise ** 2)).float()
    labels = (scores > thresholds).to(torch.uint8)

    order = torch.randperm(num_samples, generator=g)
    num_test, num_val = int(round(test_fraction * num_samples)), int(round(val_fraction * num_samples))
    splits = {"train": order[num_test + num_val:], "val": order[num_test:num_test + num_val], "test": order[:num_test]}
    splits = {k: v.sort().values for k, v in splits.items()}
    splits = {k: v for k, v in splits.items() if v.numel()}
    width = len(str(num_tasks - 1))
    return MultiTaskDataset(images.view(num_samples, channels, image_size, image_size), labels,
                            [f"attr_{t:0{width}d}" for t in range(num_tasks)], splits, name="synthetic")
