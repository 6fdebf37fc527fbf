"""Optional dependencies: imported where they are used, with a message naming the extra that brings them."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which ``pip install`` brings it."""


# The distribution that provides a module, where the names differ.
_PACKAGES = {"PIL": "Pillow", "sklearn": "scikit-learn"}


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or a MissingExtraError saying that ``purpose`` needs ``taskrouting[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingExtraError(f"{purpose} needs {_PACKAGES.get(top, top)}, which is not installed: "
                                f"pip install 'taskrouting[{extra}]'") from exc
