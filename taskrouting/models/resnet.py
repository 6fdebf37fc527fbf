"""Routed ResNet-50: a Task Routing Layer after every BN + ReLU, in the stem and in every bottleneck."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import RecomputableMaxPool2d, RoutedNet, Routing

__all__ = ["Bottleneck", "RoutedResNet", "resnet50"]


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv) with routing:
    ``route(relu(bn3(conv3(bn2(conv2(bn1(conv1(x)))))) + shortcut(x)))``, where ``bn1`` and
    ``bn2`` are routed BN → ReLU layers and ``route`` routes the block's output, i.e. the
    residual stream the next block reads."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int, routing: Routing):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = routing.bn_relu_route(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = routing.bn_relu_route(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = routing.batch_norm(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                routing.batch_norm(out_channels))
        self.route = routing.router(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.route(F.relu(out + shortcut))


class RoutedResNet(RoutedNet):
    """ResNet with bottlenecks and Task Routing, then ``AdaptiveAvgPool2d(pool_size)`` and one
    ``TaskHeads`` head per task. Arguments as ``RoutedVGG``, plus ``layers`` (bottlenecks per
    stage); ``pool_size`` defaults to 1, torchvision's global average pool.

    Names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ...), so its
    backbone weights load with ``strict=False``; each routing layer adds ``masks``.
    """

    expansion = 4

    def __init__(self, layers, num_tasks: int, *, sharing_ratio: float = 0.5, seed: int | None = None,
                 in_channels: int = 3, width_mult: float = 1.0, pool_size: int = 1,
                 embedding_dim: int = 256, stats: str = "batch", fused: bool = True, backend: str = "auto",
                 task_stats: bool = True, memory_efficient: bool = False):
        super().__init__(in_channels, width_mult, pool_size, memory_efficient)
        routing = Routing(num_tasks, sharing_ratio, seed, stats, fused, backend, task_stats)
        channels = self.scaled(64)
        self.conv1 = nn.Conv2d(self.in_channels, channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = routing.bn_relu_route(channels)
        self.maxpool = RecomputableMaxPool2d(kernel_size=3, stride=2, padding=1)
        self.num_stages = len(layers)
        for stage, blocks in enumerate(layers):
            width = self.scaled(64 * 2 ** stage)
            stage_blocks = []
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                stage_blocks.append(Bottleneck(channels, width, width * self.expansion, stride, routing))
                channels = width * self.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.add_heads(channels, routing.num_tasks, embedding_dim)

    def trunk(self) -> list[nn.Module]:
        blocks = [block for i in range(self.num_stages) for block in getattr(self, f"layer{i + 1}")]
        return [self.conv1, self.bn1, self.maxpool, *blocks, self.avgpool]


def resnet50(num_tasks: int, **kwargs) -> RoutedResNet:
    """Routed ResNet-50 (3, 4, 6, 3 bottlenecks); keyword arguments as ``RoutedResNet``."""
    return RoutedResNet((3, 4, 6, 3), num_tasks, **kwargs)
