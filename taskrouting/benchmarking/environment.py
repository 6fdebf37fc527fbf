"""Where the numbers come from: device names, versions, threads."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from .. import __version__, ops
from .cases import last_level_cache_bytes

__all__ = ["cpu_model", "environment"]


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001  (a broken triton install is reported as absent)
        return None
    return getattr(triton, "__version__", "unknown")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _gpu(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 1024 ** 3, 1),
            "gpu_multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda}


def environment(device) -> dict:
    """A flat dict describing the machine and software of the run."""
    device = torch.device(device)
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "taskrouting": __version__,
        "git_commit": _git_commit(),
        "backends": ops.available_backends(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        info.update(_gpu(device))
    else:
        info["last_level_cache_mib"] = round(last_level_cache_bytes() / 1024 ** 2)
    return info
