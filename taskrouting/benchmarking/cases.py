"""What the benchmark measures: cases, sweeps and presets.

The one source of truth for both ``taskrouting bench`` and ``benchmarks/`` (pytest-benchmark).

* A :class:`Case` is one workload of the op: activation shape, dtype, number of tasks,
  sharing ratio σ and mode (train/eval × forward/forward+backward).
* A :class:`Sweep` is a list of cases that vary along one axis (``shapes``: the activation
  shapes of a routed VGG-11; ``tasks``: the number of tasks; ``sharing_ratio``: σ).
* :class:`Settings` hold everything a run needs; :func:`preset` gives the ``quick``,
  ``default`` and ``full`` settings for a device, which the CLI flags then override.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Shape", "MODES", "DTYPES", "Case", "Sweep", "ModelSettings", "MODEL_ARCHS", "Settings", "SWEEPS",
           "HEADLINE", "TASKS", "SHARING_RATIOS", "vgg11_shapes", "parse_shapes", "parse_dtype",
           "parse_mode", "shape_label", "ratio_sweep_repeats", "last_level_cache_bytes", "build_sweeps",
           "unique_cases", "preset", "PRESETS", "default_device", "settings_from_env"]

Shape = tuple[int, ...]

# train/eval × forward only/forward+backward. Forward-only cases run under torch.no_grad().
MODES = ("train-fwd", "train-fwdbwd", "eval-fwd", "eval-fwdbwd")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float": torch.float32}

TASKS = (1, 10, 100, 312, 1000, 4096)
SHARING_RATIOS = (0.2, 0.4, 0.5, 0.6, 1.0)   # 0.5 is the headline σ
SWEEPS = ("shapes", "tasks", "sharing_ratio", "model")

# torchvision's VGG-11 ("A"): conv widths and "M" (2x2 max pool). Each conv is followed by a
# routed BatchNorm, so these are the activations the op sees in a routed VGG-11.
VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def parse_mode(mode: str) -> tuple[bool, bool]:
    """``"train-fwdbwd"`` → ``(training, backward)`` = ``(True, True)``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    phase, passes = mode.split("-")
    return phase == "train", passes == "fwdbwd"


def parse_dtype(name: str) -> str:
    """Canonical dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``) from a name or alias."""
    key = name.strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of float32/fp32, bfloat16/bf16, float16/fp16")
    return str(DTYPES[key]).removeprefix("torch.")


def shape_label(shape: Shape) -> str:
    return "x".join(map(str, shape))


def vgg11_shapes(resolution: int = 224, batch: int = 32) -> tuple[Shape, ...]:
    """The distinct activation shapes ``[N, C, H, W]`` at the routed BatchNorms of VGG-11."""
    shapes, side = [], resolution
    for item in VGG11_CONFIG:
        if item == "M":
            side = math.ceil(side / 2)
        elif (batch, item, side, side) not in shapes:
            shapes.append((batch, item, side, side))
    return tuple(shapes)


def parse_shapes(text: str) -> tuple[Shape, ...]:
    """Comma-separated shapes: ``"16x128x56x56"`` (2 to 5 dims, [N, C, *]) or
    ``"vgg11:RESOLUTION:BATCH"`` (every routed activation of VGG-11 at that input size)."""
    shapes: list[Shape] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item.startswith("vgg11"):
            parts = item.split(":")
            if len(parts) != 3:
                raise ValueError(f"expected vgg11:RESOLUTION:BATCH, got {item!r}")
            shapes.extend(vgg11_shapes(int(parts[1]), int(parts[2])))
            continue
        try:
            shape = tuple(int(d) for d in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"bad shape {item!r}: expected e.g. 16x128x56x56") from None
        if not 2 <= len(shape) <= 5 or min(shape) < 1:
            raise ValueError(f"bad shape {item!r}: 2 to 5 positive dims [N, C, *]")
        shapes.append(shape)
    if not shapes:
        raise ValueError("no shapes given")
    return tuple(dict.fromkeys(shapes))


@dataclass(frozen=True)
class Case:
    """One workload of ``bn_relu_route``: one task per batch, cycled call after call."""
    shape: Shape
    dtype: str = "float32"
    num_tasks: int = 100
    sharing_ratio: float = 0.5
    mode: str = "train-fwdbwd"
    stats: str = "batch"

    def __post_init__(self):
        parse_mode(self.mode)

    @property
    def training(self) -> bool:
        return parse_mode(self.mode)[0]

    @property
    def backward(self) -> bool:
        return parse_mode(self.mode)[1]

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        stats = "" if self.stats == "batch" else f" stats={self.stats}"
        return (f"{shape_label(self.shape)} {self.dtype} {self.mode} T={self.num_tasks} "
                f"s={self.sharing_ratio:g}{stats}")

    @property
    def slug(self) -> str:
        """An id without spaces (pytest ids, file names)."""
        return self.label.replace(" ", "-").replace("=", "")


def ratio_sweep_repeats(repeats: int, sweep_repeats: int | None) -> int:
    """Repeats of the sweeps read as ratios to a baseline case (tasks, sharing_ratio):
    ``sweep_repeats`` if set, else 3 x ``repeats``."""
    return sweep_repeats or 3 * repeats


@dataclass(frozen=True)
class Sweep:
    """Cases varying along ``axis`` (a :class:`Case` field, or None for the shapes sweep).

    Repeats are interleaved across the cases of one ``(shape, dtype)`` group, so ratios within
    a group, including ``time(axis) / time(baseline)``, are measured side by side.
    """
    name: str
    axis: str | None
    baseline: float | None
    cases: tuple[Case, ...]

    def groups(self) -> list[tuple[Case, ...]]:
        by_key: dict[tuple, list[Case]] = {}
        for case in self.cases:
            by_key.setdefault((case.shape, case.dtype), []).append(case)
        return [tuple(cases) for cases in by_key.values()]

    def repeats(self, settings: Settings) -> int:
        """Interleaved repeats of this sweep's groups."""
        if self.axis is None:
            return settings.repeats
        return ratio_sweep_repeats(settings.repeats, settings.sweep_repeats)

    def baseline_of(self, case: Case) -> Case | None:
        """The case this one is compared with along the axis (e.g. the same case at T = 1)."""
        if self.axis is None or self.baseline is None:
            return None
        base = dataclasses.replace(case, **{self.axis: type(getattr(case, self.axis))(self.baseline)})
        return base if base in self.cases else None


MODEL_ARCHS = ("vgg11_bn", "resnet50")  # taskrouting.models builders the whole-model step can run


@dataclass(frozen=True)
class ModelSettings:
    """One SGD training step of each routed model of ``archs`` (``taskrouting.models`` builders) on
    ``[batch, 3, resolution, resolution]``.

    ``pool_size=1`` keeps the per-task heads small (they read ``C * pool_size**2`` features)."""
    batch: int = 8
    resolution: int = 64
    width_mult: float = 0.25
    num_tasks: int = 100
    sharing_ratio: float = 0.5
    pool_size: int = 1
    archs: tuple[str, ...] = MODEL_ARCHS

    def __post_init__(self):
        unknown = [a for a in self.archs if a not in MODEL_ARCHS]
        if unknown or not self.archs:
            raise ValueError(f"model archs must be a non-empty list of {', '.join(MODEL_ARCHS)}, got {self.archs}")

    @property
    def label(self) -> str:
        return (f"{'+'.join(self.archs)} {self.batch}x3x{self.resolution}x{self.resolution} "
                f"width={self.width_mult:g} T={self.num_tasks} s={self.sharing_ratio:g}")


@dataclass(frozen=True)
class Settings:
    """Everything one benchmark run needs. Build with :func:`preset`, then ``dataclasses.replace``."""
    device: str = "cpu"
    preset: str = "default"
    shapes: tuple[Shape, ...] = ()          # the shapes sweep, at (num_tasks, sharing_ratio)
    sweep_shapes: tuple[Shape, ...] = ()    # the tasks and sharing_ratio sweeps run on these
    dtypes: tuple[str, ...] = ("float32",)
    modes: tuple[str, ...] = MODES          # modes of the shapes sweep
    sweep_modes: tuple[str, ...] = ("train-fwdbwd",)
    tasks: tuple[int, ...] = TASKS
    sharing_ratios: tuple[float, ...] = SHARING_RATIOS
    num_tasks: int = 100                    # T of the shapes and sharing_ratio sweeps
    sharing_ratio: float = 0.5              # σ of the shapes and tasks sweeps
    stats: str = "batch"
    sweeps: tuple[str, ...] = SWEEPS
    backends: tuple[str, ...] | None = None  # fused backends; None: every one available
    compile: bool = True
    repeats: int = 10
    # Repeats of the tasks and sharing_ratio sweeps, whose figure is a ratio of two close times
    # (time(T) / time(1)): more samples narrow its median. None: 3 x repeats.
    sweep_repeats: int | None = None
    warmup: int = 2
    min_time: float = 0.02                  # seconds; each sample runs the op enough times
    max_inner: int = 200
    seed: int = 0
    model: ModelSettings | None = field(default_factory=ModelSettings)
    malloc: str = "keep"                    # CPU: "keep" freed memory (see allocator.py) or "default"
    # Inputs rotate through copies totalling more than this many bytes, so that calls start from
    # cold cache as in training (variants.Inputs). None: the last-level cache size on the CPU;
    # 0 on the GPU, whose L2 the timer flushes before every call instead.
    rotate_bytes: int | None = None

    def rotation_bytes(self) -> int:
        if self.rotate_bytes is not None:
            return self.rotate_bytes
        return 0 if torch.device(self.device).type == "cuda" else last_level_cache_bytes()

    def __post_init__(self):
        for mode in self.modes + self.sweep_modes:
            parse_mode(mode)
        unknown = set(self.sweeps) - set(SWEEPS)
        if unknown:
            raise ValueError(f"unknown sweeps {sorted(unknown)}; choose from {SWEEPS}")
        if self.rotate_bytes is not None and self.rotate_bytes < 0:
            raise ValueError(f"rotate_bytes must be >= 0, got {self.rotate_bytes}")
        if self.malloc not in ("keep", "default"):
            raise ValueError(f"malloc must be 'keep' or 'default', got {self.malloc!r}")
        if self.repeats < 1 or self.warmup < 0 or (self.sweep_repeats is not None and self.sweep_repeats < 1):
            raise ValueError("repeats and sweep_repeats must be >= 1 and warmup >= 0")
        if any(t < 1 for t in self.tasks) or self.num_tasks < 1:
            raise ValueError("numbers of tasks must be >= 1")
        if any(not 0.0 <= s <= 1.0 for s in self.sharing_ratios + (self.sharing_ratio,)):
            raise ValueError("sharing ratios must be in [0, 1]")


def last_level_cache_bytes(default: int = 32 * 1024 ** 2) -> int:
    """Size of the largest CPU cache (Linux sysfs), else ``default``."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=default)


def build_sweeps(settings: Settings) -> list[Sweep]:
    """The op sweeps of a run (the model case is separate: ``settings.model``)."""
    s, sweeps = settings, []
    if "shapes" in s.sweeps:
        sweeps.append(Sweep("shapes", None, None, tuple(
            Case(shape, dtype, s.num_tasks, s.sharing_ratio, mode, s.stats)
            for dtype in s.dtypes for shape in s.shapes for mode in s.modes)))
    if "tasks" in s.sweeps:
        sweeps.append(Sweep("tasks", "num_tasks", 1 if 1 in s.tasks else min(s.tasks), tuple(
            Case(shape, dtype, t, s.sharing_ratio, mode, s.stats)
            for dtype in s.dtypes for shape in s.sweep_shapes for mode in s.sweep_modes
            for t in s.tasks)))
    if "sharing_ratio" in s.sweeps:
        sweeps.append(Sweep("sharing_ratio", "sharing_ratio", max(s.sharing_ratios), tuple(
            Case(shape, dtype, s.num_tasks, sigma, mode, s.stats)
            for dtype in s.dtypes for shape in s.sweep_shapes for mode in s.sweep_modes
            for sigma in s.sharing_ratios)))
    return [sweep for sweep in sweeps if sweep.cases]


def unique_cases(sweeps: list[Sweep]) -> list[Case]:
    return list(dict.fromkeys(case for sweep in sweeps for case in sweep.cases))


# The headline case: the second conv block of VGG-11 on 112x112 at batch 16.
HEADLINE = Case((16, 128, 56, 56), "float32", 100, 0.5, "train-fwdbwd")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_presets() -> dict[str, Settings]:
    quick = Settings(
        device="cpu", preset="quick", shapes=((4, 16, 8, 8),), sweep_shapes=((4, 16, 8, 8),),
        modes=MODES, tasks=(1, 100), sharing_ratios=(0.5, 1.0), num_tasks=10,
        repeats=3, sweep_repeats=3, warmup=1, min_time=0.0, max_inner=2,
        model=ModelSettings(batch=2, resolution=32, width_mult=1 / 16, num_tasks=10))
    default = Settings(
        device="cpu", preset="default", shapes=vgg11_shapes(112, 16)[1:],
        sweep_shapes=(HEADLINE.shape,), repeats=10, warmup=2, min_time=0.02,
        model=ModelSettings(batch=8, resolution=64, width_mult=0.25))
    full = dataclasses.replace(default, preset="full", shapes=vgg11_shapes(112, 16) + vgg11_shapes(224, 16)[:2],
                               sweep_modes=MODES,
                               model=ModelSettings(batch=16, resolution=112, width_mult=0.5))
    return {"quick": quick, "default": default, "full": full}


def _cuda_presets() -> dict[str, Settings]:
    quick = dataclasses.replace(_cpu_presets()["quick"], device="cuda", min_time=0.0)
    default = Settings(
        device="cuda", preset="default", shapes=vgg11_shapes(224, 32), sweep_shapes=((32, 128, 112, 112),),
        dtypes=("float32", "bfloat16"), repeats=20, warmup=5, min_time=0.005, max_inner=100,
        model=ModelSettings(batch=32, resolution=224, width_mult=1.0))
    full = dataclasses.replace(default, preset="full", shapes=vgg11_shapes(224, 16) + vgg11_shapes(224, 32),
                               sweep_shapes=((16, 128, 56, 56), (32, 128, 112, 112)), sweep_modes=MODES)
    return {"quick": quick, "default": default, "full": full}


PRESETS = ("quick", "default", "full")


def settings_from_env(environ=None) -> Settings:
    """Settings of the pytest-benchmark suite: ``TASKROUTING_BENCH_PRESET`` (``quick``, the
    default: small cases; ``default`` or ``full`` for full size) on ``TASKROUTING_BENCH_DEVICE``."""
    environ = os.environ if environ is None else environ
    return preset(environ.get("TASKROUTING_BENCH_PRESET", "quick"), environ.get("TASKROUTING_BENCH_DEVICE"))


def preset(name: str = "default", device: str | None = None) -> Settings:
    """Settings of a preset for a device: ``quick`` (a few tiny cases: checks the harness, not
    speed), ``default`` (CPU: a few minutes; GPU: VGG-11 at 224x224, batch 32) or ``full``."""
    device = device or default_device()
    kind = torch.device(device).type
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    table = _cuda_presets() if kind == "cuda" else _cpu_presets()
    return dataclasses.replace(table[name], device=device)
