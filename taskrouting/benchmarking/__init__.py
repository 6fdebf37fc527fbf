"""Benchmark harness of the fused BatchNorm + ReLU + route op (``taskrouting bench``).

Modules:

* ``cases``       what is measured: cases, sweeps, presets (shared by the CLI and the
                  pytest-benchmark suite in ``benchmarks/``);
* ``traffic``     the bytes the op must move, per mode (for achieved bandwidth);
* ``variants``    the implementations compared (fused backends, eager reference,
                  ``torch.compile`` of it, plain BN → ReLU, a tensor copy) as ready-to-time steps;
* ``timing``      timers (CPU wall clock, CUDA events), interleaved repeats, summaries;
* ``model``       one training step of a routed VGG-11;
* ``runner``      runs the sweeps and turns samples into result rows;
* ``environment`` device names and versions;
* ``report``      table, CSV, JSON and plots.
"""
from .cases import Case, ModelSettings, Settings, Sweep, build_sweeps, preset
from .runner import run

__all__ = ["Case", "Sweep", "Settings", "ModelSettings", "build_sweeps", "preset", "run"]
