"""One SGD training step of a routed model: VGG-11 (``taskrouting.models.vgg11_bn``) or ResNet-50
(``taskrouting.models.resnet50``, whose fused variants run each bottleneck's tail as ``bn_add_relu_route``).

Variants: ``fused:<backend>`` (fused routed BatchNorms forced to one backend),
``fused:<backend>+task_stats`` / ``+memory_efficient`` (the same with per-task statistics, or with
fused outputs rebuilt in backward; for the first backend), ``reference``
(``fused=False``: BatchNorm2d → ReLU → route, unfused), ``compiled`` (that reference under
``torch.compile``; its task is a per-sample LongTensor, as an int would recompile per task) and ``plain``
(the same network with every routed BatchNorm replaced by ``BatchNorm2d → ReLU`` and every ``TaskRouter``
by ``Identity``: the model without routing, same heads). A step cycles to the next task (as in
training: one task per batch), then ``zero_grad → forward → BCE loss → backward → SGD step``.
"""
from __future__ import annotations

import importlib
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BNReLURoute1d, BNReLURoute2d, BNReLURoute3d, TaskConditioned, TaskRouter, set_active_task
from ..nn.bn_relu_route import BATCH_NORMS
from ..ops.recompute import saved_tensors_meter
from .cases import ModelSettings
from .variants import Skip, Step, task_order

__all__ = ["model_variants", "base_variant", "strip_routing", "model_step", "load_model"]


OPTIONS = ("task_stats", "memory_efficient")  # model options a variant can add: fused:<backend>+<option>
# ResNet-50 also without its fused tail (each bottleneck's BatchNorm2d, add, ReLU, TaskRouter unfused)
ARCH_OPTIONS = {"resnet50": ("unfused_tail",)}


def model_variants(backends: list[str], compile: bool = False, arch: str = "vgg11_bn") -> list[str]:
    compiled_kernels = [b for b in backends if b != "reference"]  # options are timed on the first of these
    options = [f"fused:{b}+{o}" for b in (compiled_kernels or backends)[:1]
               for o in OPTIONS + ARCH_OPTIONS.get(arch, ())]
    return [f"fused:{b}" for b in backends] + options + ["reference"] + (["compiled"] if compile else []) + ["plain"]


def base_variant(variant: str) -> str | None:
    """The variant a ``fused:<backend>+<option>`` one is compared with: the same without the option."""
    return variant.split("+", 1)[0] if "+" in variant else None


def load_model(arch: str):
    """The builder ``taskrouting.models.<arch>``, or :class:`Skip` saying why it is not there."""
    try:
        return getattr(importlib.import_module("..models", __package__), arch)
    except (ImportError, AttributeError) as exc:
        raise Skip(f"whole-model case skipped: taskrouting.models.{arch} is not available ({exc})") from None



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


def _build(variant: str, settings: ModelSettings, seed: int, arch: str) -> nn.Module:
    build = load_model(arch)
    kwargs = dict(sharing_ratio=settings.sharing_ratio, seed=seed, width_mult=settings.width_mult,
                  pool_size=settings.pool_size)
    if variant.startswith("fused:"):
        backend, *options = variant.removeprefix("fused:").split("+")
        if "unfused_tail" in options:
            kwargs["fused_tail"] = False
        return build(settings.num_tasks, fused=True, backend=backend, task_stats="task_stats" in options,
                     memory_efficient="memory_efficient" in options, **kwargs)
    # Without task_stats a ResNet's unrouted BatchNorms are plain nn.BatchNorm2d, which strip_routing keeps.
    model = build(settings.num_tasks, fused=False, task_stats=False, **kwargs)
    return strip_routing(model) if variant == "plain" else model  # "compiled": compiled in model_step


def model_step(variant: str, settings: ModelSettings, device, seed: int = 0, arch: str = "vgg11_bn") -> Step:
    """A :class:`Step` running one training step of ``variant`` of model ``arch`` per call."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = _build(variant, settings, seed, arch).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(settings.batch, 3, settings.resolution, settings.resolution, generator=g).to(device)
    targets = torch.randint(0, 2, (settings.batch,), generator=g).float().to(device)
    tasks = itertools.cycle(task_order(settings.num_tasks, seed))
    compiled = variant == "compiled"
    forward = torch.compile(model) if compiled else model

    def task_of(t: int):
        return torch.full((settings.batch,), t, dtype=torch.long, device=device) if compiled else t

    saved = None
    if not compiled:  # what one eager forward keeps for backward (a compiled graph keeps its own choice)
        with saved_tensors_meter() as meter:
            F.binary_cross_entropy_with_logits(model(x, task=0), targets)
        saved = meter.saved_bytes

    def train_step():
        set_active_task(model, task_of(next(tasks)))
        optimizer.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(forward(x), targets)
        loss.backward()
        optimizer.step()
        return loss

    return Step(("model", arch, variant), variant, train_step, bytes_moved=0, active_fraction=settings.sharing_ratio,
                compiles=compiled or variant.startswith("fused:triton"), module=model, saved_bytes=saved)
