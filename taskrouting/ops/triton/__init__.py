"""Triton kernels of the fused BatchNorm + ReLU + route op, one module per kernel family.

* ``stats``      per-channel statistics (count, mean, M2) and their Chan merge;
                 also the tile-indexing helpers the other families share;
* ``normalize``  forward apply: ``y = relu((x - mean) * invstd * w + b) * route``;
* ``backward``   backward reduce (``sum_dy``, ``sum_dy_xmu``) and apply (``grad_x``).

The op registration (launch configs, layouts, the fused ops) is ``ops.py`` beside this file.

Compiled and interpreted kernels
--------------------------------
``triton.jit`` decides *when a kernel is decorated* (module import) whether it becomes a
compiled ``JITFunction`` or an ``InterpretedFunction`` (``TRITON_INTERPRET=1``), and an
interpreted kernel can only call interpreted helpers. A process may import these modules
before ``TRITON_INTERPRET`` is set (e.g. a test asking ``available_backends("cuda")``), and
CPU tensors always need the interpreter. So the kernels are not used through a plain import:
:func:`kernels` loads a private copy of the three modules per mode, into the synthetic packages
``taskrouting.ops.triton._compiled`` / ``._interpret``, with ``TRITON_INTERPRET`` set
accordingly while they are decorated. Relative imports inside them (``from .stats import ...``)
then resolve within the same copy, so compiled kernels only ever call compiled helpers and
interpreted kernels interpreted ones.

Triton's own library functions written in Triton (``tl.sum``, ``tl.max``, ``tl.zeros``) are
decorated once, at ``import triton``, in whatever mode ``TRITON_INTERPRET`` said then (torch
itself may import triton first), so the kernels do not call them: they use builtins and
their own reductions (``stats.SUM`` / ``MAX`` / ``sum2``), decorated with each copy.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
import types

__all__ = ["kernels", "FAMILIES"]

FAMILIES = ("stats", "normalize", "backward")

_lock = threading.Lock()
_loaded: dict[bool, types.SimpleNamespace] = {}


def kernels(interpret: bool) -> types.SimpleNamespace:
    """The kernel modules (``.stats``, ``.normalize``, ``.backward``) built for one mode."""
    interpret = bool(interpret)
    ns = _loaded.get(interpret)
    if ns is not None:
        return ns
    with _lock:
        ns = _loaded.get(interpret)
        if ns is not None:
            return ns
        pkg_name = f"{__name__}._{'interpret' if interpret else 'compiled'}"
        pkg = sys.modules.get(pkg_name)
        if pkg is None:
            pkg = types.ModuleType(pkg_name, f"Triton kernels, {'interpreted' if interpret else 'compiled'}")
            pkg.__path__ = list(__path__)  # the same source files, loaded again under this name
            pkg.__package__ = pkg_name
            sys.modules[pkg_name] = pkg
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            mods = {name: importlib.import_module(f"{pkg_name}.{name}") for name in FAMILIES}
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
        if mods["stats"].INTERPRETED != interpret:
            mode = "interpreted" if interpret else "compiled"
            raise RuntimeError(f"taskrouting: could not build the {mode} Triton kernels "
                               f"(is triton.knobs.runtime.interpret set explicitly?)")
        ns = types.SimpleNamespace(interpret=interpret, **mods)
        _loaded[interpret] = ns
        return ns

