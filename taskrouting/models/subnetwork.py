"""extract_subnetwork: one task's dense, smaller network, cut out of a routed model."""
from __future__ import annotations

import copy
import numbers
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ROUTED_BN, RoutedNet
from .resnet import Bottleneck

__all__ = ["extract_subnetwork", "ChannelSelect", "Residual"]


class ChannelSelect(nn.Module):
    """``x[:, index]``; an index of -1 gives an all-zero channel (one the input does not carry)."""

    def __init__(self, index: torch.Tensor, in_channels: int):
        super().__init__()
        self.pad = bool((index < 0).any())
        self.register_buffer("index", torch.where(index < 0, in_channels, index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, 1))  # one zero channel after the last
        return x.index_select(1, self.index)


class Residual(nn.Module):
    """``relu(body(x) + shortcut(x))``: a dense bottleneck."""

    def __init__(self, body: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.body, self.shortcut = body, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _active(layer: nn.Module, task: int) -> torch.Tensor:
    return layer.masks[task].nonzero().flatten()


def _running_stats(bn: nn.modules.batchnorm._NormBase, task: int):
    """The running statistics ``bn`` normalises ``task`` with in eval: its row when it keeps per-task ones."""
    if getattr(bn, "task_stats", False):
        return bn.task_running_mean[task], bn.task_running_var[task], bn.task_num_batches_tracked[task]
    return bn.running_mean, bn.running_var, bn.num_batches_tracked


def _conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._NormBase, keep: torch.Tensor,
             inputs: torch.Tensor | None, fold_bn: bool, task: int) -> list[nn.Module]:
    """``conv → bn`` restricted to output channels ``keep`` and input channels ``inputs``
    (all when None): one conv with the BN (``task``'s statistics) folded in, or a sliced conv and BatchNorm2d."""
    if conv.groups != 1:
        raise TypeError("extract_subnetwork supports only convolutions with groups=1")
    weight = conv.weight[keep] if inputs is None else conv.weight[keep][:, inputs]
    bias = None if conv.bias is None else conv.bias[keep]
    factory = {"device": weight.device, "dtype": weight.dtype}
    dense = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, bias=fold_bn or bias is not None, padding_mode=conv.padding_mode, **factory)
    running_mean, running_var, num_batches = _running_stats(bn, task)
    if fold_bn:
        # In float64, so that folding adds no rounding error of its own.
        scale = bn.weight[keep].double() * torch.rsqrt(running_var[keep].double() + bn.eps)
        shift = bn.bias[keep].double() - running_mean[keep].double() * scale
        if bias is not None:
            shift = shift + bias.double() * scale
        dense.weight.copy_(weight.double() * scale.view(-1, 1, 1, 1))
        dense.bias.copy_(shift)
        return [dense]
    dense.weight.copy_(weight)
    if bias is not None:
        dense.bias.copy_(bias)
    norm = nn.BatchNorm2d(keep.numel(), bn.eps, bn.momentum, **factory)
    for target, source in ((norm.weight, bn.weight), (norm.bias, bn.bias), (norm.running_mean, running_mean),
                           (norm.running_var, running_var)):
        target.copy_(source[keep])
    norm.num_batches_tracked.copy_(num_batches)
    return [dense, norm]


def _identity(keep: torch.Tensor, inputs: torch.Tensor | None, channels: int) -> nn.Module:
    """The identity shortcut: output channels ``keep`` picked from a stream carrying ``inputs``."""
    if inputs is None:
        return ChannelSelect(keep, channels)
    if torch.equal(keep, inputs):
        return nn.Identity()
    position = torch.full((channels,), -1, dtype=torch.long, device=keep.device)
    position[inputs] = torch.arange(inputs.numel(), device=keep.device)
    return ChannelSelect(position[keep], inputs.numel())


def _bottleneck(block: Bottleneck, task: int, inputs: torch.Tensor | None, fold_bn: bool):
    hidden1, hidden2, keep = _active(block.bn1, task), _active(block.bn2, task), _active(block.output_router, task)
    body = nn.Sequential(*_conv_bn(block.conv1, block.bn1, hidden1, inputs, fold_bn, task), nn.ReLU(),
                         *_conv_bn(block.conv2, block.bn2, hidden2, hidden1, fold_bn, task), nn.ReLU(),
                         *_conv_bn(block.conv3, block.bn3, keep, hidden2, fold_bn, task))
    if block.downsample is None:
        shortcut = _identity(keep, inputs, block.conv1.in_channels)
    else:
        shortcut = nn.Sequential(*_conv_bn(block.downsample[0], block.downsample[1], keep, inputs, fold_bn, task))
    return Residual(body, shortcut), keep


def _trunk(modules: list[nn.Module], task: int, fold_bn: bool):
    """The dense trunk and the channels (of the full model's last layer) it outputs."""
    dense, active = [], None  # None: every channel of the input image
    modules = iter(modules)
    for module in modules:
        if isinstance(module, nn.Conv2d):
            bn = next(modules, None)
            if not isinstance(bn, ROUTED_BN):
                raise TypeError(f"expected a routed BatchNorm layer after {module}, got {type(bn).__name__}")
            keep = _active(bn, task)
            dense += [*_conv_bn(module, bn, keep, active, fold_bn, task), nn.ReLU()]
            active = keep
        elif isinstance(module, Bottleneck):
            block, active = _bottleneck(module, task, active, fold_bn)
            dense.append(block)
        elif isinstance(module, (nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
            dense.append(copy.deepcopy(module))
        elif not isinstance(module, nn.Identity):
            raise TypeError(f"extract_subnetwork cannot slice a {type(module).__name__}")
    return nn.Sequential(*dense), active


def extract_subnetwork(model: RoutedNet, task: int, *, fold_bn: bool = True) -> nn.Sequential:
    """Task ``task``'s subnetwork of a routed model as a dense, smaller ``nn.Sequential``
    (``trunk → flatten → head``, output ``[N]``), in eval mode.

    Every conv keeps only the input channels active in the previous routing layer and the
    output channels active in its own; its BatchNorm (running statistics: eval semantics) is
    folded into it (``fold_bn=True``) or sliced alongside; the ReLUs stay and the routing goes.
    The head is ``task``'s alone, its first Linear reading only the pooled features of the
    last layer's active channels (flatten order: channel-major, ``pool_size**2`` per channel).

    ResNet's residual stream is sliced exactly, nothing is kept dense: every bottleneck routes
    its output, so the stream entering a block carries only the previous block's active
    channels (the others are exactly 0). A dense block computes only its own router's active
    output channels (``conv3``/``bn3`` and the downsample sliced to them), and an identity
    shortcut picks those channels from the incoming ones, as a zero channel where the input
    does not carry one (``ChannelSelect``).

    The result equals the full model's eval-mode output for ``task`` up to float rounding.
    """
    if not isinstance(model, RoutedNet):
        raise TypeError(f"model must be a routed model (RoutedVGG, RoutedResNet), got {type(model).__name__}")
    if isinstance(task, torch.Tensor) and task.dim() == 0 and not task.is_floating_point():
        task = int(task)
    if isinstance(task, bool) or not isinstance(task, numbers.Integral):
        raise TypeError(f"task must be an int, got {task!r}")
    if not 0 <= task < model.num_tasks:
        raise IndexError(f"task {task} is out of range for {model.num_tasks} tasks")
    task = int(task)
    with torch.no_grad():
        trunk, active = _trunk(model.trunk(), task, fold_bn)
        area = model.pool_size ** 2
        features = (active.unsqueeze(1) * area + torch.arange(area, device=active.device)).flatten()
        head = model.heads.extract(task, features)
    return nn.Sequential(OrderedDict(trunk=trunk, flatten=nn.Flatten(), head=head)).eval()
