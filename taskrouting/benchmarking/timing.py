"""Timers, warm-up, interleaved repeats and their summaries.

A *sample* is the mean time of ``inner`` consecutive calls (``inner`` is calibrated after the
warm-up so that a sample lasts at least ``min_time``). Repeats are interleaved: repeat ``r``
takes one sample of every step of a group, in a freshly shuffled order, before repeat ``r + 1``
starts, so that drift (clock boost, other processes on the machine) hits every variant alike
and ratios can be taken repeat by repeat.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CPUTimer", "CUDATimer", "make_timer", "Summary", "summarize", "paired_ratio",
           "first_call", "calibrate", "interleaved", "peak_memory"]


class CPUTimer:
    """Wall clock (``time.perf_counter``) around ``inner`` calls; CPU ops are synchronous."""
    name = "perf_counter"

    def sync(self) -> None:
        pass

    def sample(self, fn: Callable[[], object], inner: int) -> float:
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start) / inner


class CUDATimer:
    """CUDA events around each call, with the L2 cache flushed (a 256 MB buffer zeroed) before
    it, like ``triton.testing.do_bench``: every call starts from cold cache, and the flush lets
    the host run ahead, so host launch overhead is hidden unless it exceeds the GPU work."""
    name = "cuda-events, L2 flushed before each call"

    def __init__(self, device: torch.device, flush_bytes: int = 256 * 1024 ** 2):
        self.device = device
        self.cache = torch.empty(flush_bytes, dtype=torch.int8, device=device)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def sample(self, fn: Callable[[], object], inner: int) -> float:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(inner)]
        for start, end in events:
            self.cache.zero_()
            start.record()
            fn()
            end.record()
        self.sync()
        return sum(start.elapsed_time(end) for start, end in events) / inner / 1e3


def make_timer(device) -> CPUTimer | CUDATimer:
    device = torch.device(device)
    return CUDATimer(device) if device.type == "cuda" else CPUTimer()


@dataclass(frozen=True)
class Summary:
    """Median and spread of samples: quartiles (the IQR is ``q3 - q1``) and range."""
    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    def scaled(self, factor: float) -> Summary:
        return Summary(self.median * factor, self.q1 * factor, self.q3 * factor,
                       self.min * factor, self.max * factor, self.n)


def summarize(samples: Sequence[float]) -> Summary:
    values = np.asarray(samples, dtype=float)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return Summary(float(median), float(q1), float(q3), float(values.min()), float(values.max()),
                   len(values))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Summary:
    """Summary of the repeat-by-repeat ratios of two interleaved series."""
    if len(numerator) != len(denominator):
        raise ValueError("paired ratios need series of the same length")
    return summarize([a / b for a, b in zip(numerator, denominator)])


def first_call(fn: Callable[[], object], timer) -> float:
    """Wall time of one synchronized call (for compiled steps: the compile time)."""
    timer.sync()
    start = time.perf_counter()
    fn()
    timer.sync()
    return time.perf_counter() - start


def calibrate(fn: Callable[[], object], timer, min_time: float, max_inner: int) -> int:
    """Calls per sample so that a sample lasts at least ``min_time`` (1 to ``max_inner``)."""
    once = timer.sample(fn, 1)
    if min_time <= 0 or once <= 0:
        return 1
    return max(1, min(max_inner, math.ceil(min_time / once)))


def interleaved(fns: dict[object, Callable[[], object]], inner: dict[object, int], timer,
                repeats: int, seed: int = 0) -> dict[object, list[float]]:
    """``repeats`` samples (seconds per call) of every function, interleaved and shuffled."""
    rng = random.Random(seed)
    keys = list(fns)
    samples: dict[object, list[float]] = {key: [] for key in keys}
    for _ in range(repeats):
        rng.shuffle(keys)
        for key in keys:
            samples[key].append(timer.sample(fns[key], inner[key]))
    return samples


def peak_memory(fn: Callable[[], object], device) -> int | None:
    """Extra device memory one call allocates at its peak (bytes); None off the GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
