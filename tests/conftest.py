"""Fixtures of the op's conformance suite: ``backend`` (one parameter per backend this machine can run) and
``device`` (where that backend's tensors live).

Targets: ``cpu`` (C++ kernels), ``triton_interp`` (Triton kernels through the interpreter on CPU tensors,
``TRITON_INTERPRET=1`` set for the test), and on a CUDA machine ``cuda`` and ``triton_cuda`` (compiled Triton,
``TRITON_INTERPRET`` removed for the test). ``@pytest.mark.backends("cpu", "cuda")`` limits a test to those
backend names; ``@pytest.mark.shapes(full, interpreted)`` gives the test's ``shape`` parameter one list for
compiled backends and a small one for the Triton interpreter. Under the interpreter every load and store is
checked to stay in bounds (``in_bounds``).
``TASKROUTING_TEST_BACKENDS=cpu,cuda,...`` picks targets by id instead of by availability (a
target this machine cannot run then skips), e.g. to list what a GPU machine runs.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

from taskrouting import ops


@dataclass(frozen=True)
class Target:
    id: str
    backend: str
    device: str
    interpreted: bool = False

    def why_not(self) -> str | None:
        """None where this machine runs the target, else why not."""
        if self.device == "cuda" and not torch.cuda.is_available():
            return "needs a CUDA GPU"
        if self.backend == "triton":
            return None if importlib.util.find_spec("triton") else "triton is not installed"
        if not ops.NATIVE_KERNELS.get(self.device):
            return f"the extension was built without {self.device} kernels"
        return None


TARGETS = {t.id: t for t in (Target("cpu", "cpu", "cpu"), Target("triton_interp", "triton", "cpu", True),
                             Target("cuda", "cuda", "cuda"), Target("triton_cuda", "triton", "cuda"))}


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): run the test on these backend names only")
    config.addinivalue_line("markers", "shapes(full, interpreted): the test's ``shape`` parameter per backend")


def _selected() -> list[Target]:
    chosen = os.environ.get("TASKROUTING_TEST_BACKENDS")
    if chosen:
        return [TARGETS[name.strip()] for name in chosen.split(",") if name.strip()]
    return [t for t in TARGETS.values() if t.why_not() is None]


def _parametrizes_backend_itself(metafunc) -> bool:
    """A test that lists its own ``backend`` values (``@pytest.mark.parametrize("backend", ...)``)."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        names = names.split(",") if isinstance(names, str) else list(names)
        if "backend" in (n.strip() for n in names):
            return True
    return False


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames or _parametrizes_backend_itself(metafunc):
        return
    marker = metafunc.definition.get_closest_marker("backends")
    targets = [t for t in _selected() if marker is None or t.backend in marker.args]
    marks = lambda t: [pytest.mark.gpu] if t.device == "cuda" else []
    shapes = metafunc.definition.get_closest_marker("shapes")
    if shapes is None:
        metafunc.parametrize("backend", [pytest.param(t, id=t.id, marks=marks(t)) for t in targets], indirect=True)
        return
    full, interpreted = shapes.args
    params = [pytest.param(t, shape, id=f"{t.id}-{shape}", marks=marks(t))
              for t in targets for shape in (interpreted if t.interpreted else full)]
    metafunc.parametrize("backend,shape", params, indirect=["backend"])


@pytest.fixture
def target(request) -> Target:
    return request.node.callspec.params["backend"]


@pytest.fixture
def backend(request, monkeypatch) -> str:
    """The backend name under test (``ops.bn_relu_route(..., backend=...)``)."""
    t: Target = request.param
    reason = t.why_not()
    if reason:
        pytest.skip(reason)
    if t.backend == "triton":
        if t.interpreted:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            request.getfixturevalue("in_bounds")
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return t.backend


@pytest.fixture
def device(target) -> str:
    return target.device


@pytest.fixture
def family(backend) -> str:
    """The op family of the backend: ``torch.ops.taskrouting.<prefix><op>`` (``ops.family_op``)."""
    return ops.BACKENDS[backend].family


@pytest.fixture
def in_bounds(monkeypatch):
    """Each address an interpreted Triton kernel loads or stores (unmasked lanes) lies inside the storage of
    one of the tensors of its launch -- the interpreter itself does not check."""
    import numpy as np
    from triton.runtime import interpreter
    from triton.runtime.interpreter import InterpretedFunction

    ranges = []
    run = InterpretedFunction.run

    def checked_run(self, *args, **kwargs):
        ranges[:] = [(t.untyped_storage().data_ptr(),
                      t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
                     for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        return run(self, *args, **kwargs)

    def check(ptrs, mask, what):
        addr = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64)
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        ok = np.zeros(addr.shape, bool)
        for lo, hi in ranges:
            ok |= (addr >= lo) & (addr + size <= hi)
        assert ok.all(), f"out-of-bounds {what} of {int((~ok).sum())} element(s)"

    load = interpreter.InterpreterBuilder.create_masked_load
    store = interpreter.InterpreterBuilder.create_masked_store

    def checked_load(self, ptrs, mask, *rest):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *rest)

    monkeypatch.setattr(InterpretedFunction, "run", checked_run)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", checked_load)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_store", checked_store)
