"""Runs the sweeps of :class:`~.cases.Settings` and turns the samples into result rows.

One group (the cases of a sweep that share a shape and dtype) at a time: build every step
(fused backends are first checked against the eager reference), time the first call
(compile time for ``compiled``), warm up, calibrate the calls per sample, then take the
repeats of all steps interleaved. Ratios between variants of a case, and between a case and
the sweep's baseline case, are medians of repeat-by-repeat ratios.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .allocator import keep_freed_memory
from .cases import Case, Settings, Sweep, build_sweeps, shape_label
from .environment import environment
from .model import base_variant, model_step, model_variants
from .timing import calibrate, first_call, interleaved, make_timer, paired_ratio, peak_memory, summarize
from .variants import (
    Inputs,
    Skip,
    Step,
    build_step,
    check_fused,
    dynamo_limits,
    fused_backends,
    rotation_sets,
    step_key,
    variant_names,
)

__all__ = ["COLUMNS", "RATIO_TO", "Measured", "Report", "validate", "run", "run_group", "run_model"]

RATIO_TO = ("reference", "compiled", "plain", "baseline")   # the vs_* columns

COLUMNS = ["sweep", "shape", "dtype", "mode", "stats", "num_tasks", "sharing_ratio", "active_fraction",
           "variant", "status", "reason", "median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms",
           "repeats", "inner", "bytes_moved", "gbps", "copy_gbps", "copy_fraction", "peak_mem_mib", "saved_mib",
           "compile_s", "baseline", "input_sets"]
COLUMNS += [f"vs_{name}{suffix}" for name in RATIO_TO for suffix in ("", "_q1", "_q3")]


@dataclass
class Measured:
    """A step and its samples (seconds per call), or why it was not timed."""
    step: Step | None
    status: str = "ok"            # "ok", "skipped" (does not apply) or "failed" (raised)
    reason: str = ""
    inner: int = 0
    compile_s: float | None = None
    samples: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Report:
    environment: dict
    settings: dict
    timer: str
    rows: list[dict]
    notes: list[str]

    @property
    def failed(self) -> list[dict]:
        return [row for row in self.rows if row["status"] == "failed"]


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _prepare(build: Callable[[], Step], check: Callable[[], None] | None, settings: Settings,
             timer) -> Measured:
    """Build, check, first call, warm up and calibrate one step."""
    try:
        if check is not None:
            check()
        step = build()
        first = first_call(step.fn, timer)
        for _ in range(settings.warmup):
            step.fn()
        timer.sync()
        inner = calibrate(step.fn, timer, settings.min_time, settings.max_inner)
    except Skip as exc:
        return Measured(None, "skipped", str(exc))
    except Exception as exc:  # noqa: BLE001  (reported in the results; the run goes on)
        return Measured(None, "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    return Measured(step, inner=inner, compile_s=first if step.compiles else None)


def _time_all(measured: dict[tuple, Measured], settings: Settings, timer, repeats: int) -> None:
    ready = {key: m for key, m in measured.items() if m.ok}
    samples = interleaved({k: m.step.fn for k, m in ready.items()}, {k: m.inner for k, m in ready.items()},
                          timer, repeats, settings.seed)
    for key, m in ready.items():
        m.samples = samples[key]
        m.peak_bytes = peak_memory(m.step.fn, settings.device)


def _timing_fields(m: Measured, copy: Measured | None) -> dict:
    """Time summary (ms), achieved bandwidth and its fraction of the copy's."""
    if not m.ok:
        return {}
    t = summarize(m.samples)
    ms = t.scaled(1e3)
    row = {"median_ms": ms.median, "q1_ms": ms.q1, "q3_ms": ms.q3, "min_ms": ms.min, "max_ms": ms.max,
           "repeats": t.n, "inner": m.inner, "active_fraction": m.step.active_fraction,
           "compile_s": m.compile_s,
           "peak_mem_mib": None if m.peak_bytes is None else m.peak_bytes / 1024 ** 2}
    if m.step.bytes_moved:
        row["bytes_moved"] = m.step.bytes_moved
        row["gbps"] = m.step.bytes_moved / t.median / 1e9
        if copy is not None and copy.ok:
            copy_gbps = copy.step.bytes_moved / summarize(copy.samples).median / 1e9
            row.update(copy_gbps=copy_gbps, copy_fraction=row["gbps"] / copy_gbps)
    return row


def _ratio_fields(name: str, m: Measured, other: Measured | None) -> dict:
    if other is None or other is m or not (m.ok and other.ok):
        return {}
    r = paired_ratio(m.samples, other.samples)
    return {f"vs_{name}": r.median, f"vs_{name}_q1": r.q1, f"vs_{name}_q3": r.q3}


def _case_fields(sweep: str, case: Case) -> dict:
    return {"sweep": sweep, "shape": shape_label(case.shape), "dtype": case.dtype, "mode": case.mode,
            "stats": case.stats, "num_tasks": case.num_tasks, "sharing_ratio": case.sharing_ratio}


def _case_row(sweep: Sweep, case: Case, variant: str, measured: dict[tuple, Measured]) -> dict:
    m = measured[step_key(variant, case)]
    row = {**_case_fields(sweep.name, case), "variant": variant, "status": m.status, "reason": m.reason}
    row.update(_timing_fields(m, measured.get(step_key("copy", case))))
    for other in ("reference", "compiled", "plain"):
        row.update(_ratio_fields(other, m, measured.get(step_key(other, case))))
    base = sweep.baseline_of(case)
    if base is not None and base != case:
        row["baseline"] = f"{sweep.axis}={sweep.baseline:g}"
        row.update(_ratio_fields("baseline", m, measured.get(step_key(variant, base))))
    return row


def _copy_row(sweep: Sweep, case: Case, m: Measured) -> dict:
    row = {**_case_fields(sweep.name, case), "mode": "-", "num_tasks": None, "sharing_ratio": None,
           "variant": "copy", "status": m.status, "reason": m.reason}
    row.update(_timing_fields(m, m))
    return row


def run_group(sweep: Sweep, cases: tuple[Case, ...], variants: list[str], settings: Settings,
              timer) -> list[dict]:
    """Measure every variant of ``cases`` (one shape and dtype), repeats interleaved."""
    torch._dynamo.reset()   # only this group's graphs in dynamo's cache
    device = torch.device(settings.device)
    shape, dtype = cases[0].shape, cases[0].torch_dtype
    sets = rotation_sets(shape, dtype, settings.rotation_bytes())
    inputs = Inputs.make(shape, dtype, device, settings.seed, sets)
    measured: dict[tuple, Measured] = {}
    for case in cases:
        for variant in variants:
            key = step_key(variant, case)
            if key in measured:
                continue
            check = None
            if variant.startswith("fused:"):
                check = (lambda v=variant, c=case: check_fused(v, c, device, inputs, settings.seed))
            measured[key] = _prepare(lambda v=variant, c=case: build_step(v, c, device, inputs, settings.seed),
                                     check, settings, timer)
    _time_all(measured, settings, timer, sweep.repeats(settings))
    rows = [_case_row(sweep, case, v, measured) for case in cases for v in variants if v != "copy"]
    if "copy" in variants:
        rows.append(_copy_row(sweep, cases[0], measured[step_key("copy", cases[0])]))
    for row in rows:
        row["input_sets"] = len(inputs.sets)
    return rows


def run_model(settings: Settings, backends: list[str], timer) -> list[dict]:
    """The whole-model rows of every model of ``settings.model.archs`` (a note row for one not available)."""
    return [row for arch in settings.model.archs for row in _run_one_model(settings, backends, timer, arch)]


def _run_one_model(settings: Settings, backends: list[str], timer, arch: str) -> list[dict]:
    ms = settings.model
    shape = f"{arch} {ms.batch}x3x{ms.resolution}x{ms.resolution}"
    measured = {v: _prepare(lambda v=v: model_step(v, ms, settings.device, settings.seed, arch), None, settings,
                            timer)
                for v in model_variants(backends, settings.compile, arch)}
    if all(m.status == "skipped" for m in measured.values()):
        first = next(iter(measured.values()))
        return [{"sweep": "model", "shape": shape, "variant": "-", "status": "skipped", "reason": first.reason}]
    _time_all(measured, settings, timer, settings.repeats)
    rows = []
    for variant, m in measured.items():
        row = {"sweep": "model", "shape": shape, "dtype": "float32",
               "mode": "train-step", "num_tasks": ms.num_tasks, "sharing_ratio": ms.sharing_ratio,
               "variant": variant, "status": m.status, "reason": m.reason,
               "saved_mib": None if m.step is None or m.step.saved_bytes is None else m.step.saved_bytes / 2 ** 20}
        row.update(_timing_fields(m, None))
        for other in ("reference", "compiled", "plain"):
            row.update(_ratio_fields(other, m, measured.get(other)))
        base = base_variant(variant)
        if base is not None:  # the cost of the per-task statistics: the same step without them
            row["baseline"] = base
            row.update(_ratio_fields("baseline", m, measured.get(base)))
        rows.append(row)
    return rows


def _settings_dict(settings: Settings) -> dict:
    return json_safe(dataclasses.asdict(settings))


def json_safe(value):
    """Tuples → lists and non-finite floats → None, recursively (for strict JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def validate(settings: Settings) -> None:
    """Raise ValueError for settings no run can use (unknown device or backend names)."""
    device = torch.device(settings.device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {settings.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch.cuda.is_available() is False")
    fused_backends(device, settings.backends)


def run(settings: Settings, log: Callable[[str], None] = _log_to_stderr) -> Report:
    """Run every sweep (and the model case) of ``settings``."""
    validate(settings)
    device = torch.device(settings.device)
    backends, notes = fused_backends(device, settings.backends)
    variants = variant_names(backends, settings.compile)
    if not settings.compile:
        notes.append("compiled skipped: torch.compile disabled (--no-compile)")
    malloc = "default"
    if device.type == "cpu" and settings.malloc == "keep":
        malloc = keep_freed_memory()
    torch.manual_seed(settings.seed)
    timer = make_timer(device)
    start = time.perf_counter()
    rows: list[dict] = []
    sweeps = build_sweeps(settings)
    with dynamo_limits():
        for sweep in sweeps:
            groups = sweep.groups()
            for i, cases in enumerate(groups, 1):
                log(f"[{time.perf_counter() - start:6.1f} s] {sweep.name} {i}/{len(groups)}: "
                    f"{shape_label(cases[0].shape)} {cases[0].dtype}, {len(cases)} case(s) x {len(variants)} variants")
                rows += run_group(sweep, cases, variants, settings, timer)
                gc.collect()
    if "model" in settings.sweeps and settings.model is not None:
        log(f"[{time.perf_counter() - start:6.1f} s] model: {settings.model.label}")
        rows += run_model(settings, backends, timer)
    notes += sorted({f"{r['variant']} {r['status']} ({r['sweep']} {r['shape']}): {r['reason']}"
                     for r in rows if r["status"] != "ok"})
    return Report({**environment(device), "host_malloc": malloc}, _settings_dict(settings), timer.name, rows,
                  notes)
