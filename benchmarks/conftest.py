"""pytest-benchmark suite of taskrouting: ``pytest benchmarks/ --benchmark-only``.

Cases come from ``taskrouting/benchmarking/cases.py`` (the ones ``taskrouting bench`` runs):
small by default; ``TASKROUTING_BENCH_PRESET=default`` (or ``full``) for full size,
``TASKROUTING_BENCH_DEVICE=cuda`` to pick the device (default: cuda if available).
For interleaved repeats, ratios and bandwidth use ``taskrouting bench`` instead.
"""
from __future__ import annotations

import fnmatch

import pytest
import torch


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (unless the ini's ``python_files`` already does)."""
    name = file_path.name
    if not (name.startswith("bench_") and name.endswith(".py")):
        return None
    if any(fnmatch.fnmatch(name, pattern) for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture
def time_step(benchmark):
    """``time_step(step, warmup, device, group, **info)``: warm up ``step``, then benchmark it
    (synchronizing the GPU after each call) with the step's facts in ``extra_info``."""
    def run(step, warmup: int, device: str, group: str, **info):
        for _ in range(warmup + 1):   # + 1: the first call may compile
            step.fn()
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        sync()

        def call():
            step.fn()
            sync()

        benchmark.group = group
        benchmark.extra_info.update(variant=step.variant, bytes_moved=step.bytes_moved,
                                    active_fraction=step.active_fraction, **info)
        benchmark(call)
    return run


def pytest_configure(config):
    """As ``taskrouting bench`` does on the CPU: keep freed memory in the process, so that the
    timings do not depend on which allocations glibc gave back to the OS (allocator.py)."""
    from taskrouting.benchmarking.allocator import keep_freed_memory
    from taskrouting.benchmarking.cases import settings_from_env
    if torch.device(settings_from_env().device).type == "cpu":
        keep_freed_memory()
