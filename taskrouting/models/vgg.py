"""Routed VGG-11 / VGG-16 with batch norm: conv → BN → ReLU → route after every convolution."""
from __future__ import annotations

from torch import nn

from .blocks import RecomputableMaxPool2d, RoutedNet, Routing

__all__ = ["RoutedVGG", "vgg11_bn", "vgg16_bn", "CONFIGS"]

# torchvision's configurations "A" (VGG-11) and "D" (VGG-16): conv widths, "M" = 2x2 max pool.
CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class RoutedVGG(RoutedNet):
    """VGG with batch norm and a Task Routing Layer after every conv block, then
    ``AdaptiveAvgPool2d(pool_size)`` and one ``TaskHeads`` head per task.

    Args:
        config: conv widths and ``"M"`` (max pool), e.g. ``CONFIGS["vgg16"]``.
        num_tasks: number of tasks T (one binary head each).
        sharing_ratio: σ, the fraction of channels each task keeps in every routing layer.
        seed: masks of every routing layer drawn from one generator seeded with it.
        in_channels: input image channels.
        width_mult: multiplies every conv width (e.g. 1/16 for quick CPU runs).
        pool_size: side of the adaptive average pool before the heads (torchvision: 7).
            Each head's first Linear reads ``C * pool_size**2`` features, so with many tasks
            or small images ``pool_size=1`` keeps the heads small.
        embedding_dim: width of each task's embedding (its hidden layer).
        stats, backend: passed to the fused ``BNReLURoute2d`` layers.
        task_stats: per-task BatchNorm statistics in every routed layer (``nn/task_stats.py``; the
            default), so that plain ``model.eval()`` normalises each task with its own statistics.
        memory_efficient: rebuild the fused layers' outputs in backward instead of keeping them
            (``RoutedNet``); it applies to the fused backends (not ``backend="reference"``).
        fused: ``False`` builds ``ReferenceBNReLURoute2d`` (BatchNorm2d → ReLU → TaskRouter,
            unfused) instead; the state_dict keys and shapes are the same either way.

    The max pools use ``ceil_mode=True``: same as torchvision for even sizes, and a side of 1
    stays 1 instead of failing, so inputs as small as 1x1 work (odd sides round up).
    ``features`` keeps an ``nn.Identity`` where torchvision has its ReLU (the ReLU is part of
    the routed BN layer), so the ``features.*`` indices and keys are torchvision's ``vgg*_bn``
    ones, plus each layer's ``masks``.
    """

    def __init__(self, config, num_tasks: int, *, sharing_ratio: float = 0.5, seed: int | None = None,
                 in_channels: int = 3, width_mult: float = 1.0, pool_size: int = 7,
                 embedding_dim: int = 256, stats: str = "batch", fused: bool = True, backend: str = "auto",
                 task_stats: bool = True, memory_efficient: bool = False):
        super().__init__(in_channels, width_mult, pool_size, memory_efficient)
        routing = Routing(num_tasks, sharing_ratio, seed, stats, fused, backend, task_stats)
        layers, channels = [], self.in_channels
        for item in config:
            if item == "M":
                layers.append(RecomputableMaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                continue
            width = self.scaled(item)
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1),
                       routing.bn_relu_route(width), nn.Identity()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.add_heads(channels, routing.num_tasks, embedding_dim)

    def trunk(self) -> list[nn.Module]:
        return [*self.features, self.avgpool]


def vgg11_bn(num_tasks: int, **kwargs) -> RoutedVGG:
    """Routed VGG-11 with batch norm (configuration "A"); keyword arguments as ``RoutedVGG``."""
    return RoutedVGG(CONFIGS["vgg11"], num_tasks, **kwargs)


def vgg16_bn(num_tasks: int, **kwargs) -> RoutedVGG:
    """Routed VGG-16 with batch norm (configuration "D"); keyword arguments as ``RoutedVGG``."""
    return RoutedVGG(CONFIGS["vgg16"], num_tasks, **kwargs)
