"""One SGD training step of a routed VGG-11 (``taskrouting.models.vgg11_bn``).

Variants: ``fused:<backend>`` (fused routed BatchNorms forced to one backend),
``fused:<backend>+task_stats`` / ``+memory_efficient`` (the same with per-task statistics, or with
fused outputs rebuilt in backward; for the first backend), ``reference``
(``fused=False``: BatchNorm2d → ReLU → route, unfused) and ``plain`` (the same network with
every routed BatchNorm replaced by ``BatchNorm2d → ReLU`` and every ``TaskRouter`` by
``Identity``: VGG-11 without routing, same heads). A step cycles to the next task (as in
training: one task per batch), then ``zero_grad → forward → BCE loss → backward → SGD step``.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BNReLURoute1d, BNReLURoute2d, BNReLURoute3d, TaskConditioned, TaskRouter, set_active_task
from ..nn.bn_relu_route import BATCH_NORMS
from ..ops.recompute import saved_tensors_meter
from .cases import ModelSettings
from .variants import Skip, Step, task_order

__all__ = ["model_variants", "base_variant", "strip_routing", "model_step", "load_vgg11_bn"]


OPTIONS = ("task_stats", "memory_efficient")  # model options a variant can add: fused:<backend>+<option>


def model_variants(backends: list[str]) -> list[str]:
    options = [f"fused:{b}+{o}" for b in backends[:1] for o in OPTIONS]
    return [f"fused:{b}" for b in backends] + options + ["reference", "plain"]


def base_variant(variant: str) -> str | None:
    """The variant a ``fused:<backend>+<option>`` one is compared with: the same without the option."""
    return variant.split("+", 1)[0] if "+" in variant else None


def load_vgg11_bn():
    """``taskrouting.models.vgg11_bn``, or :class:`Skip` saying why it is not there."""
    try:
        from ..models import vgg11_bn
    except ImportError as exc:
        raise Skip(f"whole-model case skipped: taskrouting.models.vgg11_bn is not available ({exc})") from None
    return vgg11_bn


_PLAIN_BATCHNORM = {BNReLURoute1d: nn.BatchNorm1d, BNReLURoute2d: nn.BatchNorm2d, BNReLURoute3d: nn.BatchNorm3d,
                    nn.BatchNorm1d: nn.BatchNorm1d, nn.BatchNorm2d: nn.BatchNorm2d, nn.BatchNorm3d: nn.BatchNorm3d}


def _is_routed_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, BATCH_NORMS) and isinstance(module, TaskConditioned)


def _plain_batchnorm(module: nn.modules.batchnorm._NormBase) -> nn.Module:
    for routed, plain in _PLAIN_BATCHNORM.items():
        if isinstance(module, routed):
            return plain(module.num_features, module.eps, module.momentum, module.affine,
                         module.track_running_stats)
    raise TypeError(f"no plain BatchNorm for {type(module).__name__}")


def strip_routing(model: nn.Module) -> nn.Module:
    """Remove the routing from a model, in place: each routed BatchNorm (which includes its
    ReLU: ``BNReLURoute*d``, ``ReferenceBNReLURoute2d``) becomes ``BatchNorm → ReLU`` and each
    ``TaskRouter`` an ``Identity``. Task heads are kept."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TaskRouter):
                setattr(parent, name, nn.Identity())
            elif _is_routed_batchnorm(child):
                setattr(parent, name, nn.Sequential(_plain_batchnorm(child), nn.ReLU()))
    return model


def _build(variant: str, settings: ModelSettings, seed: int) -> nn.Module:
    vgg11_bn = load_vgg11_bn()
    kwargs = dict(sharing_ratio=settings.sharing_ratio, seed=seed, width_mult=settings.width_mult,
                  pool_size=settings.pool_size)
    if variant.startswith("fused:"):
        backend, *options = variant.removeprefix("fused:").split("+")
        return vgg11_bn(settings.num_tasks, fused=True, backend=backend, task_stats="task_stats" in options,
                        memory_efficient="memory_efficient" in options, **kwargs)
    model = vgg11_bn(settings.num_tasks, fused=False, task_stats=False, **kwargs)
    return strip_routing(model) if variant == "plain" else model


def model_step(variant: str, settings: ModelSettings, device, seed: int = 0) -> Step:
    """A :class:`Step` running one training step of ``variant`` per call."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = _build(variant, settings, seed).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(settings.batch, 3, settings.resolution, settings.resolution, generator=g).to(device)
    targets = torch.randint(0, 2, (settings.batch,), generator=g).float().to(device)
    tasks = itertools.cycle(task_order(settings.num_tasks, seed))

    with saved_tensors_meter() as meter:  # what one forward keeps for backward
        F.binary_cross_entropy_with_logits(model(x, task=0), targets)

    def train_step():
        set_active_task(model, next(tasks))
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(x), targets)
        loss.backward()
        optimizer.step()
        return loss

    return Step(("model", variant), variant, train_step, bytes_moved=0, active_fraction=settings.sharing_ratio,
                compiles=variant.startswith("fused:triton"), module=model, saved_bytes=meter.saved_bytes)
