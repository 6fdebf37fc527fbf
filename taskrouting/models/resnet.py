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
    residual stream the next block reads.

    In a fused model the tail ``route(relu(bn3(.) + shortcut))`` is one op: ``bn3`` is a ``BNAddReLURoute2d``
    holding the router's masks, and there is no ``route`` module. The state_dict is the same either way
    (the masks are saved and loaded as ``route.masks``), so checkpoints move between fused and unfused models.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int, routing: Routing,
                 fused_tail: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = routing.bn_relu_route(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = routing.bn_relu_route(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.fused_tail = routing.fused and fused_tail
        # The tail's masks are drawn third in either case (bn1, bn2, then the block's output).
        self.bn3 = routing.bn_add_relu_route(out_channels) if self.fused_tail else routing.batch_norm(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                routing.batch_norm(out_channels))
        if self.fused_tail:
            self._register_state_dict_hook(_masks_saved_as_route)
            self._register_load_state_dict_pre_hook(_masks_loaded_from_route)
        else:
            self.route = routing.router(out_channels)

    @property
    def output_router(self) -> nn.Module:
        """The layer holding the masks of the block's output: ``route``, or the fused tail ``bn3``."""
        return self.bn3 if self.fused_tail else self.route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.fused_tail:
            return self.bn3(out, shortcut)
        return self.route(F.relu(self.bn3(out) + shortcut))


def _masks_saved_as_route(module, state_dict, prefix, local_metadata):
    state_dict[prefix + "route.masks"] = state_dict.pop(prefix + "bn3.masks")


def _masks_loaded_from_route(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    if prefix + "route.masks" in state_dict:
        state_dict[prefix + "bn3.masks"] = state_dict.pop(prefix + "route.masks")


class RoutedResNet(RoutedNet):
    """ResNet with bottlenecks and Task Routing, then ``AdaptiveAvgPool2d(pool_size)`` and one
    ``TaskHeads`` head per task. Arguments as ``RoutedVGG``, plus ``layers`` (bottlenecks per
    stage); ``pool_size`` defaults to 1, torchvision's global average pool. A fused model runs each
    bottleneck's tail as one ``bn_add_relu_route``; ``fused_tail=False`` keeps it unfused (BatchNorm2d, add,
    ReLU, TaskRouter) with the same state_dict.

    Names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1.0.conv1``, ...), so its
    backbone weights load with ``strict=False``; each routing layer adds ``masks``.
    """

    expansion = 4

    def __init__(self, layers, num_tasks: int, *, sharing_ratio: float = 0.5, seed: int | None = None,
                 in_channels: int = 3, width_mult: float = 1.0, pool_size: int = 1,
                 embedding_dim: int = 256, stats: str = "batch", fused: bool = True, backend: str = "auto",
                 task_stats: bool = True, memory_efficient: bool = False, fused_tail: bool = True):
        super().__init__(in_channels, width_mult, pool_size, memory_efficient)
        routing = Routing(num_tasks, sharing_ratio, seed, stats, fused, backend, task_stats)
        if not isinstance(fused_tail, bool):
            raise TypeError(f"fused_tail must be a bool, got {type(fused_tail).__name__}")
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
                stage_blocks.append(Bottleneck(channels, width, width * self.expansion, stride, routing, fused_tail))
                channels = width * self.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.add_heads(channels, routing.num_tasks, embedding_dim)

    def trunk(self) -> list[nn.Module]:
        blocks = [block for i in range(self.num_stages) for block in getattr(self, f"layer{i + 1}")]
        return [self.conv1, self.bn1, self.maxpool, *blocks, self.avgpool]


def resnet50(num_tasks: int, **kwargs) -> RoutedResNet:
    """Routed ResNet-50 (3, 4, 6, 3 bottlenecks); keyword arguments as ``RoutedResNet``."""
    return RoutedResNet((3, 4, 6, 3), num_tasks, **kwargs)
