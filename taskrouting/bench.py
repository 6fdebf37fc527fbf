"""``taskrouting bench``: time the fused BatchNorm + ReLU + route op against the unfused reference.

Compares, side by side in one run with interleaved repeats, every fused backend available on
the device with the eager reference (BatchNorm → ReLU → TaskRouter), ``torch.compile`` of it,
plain BatchNorm → ReLU and a copy of the tensor, over the activations of a routed VGG-11,
the number of tasks and the sharing ratio; plus one training step of a routed VGG-11.
Prints a table and writes ``table.txt``, ``results.csv``, ``results.json``, ``tasks.png`` and
``sharing_ratio.png`` into ``--out``. Case definitions: ``taskrouting/benchmarking/cases.py``.

    python -m taskrouting.bench                 # default preset for the device (CPU: a few minutes)
    python -m taskrouting.bench --quick         # a few tiny cases: checks the harness, not speed
    python -m taskrouting.bench --shapes 16x128x56x56 --tasks 1,100,4096 --sweeps tasks
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from .benchmarking.cases import (
    MODEL_ARCHS,
    MODES,
    PRESETS,
    SWEEPS,
    build_sweeps,
    default_device,
    parse_dtype,
    parse_shapes,
    preset,
)
from .benchmarking.report import format_table, write_all
from .benchmarking.runner import run, validate
from .benchmarking.variants import fused_backends, variant_names

__all__ = ["build_parser", "settings_from_args", "describe", "main"]


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = getattr(kind, "__name__", "list")
    return parse


def _choices(allowed):
    def parse(text: str):
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        return values
    return parse


def _shapes(text: str):
    try:
        return parse_shapes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="taskrouting bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few tiny cases (CI smoke run of the harness, not speed)")
    p.add_argument("--preset", choices=PRESETS, help="quick, default (the default) or full")
    p.add_argument("--device", help=f"cpu, cuda or cuda:N (default: {default_device()})")
    p.add_argument("--dtype", type=_csv(parse_dtype), help="comma list: float32/fp32, bfloat16/bf16, float16/fp16")
    p.add_argument("--shapes", type=_shapes,
                   help="comma list of NxCxHxW shapes or vgg11:RESOLUTION:BATCH; used by every sweep")
    p.add_argument("--tasks", type=_csv(int),
                   help="numbers of tasks of the tasks sweep (default 1,10,100,312,1000,4096)")
    p.add_argument("--sharing-ratios", type=_csv(float),
                   help="sigmas of the sharing_ratio sweep (default 0.2,0.4,0.5,0.6,1.0)")
    p.add_argument("--num-tasks", type=int, help="T of the shapes and sharing_ratio sweeps (default 100)")
    p.add_argument("--sharing-ratio", type=float, help="sigma of the shapes and tasks sweeps (default 0.5)")
    p.add_argument("--modes", type=_choices(MODES), help=f"modes of every sweep, comma list of {', '.join(MODES)}")
    p.add_argument("--sweeps", type=_choices(SWEEPS), help=f"comma list of {', '.join(SWEEPS)} (default all)")
    p.add_argument("--backends", type=_csv(str), help="fused backends to time (default: every one available)")
    p.add_argument("--stats", choices=("batch", "routed"), help="statistics of the fused op (default batch)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd reference")
    p.add_argument("--no-model", action="store_true", help="leave out the whole-model (VGG-11, ResNet-50) steps")
    p.add_argument("--model-archs", type=_choices(MODEL_ARCHS),
                   help=f"models of the whole-model step, comma list of {', '.join(MODEL_ARCHS)} (default all)")
    p.add_argument("--repeats", type=int, help="interleaved repeats per step")
    p.add_argument("--sweep-repeats", type=int,
                   help="repeats of the tasks and sharing_ratio sweeps (default 3 x --repeats)")
    p.add_argument("--warmup", type=int, help="warm-up calls per step (after the first, compiling call)")
    p.add_argument("--min-time", type=float,
                   help="seconds each sample lasts at least (calls per sample are calibrated)")
    p.add_argument("--malloc", choices=("keep", "default"),
                   help="CPU: keep freed memory in the process (the default: no first-touch page faults "
                        "in the timings; see taskrouting/benchmarking/allocator.py) or leave glibc's default")
    p.add_argument("--rotate-mib", type=float,
                   help="inputs rotate through copies totalling more than this (MiB) so that calls start "
                        "cold (default: the last-level cache on CPU, 0 on GPU, where L2 is flushed instead)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before the run")
    p.add_argument("--seed", type=int, help="seed of inputs, masks and task order (default 0)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results/)")
    p.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    p.add_argument("--list", action="store_true", help="print the cases and variants that would run, and exit")
    return p


def describe(settings) -> str:
    """The plan of a run: settings, then every case of every sweep."""
    backends, notes = fused_backends(settings.device, settings.backends)
    variants = variant_names(backends, settings.compile)
    lines = [f"preset {settings.preset} on {settings.device}: variants {', '.join(variants)}", *notes]
    for sweep in build_sweeps(settings):
        lines.append(f"{sweep.name} ({len(sweep.cases)} cases, {len(sweep.groups())} groups):")
        lines += [f"  {case.label}" for case in sweep.cases]
    if "model" in settings.sweeps and settings.model is not None:
        lines.append(f"model: {settings.model.label}")
    return "\n".join(lines)


def settings_from_args(args: argparse.Namespace):
    """The preset for the device, overridden by the flags that were given."""
    name = "quick" if args.quick else (args.preset or "default")
    settings = preset(name, args.device or default_device())
    overrides = {
        "dtypes": args.dtype, "tasks": args.tasks, "sharing_ratios": args.sharing_ratios,
        "num_tasks": args.num_tasks, "sharing_ratio": args.sharing_ratio, "stats": args.stats,
        "sweeps": args.sweeps, "backends": args.backends, "repeats": args.repeats,
        "sweep_repeats": args.sweep_repeats,
        "warmup": args.warmup, "min_time": args.min_time, "seed": args.seed, "malloc": args.malloc,
        "rotate_bytes": None if args.rotate_mib is None else int(args.rotate_mib * 1024 ** 2),
        "shapes": args.shapes, "sweep_shapes": args.shapes, "modes": args.modes, "sweep_modes": args.modes,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.no_compile:
        overrides["compile"] = False
    if args.model_archs and settings.model is not None:
        overrides["model"] = dataclasses.replace(settings.model, archs=tuple(args.model_archs))
    if args.no_model:
        overrides["sweeps"] = tuple(s for s in overrides.get("sweeps", settings.sweeps) if s != "model")
    return dataclasses.replace(settings, **overrides)


def main(argv=None) -> int:
    """Run the benchmark; 0 if every step that applied ran, 1 if one failed, 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        if args.list:   # no device needed: plan a GPU run from a CPU machine
            print(describe(settings))
            return 0
        validate(settings)
    except (ValueError, RuntimeError) as exc:
        parser.print_usage(sys.stderr)
        print(f"taskrouting bench: error: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = run(settings)
    print(format_table(report))
    paths = write_all(report, args.out, plots=not args.no_plots)
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    if report.failed:
        print(f"{len(report.failed)} step(s) failed: see the notes above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
