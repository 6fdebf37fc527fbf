"""The implementations compared, each built as a ready-to-time :class:`Step`.

Variants (``VARIANTS``):

* ``fused:<backend>``  ``BNReLURoute*d`` (``ops.bn_relu_route``) forced to one backend;
* ``reference``        ``nn.BatchNorm*d → nn.ReLU → TaskRouter``, eager (batch statistics even
                       when the fused op runs with ``stats="routed"``);
* ``compiled``         that reference under ``torch.compile(dynamic=False, fullgraph=True)``;
* ``plain``            ``nn.BatchNorm*d → nn.ReLU`` with no routing;
* ``copy``             ``y.copy_(x)`` on the same tensor: the bandwidth yardstick.

Every call of a step runs the next task of a fixed random permutation of all tasks (as in
training, one task per batch), so selecting the task's mask is part of what is timed. Eager
variants get the task as a Python int. ``compiled`` gets it as a per-sample LongTensor ``[N]``
(every entry the same task): a Python int would make dynamo recompile for every task, and a
0-d tensor task does not compile (``masks[task]`` in ``select_route`` needs ``.item()``, which
inductor rejects as of torch 2.13, so dynamo falls back to eager). Every call also takes the next
input set of the group's rotation (:class:`Inputs`). Forward-only steps run under
``torch.no_grad()``; forward+backward steps call ``torch.autograd.grad`` for ``x`` and the
BatchNorm parameters (nothing accumulates into ``.grad``).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..nn import BNReLURoute1d, BNReLURoute2d, BNReLURoute3d, TaskRouter, make_masks
from .cases import Case, Shape
from .traffic import copy_bytes, op_bytes

__all__ = ["VARIANTS", "Skip", "InputSet", "Inputs", "rotation_sets", "Step", "ReferenceBlock", "PlainBlock",
           "variant_names", "fused_backends", "build_step", "step_key", "case_masks", "task_order", "check_fused",
           "dynamo_limits"]

VARIANTS = {
    "fused:<backend>": "BNReLURoute*d (ops.bn_relu_route) forced to one backend",
    "reference": "nn.BatchNorm*d -> nn.ReLU -> TaskRouter, eager",
    "compiled": "the reference under torch.compile(dynamic=False, fullgraph=True)",
    "plain": "nn.BatchNorm*d -> nn.ReLU, no routing",
    "copy": "y.copy_(x) of the same tensor (bandwidth yardstick)",
}

_BATCHNORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_FUSED = {2: BNReLURoute1d, 3: BNReLURoute1d, 4: BNReLURoute2d, 5: BNReLURoute3d}


class Skip(Exception):
    """A variant that does not apply to a case (not a failure): the message says why."""


class ReferenceBlock(nn.Module):
    """The unfused reference: ``TaskRouter(ReLU(BatchNorm(x)))``."""

    def __init__(self, num_channels: int, rank: int, masks: torch.Tensor):
        super().__init__()
        self.bn = _BATCHNORM[rank](num_channels)
        self.relu = nn.ReLU()
        self.router = TaskRouter(num_channels, masks=masks)

    def forward(self, x: torch.Tensor, task) -> torch.Tensor:
        return self.router(self.relu(self.bn(x)), task)


class PlainBlock(nn.Module):
    """``ReLU(BatchNorm(x))``: what the layer costs without routing (``task`` is ignored)."""

    def __init__(self, num_channels: int, rank: int):
        super().__init__()
        self.bn = _BATCHNORM[rank](num_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, task=None) -> torch.Tensor:
        return self.relu(self.bn(x))


@dataclass
class InputSet:
    """``x`` (and a view of it that requires grad), the incoming gradient, the copy's destination."""
    x: torch.Tensor
    x_grad: torch.Tensor
    grad_y: torch.Tensor
    out: torch.Tensor


@dataclass
class Inputs:
    """The tensors one ``(shape, dtype)`` group shares, in ``sets`` copies (same values, own
    memory) that consecutive calls rotate through: with enough of them no call finds its input
    still in cache from the call before, as in training, where every step brings new
    activations. ``x``, ``grad_y``, ... are the first set's."""
    sets: list[InputSet]

    @classmethod
    def make(cls, shape: Shape, dtype: torch.dtype, device, seed: int = 0, sets: int = 1) -> Inputs:
        g = torch.Generator(device).manual_seed(seed)
        x = (torch.randn(shape, generator=g, device=device) * 1.5 + 0.3).to(dtype)
        grad_y = torch.randn(shape, generator=g, device=device).to(dtype)
        copies = [(x, grad_y)] + [(x.clone(), grad_y.clone()) for _ in range(sets - 1)]
        return cls([InputSet(a, a.detach().requires_grad_(True), b, torch.empty_like(a)) for a, b in copies])

    @property
    def x(self) -> torch.Tensor:
        return self.sets[0].x

    @property
    def grad_y(self) -> torch.Tensor:
        return self.sets[0].grad_y

    def rotation(self):
        """An endless iterator over the sets, in order."""
        return itertools.cycle(self.sets)


def rotation_sets(shape: Shape, dtype: torch.dtype, cache_bytes: int, max_bytes: int = 2 * 1024 ** 3) -> int:
    """Input sets so that one rotation (x, grad_y and the copy's destination of each set, plus
    the outputs each call writes) exceeds ``cache_bytes``; at most ``max_bytes`` in all, 1 to 32."""
    per_set = 4 * math.prod(shape) * dtype.itemsize   # x, grad_y, out + the call's own output
    wanted = math.ceil(cache_bytes / per_set) + 1 if cache_bytes > 0 else 1
    return max(1, min(32, wanted, max_bytes // per_set))


@dataclass
class Step:
    """One variant of one case, ready to time: each ``fn()`` call runs the op once."""
    key: tuple
    variant: str
    fn: Callable[[], object]
    bytes_moved: int
    active_fraction: float
    compiles: bool = False   # the first call compiles (torch.compile, Triton JIT): its time is reported
    module: nn.Module | None = None   # the module the step runs (before torch.compile)
    saved_bytes: int | None = None   # activations one forward keeps for backward (whole-model steps)


def variant_names(backends: list[str], compile: bool = True) -> list[str]:
    names = [f"fused:{b}" for b in backends] + ["reference"]
    return names + (["compiled"] if compile else []) + ["plain", "copy"]


def fused_backends(device, requested=None) -> tuple[list[str], list[str]]:
    """The fused backends to time on ``device`` and notes on those left out.

    Triton on a CPU device only runs in its interpreter: never timed."""
    device = torch.device(device)
    available = ops.available_backends(device)
    notes, chosen = [], []
    for name in (requested or available):
        if name not in ops.BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose from {sorted(ops.BACKENDS)}")
        if name == "triton" and device.type == "cpu":
            notes.append("fused:triton skipped: on the CPU Triton runs in its interpreter "
                         "(TRITON_INTERPRET=1), which is not benchmarked")
        elif name not in available:
            notes.append(f"fused:{name} skipped: {ops.BACKENDS[name].why_not(device)}")
        else:
            chosen.append(name)
    return chosen, notes


def step_key(variant: str, case: Case) -> tuple:
    """Steps with equal keys are the same measurement: ``plain`` does not depend on the
    routing and ``copy`` only on the tensor."""
    if variant == "copy":
        return ("copy", case.shape, case.dtype)
    if variant == "plain":
        return ("plain", case.shape, case.dtype, case.mode)
    return (variant, case)


def case_masks(case: Case, seed: int = 0) -> torch.Tensor:
    """The case's masks, drawn on the CPU from ``seed`` (the same for every variant)."""
    try:
        return make_masks(case.num_tasks, case.channels, case.sharing_ratio,
                          generator=torch.Generator().manual_seed(seed))
    except ValueError as exc:
        raise Skip(f"no masks for this case: {exc}") from None


def task_order(num_tasks: int, seed: int = 0) -> list[int]:
    """The order in which calls cycle through the tasks: a fixed random permutation."""
    return torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed)).tolist()


def _block(variant: str, case: Case, masks: torch.Tensor) -> nn.Module:
    rank, channels = len(case.shape), case.channels
    if variant == "plain":
        return PlainBlock(channels, rank)
    if variant in ("reference", "compiled"):
        return ReferenceBlock(channels, rank, masks)
    backend = variant.removeprefix("fused:")
    return _FUSED[rank](channels, masks=masks, stats=case.stats, backend=backend)


def _tasks_for(variant: str, case: Case, device, seed: int) -> list:
    order = task_order(case.num_tasks, seed)
    if variant != "compiled":
        return order
    batch = case.shape[0]
    table = torch.tensor(order, dtype=torch.long).repeat_interleave(batch).view(len(order), batch)
    return list(table.to(device).unbind(0))


def _module_fn(block: nn.Module, params: list[torch.Tensor], case: Case, inputs: Inputs,
               tasks: list) -> Callable[[], object]:
    cycle, sets = itertools.cycle(tasks), inputs.rotation()
    if not case.backward:
        def forward():
            with torch.no_grad():
                return block(next(sets).x, next(cycle))
        return forward

    def forward_backward():
        s = next(sets)
        y = block(s.x_grad, next(cycle))
        return torch.autograd.grad(y, (s.x_grad, *params), s.grad_y)
    return forward_backward


def _check_variant(variant: str, case: Case, device: torch.device) -> None:
    if variant.startswith("fused:"):
        backend = variant.removeprefix("fused:")
        chosen, notes = fused_backends(device, [backend])
        if not chosen:
            raise Skip(notes[0])
    elif variant not in ("reference", "compiled", "plain", "copy"):
        raise ValueError(f"unknown variant {variant!r}")


def build_step(variant: str, case: Case, device, inputs: Inputs | None = None, seed: int = 0) -> Step:
    """The :class:`Step` of ``variant`` for ``case`` (raises :class:`Skip` if it does not apply)."""
    device = torch.device(device)
    _check_variant(variant, case, device)
    inputs = inputs or Inputs.make(case.shape, case.torch_dtype, device, seed)
    key = step_key(variant, case)
    if variant == "copy":
        sets = inputs.rotation()

        def copy():
            s = next(sets)
            return s.out.copy_(s.x)
        return Step(key, variant, copy,
                    copy_bytes(case.shape, case.torch_dtype.itemsize), 1.0)
    masks = case_masks(case, seed)
    active = 1.0 if variant == "plain" else float(masks.sum(1).double().mean()) / case.channels
    block = _block(variant, case, masks).to(device).train(case.training)
    params = [p for p in block.parameters() if p.requires_grad]
    runner = torch.compile(block, dynamic=False, fullgraph=True) if variant == "compiled" else block
    fn = _module_fn(runner, params, case, inputs, _tasks_for(variant, case, device, seed))
    return Step(key, variant, fn, op_bytes(case, active), active,
                compiles=variant in ("compiled", "fused:triton"), module=block)


def check_fused(variant: str, case: Case, device, inputs: Inputs, seed: int = 0) -> None:
    """One forward of a fused backend against the eager reference (fresh modules, same masks
    and task): a backend that gives wrong outputs is not worth timing. With ``stats="routed"``
    (which nn.BatchNorm cannot do) the op's own pure-PyTorch path is the reference."""
    device = torch.device(device)
    masks = case_masks(case, seed)
    task = task_order(case.num_tasks, seed)[0]
    truth = "reference" if case.stats == "batch" else "fused:reference"
    with torch.no_grad():
        expected = _block(truth, case, masks).to(device).train(case.training)(inputs.x, task)
        actual = _block(variant, case, masks).to(device).train(case.training)(inputs.x, task)
    tol = 1e-4 if case.torch_dtype == torch.float32 else 3e-2
    if not torch.allclose(actual.float(), expected.float(), rtol=tol, atol=tol):
        err = (actual.float() - expected.float()).abs().max().item()
        raise AssertionError(f"{variant} output differs from the reference (max abs error {err:.3g})")


@contextlib.contextmanager
def dynamo_limits(limit: int = 1024):
    """Raise dynamo's recompile limits: a group compiles one graph per mode and shape."""
    config = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(config, n)]
    with config.patch(**{n: max(limit, getattr(config, n)) for n in names}):
        yield
