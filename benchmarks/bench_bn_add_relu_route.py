"""``bn_add_relu_route`` (a ResNet bottleneck's tail) against the unfused tail ``TaskRouter(ReLU(BatchNorm2d(x) + r))``
(eager and under ``torch.compile``), the same without routing (``ReLU(BatchNorm2d(x) + r)``) and a copy.

Run as a script for interleaved repeats, medians and ratios measured side by side (the device is named in the
output)::

    python benchmarks/bench_bn_add_relu_route.py --device cuda --shapes 32x1024x14x14,32x256x56x56

or under pytest-benchmark (``pytest benchmarks/bench_bn_add_relu_route.py --benchmark-only``).

Bytes the op must move (units of one activation tensor E, a = fraction of channels the task uses):
forward, training, running stats tracked: every channel read for the statistics, x and the residual of the used
channels read again, y written: ``(2 + 2a) E``. Backward, training (two passes): the first reads grad_y, y (the
gate) and x of the used channels for the per-channel sums and writes grad_residual (the gated gradient), the
second reads that and x again and writes grad_x: ``(5a + 2) E``. The unfused variants are held to the same count.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import sys

import pytest
import torch
from torch import nn

from taskrouting import BNAddReLURoute2d, TaskRouter, make_masks
from taskrouting.benchmarking.environment import environment
from taskrouting.benchmarking.timing import calibrate, first_call, interleaved, make_timer, paired_ratio, summarize
from taskrouting.benchmarking.variants import fused_backends, task_order

MODES = ("train-fwd", "train-fwdbwd")
DEFAULT_SHAPES = {"cpu": ((8, 256, 28, 28), (8, 1024, 7, 7)),
                  "cuda": ((32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7))}


def must_move(shape, itemsize: int, active: float, backward: bool) -> int:
    """Bytes of the module docstring's traffic model."""
    units = 2 + 2 * active + ((5 * active + 2) if backward else 0)
    numel = 1
    for s in shape:
        numel *= s
    return round(units * numel * itemsize)


class UnfusedTail(nn.Module):
    """``TaskRouter(ReLU(BatchNorm2d(x) + residual))``, or without the router (``routed=False``)."""

    def __init__(self, channels: int, masks: torch.Tensor, routed: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.router = TaskRouter(channels, masks=masks) if routed else None

    def forward(self, x, residual, task):
        y = torch.relu(self.bn(x) + residual)
        return y if self.router is None else self.router(y, task)


def _variants(channels: int, masks: torch.Tensor, device, backends, compile_reference: bool) -> dict:
    modules = {f"fused:{b}": BNAddReLURoute2d(channels, masks=masks, backend=b) for b in backends}
    modules["reference"] = UnfusedTail(channels, masks)
    if compile_reference:
        modules["compiled"] = torch.compile(UnfusedTail(channels, masks).to(device), fullgraph=True, dynamic=False)
    modules["plain"] = UnfusedTail(channels, masks, routed=False)
    return {name: m.to(device).train() for name, m in modules.items()}


def _step(module, x, r, grad, tasks, backward: bool, per_sample: bool):
    n = x.shape[0]

    def call():
        task = next(tasks)
        if per_sample:  # a Python int task would recompile the compiled reference for every task
            task = torch.full((n,), task, dtype=torch.long, device=x.device)
        if not backward:
            with torch.no_grad():
                return module(x, r, task)
        leaves = [x, r] + [p for p in module.parameters()]
        return torch.autograd.grad(module(x, r, task), leaves, grad)
    return call


def measure(shape, device, dtype=torch.float32, num_tasks=100, sharing_ratio=0.5, repeats=10, min_time=0.02,
            compile_reference=None, seed=0):
    """Rows (one per variant and mode) of interleaved medians, ratios and bandwidth for one shape."""
    device = torch.device(device)
    compile_reference = device.type == "cuda" if compile_reference is None else compile_reference
    backends, notes = fused_backends(device)
    g = torch.Generator().manual_seed(seed)
    masks = make_masks(num_tasks, shape[1], sharing_ratio, generator=g)
    active = float(masks[0].float().mean())
    x = (torch.randn(shape, generator=g) * 1.5 + 0.3).to(device, dtype).requires_grad_(True)
    r = torch.randn(shape, generator=g).to(device, dtype).requires_grad_(True)
    grad = torch.randn(shape, generator=g).to(device, dtype)
    out = torch.empty_like(x)
    timer = make_timer(device)
    device_label = device_name(device)  # environment() runs git and reads /proc: once, not per row
    rows = []
    for mode in MODES:
        backward = mode.endswith("fwdbwd")
        modules = _variants(shape[1], masks, device, backends, compile_reference)
        fns = {name: _step(m, x, r, grad, itertools.cycle(task_order(num_tasks, seed)), backward,
                           name == "compiled")
               for name, m in modules.items()}
        fns["copy"] = lambda: out.copy_(x.detach())
        compile_s = {name: first_call(fn, timer) for name, fn in fns.items()}
        inner = {name: calibrate(fn, timer, min_time, 1000) for name, fn in fns.items()}
        samples = interleaved(fns, inner, timer, repeats, seed)
        copy_gbps = 2 * x.numel() * x.element_size() / summarize(samples["copy"]).median / 1e9
        moved = must_move(shape, x.element_size(), active, backward)
        for name in modules:
            s = summarize(samples[name])
            row = {"device": device_label, "shape": "x".join(map(str, shape)),
                   "dtype": str(dtype).removeprefix("torch."), "mode": mode, "variant": name,
                   "median_ms": s.median * 1e3, "q1_ms": s.q1 * 1e3, "q3_ms": s.q3 * 1e3,
                   "gbps": moved / s.median / 1e9, "copy_fraction": moved / s.median / 1e9 / copy_gbps,
                   "first_call_s": compile_s[name]}
            for other in ("reference", "compiled", "plain"):
                if other in samples:
                    row[f"vs_{other}"] = paired_ratio(samples[name], samples[other]).median
            rows.append(row)
    return rows, notes


def device_name(device: torch.device) -> str:
    env = environment(device)
    return env["gpu"] if device.type == "cuda" else f"{env['cpu']} ({env['threads']} threads)"


def format_rows(rows) -> str:
    lines = [f"{'shape':<16} {'mode':<13} {'variant':<16} {'median ms':>10} {'GB/s':>8} {'%copy':>6} "
             f"{'xref':>6} {'xcomp':>6} {'xplain':>6}"]
    for row in rows:
        ratios = [f"{row[key]:.3f}" if key in row else "-" for key in ("vs_reference", "vs_compiled", "vs_plain")]
        lines.append(f"{row['shape']:<16} {row['mode']:<13} {row['variant']:<16} {row['median_ms']:>10.4g} "
                     f"{row['gbps']:>8.3g} {100 * row['copy_fraction']:>6.0f} "
                     + " ".join(f"{r:>6}" for r in ratios))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", help="comma list of NxCxHxW (default: ResNet-50 tails for the device)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--num-tasks", type=int, default=100)
    p.add_argument("--sharing-ratio", type=float, default=0.5)
    p.add_argument("--compile", dest="compile_reference", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the compiled reference (default: on cuda)")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes \
            else DEFAULT_SHAPES[device.type]
        if any(len(s) != 4 for s in shapes):
            raise ValueError("shapes are NxCxHxW")
    except ValueError as exc:
        print(f"bench_bn_add_relu_route: error: --shapes: {exc}", file=sys.stderr)
        return 2
    print(f"device: {device_name(device)}; torch {torch.__version__}; T={args.num_tasks} "
          f"sigma={args.sharing_ratio}; medians of {args.repeats} interleaved repeats; ratios repeat by repeat")
    all_rows = []
    for shape in shapes:
        rows, notes = measure(shape, device, getattr(torch, args.dtype), args.num_tasks, args.sharing_ratio,
                              args.repeats, compile_reference=args.compile_reference)
        all_rows += rows
    for note in notes:
        print(note)
    print(format_rows(all_rows))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for row in all_rows for k in row}))
            writer.writeheader()
            writer.writerows(all_rows)
    return 0


@pytest.mark.parametrize("mode", MODES)
def test_bn_add_relu_route(time_step, mode):
    """pytest-benchmark: the fused tail on the first available backend, one ResNet-50 shape."""
    from taskrouting.benchmarking.cases import settings_from_env
    from taskrouting.benchmarking.variants import Step

    device = settings_from_env().device
    backends, _ = fused_backends(device)
    if not backends:
        pytest.skip("no fused backend for this device")
    shape = DEFAULT_SHAPES[torch.device(device).type][-1]
    masks = make_masks(100, shape[1], 0.5, generator=torch.Generator().manual_seed(0))
    module = BNAddReLURoute2d(shape[1], masks=masks, backend=backends[0]).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    r = torch.randn(shape, device=device, requires_grad=True)
    fn = _step(module, x, r, torch.randn(shape, device=device), itertools.cycle(task_order(100)),
               mode.endswith("fwdbwd"), False)
    step = Step(("bn_add_relu_route", shape, mode), f"fused:{backends[0]}", fn,
                must_move(shape, 4, float(masks[0].float().mean()), mode.endswith("fwdbwd")), 0.5)
    time_step(step, 2, device, group=f"bn_add_relu_route {'x'.join(map(str, shape))} {mode}")


if __name__ == "__main__":
    sys.exit(main())
