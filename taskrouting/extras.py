"""Optional dependencies: imported where they are used, with a message naming the extra that brings them."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which ``pip install`` brings it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or a MissingExtraError saying that ``purpose`` needs ``taskrouting[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'taskrouting[{extra}]'") from exc
