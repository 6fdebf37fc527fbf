"""Triton backend vs the reference, run on CPU tensors through the Triton interpreter.

When the interpreter runs (checked for triton 3.6 and 3.9): ``triton.jit`` reads
``TRITON_INTERPRET`` when a function is *decorated* -- at import of the module that defines it,
including Triton's own library (``tl.sum``, ``tl.max``, ... at ``import triton``) -- not at launch.
So setting it at the top of this module is not enough on its own when another test module (or
torch) imported triton first. The backend copes: ``ops.py`` offers triton for CPU tensors when
``TRITON_INTERPRET=1`` at call time; the CPU kernels always launch the interpreted copy of the
kernel modules (``taskrouting.ops.triton.kernels(interpret=True)``, loaded once per mode), and
the kernels call no ``triton.language`` function written in Triton (those are decorated at
``import triton``), only builtins and their own reductions. ``test_interpreter_really_runs``
checks that interpreted kernels are launched, and
``test_triton_imported_before_interpret`` runs the op in a fresh process that imported triton
(compiled mode) and the kernels before setting the variable.

Every test also checks, through the interpreter, that each load / store stays inside the
storage of the launch's tensors (``in_bounds``), and ``test_masked_data_never_loaded`` checks
addresses: masked data are never loaded. Shapes are tiny (an interpreted program instance costs
about a millisecond); the ``split`` fixture shrinks the launch config so that the multi-chunk
(split reduction, Chan merge) path runs too.
"""
from __future__ import annotations

import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import numpy as np  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import taskrouting  # noqa: E402
from taskrouting import ops  # noqa: E402
from taskrouting.nn.masks import make_masks
from taskrouting.ops.route import select_route  # noqa: E402

T = pytest.importorskip("taskrouting.ops.triton.ops")
from taskrouting.ops.triton import kernels  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4),
       torch.float16: dict(atol=6e-3, rtol=6e-3),
       torch.bfloat16: dict(atol=4e-2, rtol=3e-2)}
GRAD_TOL = {torch.float32: dict(atol=5e-5, rtol=2e-4),
            torch.float16: dict(atol=2e-2, rtol=1e-2),
            torch.bfloat16: dict(atol=8e-2, rtol=5e-2)}
STAT_TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture
def split(monkeypatch):
    """Force the split path: no one-pass tile, tiny tiles, several chunks per channel."""
    monkeypatch.setattr(T.INTERPRETED, "fuse_max", 0)
    monkeypatch.setattr(T.INTERPRETED, "tile", 8)
    monkeypatch.setattr(T.INTERPRETED, "programs", 5)
    monkeypatch.setattr(T.INTERPRETED, "block_pp", 2)


@pytest.fixture(params=["fused", "split"])
def path(request):
    if request.param == "split":
        request.getfixturevalue("split")
    return request.param


def _layout(x, cl):
    if not cl or x.dim() < 4:
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _masks(C, sigma=0.5, tasks=3, seed=0):
    return make_masks(tasks, C, sigma, torch.Generator().manual_seed(seed))


def _task(kind, N, tasks=3):
    if kind == "batch":
        return min(1, tasks - 1)
    return torch.arange(N) % tasks  # per-sample


def _run(backend, x0, masks, task, weight, bias, rm, rv, g, training, stats, momentum=0.1,
         eps=1e-5):
    x = x0.clone().requires_grad_()
    w = None if weight is None else weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    y = ops.bn_relu_route(x, masks, task, w, b, rm, rv, training=training, momentum=momentum,
                          eps=eps, stats=stats, backend=backend)
    y.backward(g)
    return dict(y=y.detach(), gx=x.grad, gw=None if w is None else w.grad,
                gb=None if b is None else b.grad, rm=rm, rv=rv)


def compare(shape, cl=False, dtype=torch.float32, task="batch", stats="batch", training=True,
            affine=True, running=True, sigma=0.5, masks=None, param_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    N, C = shape[:2]
    x = _layout(torch.randn(shape) * 2 + 0.5, cl).to(dtype)
    g = _layout(torch.randn(shape), cl).to(dtype)
    masks = _masks(C, sigma) if masks is None else masks
    task = _task(task, N, masks.shape[0])
    weight = (torch.rand(C) + 0.5).to(param_dtype) if affine else None
    bias = (torch.randn(C) * 0.3).to(param_dtype) if affine else None
    rm = (torch.randn(C) * 0.2).to(param_dtype) if running or not training else None
    rv = (torch.rand(C) + 0.5).to(param_dtype) if running or not training else None
    ref = _run("reference", x, masks, task, weight, bias, rm, rv, g, training, stats)
    out = _run("triton", x, masks, task, weight, bias, rm, rv, g, training, stats)
    assert out["y"].dtype == x.dtype and out["y"].shape == x.shape
    if x.numel():  # (the reference returns an empty batch contiguous)
        assert out["y"].stride() == ref["y"].stride(), "output must keep x's memory format"
    torch.testing.assert_close(out["y"], ref["y"], **TOL[dtype])
    torch.testing.assert_close(out["gx"], ref["gx"], **GRAD_TOL[dtype])
    for k in ("gw", "gb"):
        if ref[k] is None:
            assert out[k] is None
        else:
            assert out[k].dtype == ref[k].dtype
            torch.testing.assert_close(out[k], ref[k], **GRAD_TOL[dtype if param_dtype != torch.float32
                                                                  else torch.float32])
    for k in ("rm", "rv"):
        if ref[k] is not None:
            torch.testing.assert_close(out[k], ref[k], **STAT_TOL if param_dtype == torch.float32
                                       else TOL[param_dtype])
    return out


@pytest.fixture(autouse=True)
def in_bounds(monkeypatch):
    """Every test: each address a kernel loads or stores (unmasked lanes) lies inside the storage
    of one of the tensors of its launch -- the interpreter itself does not check."""
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


# ----------------------------------------------------------------------------- the interpreter runs
def test_interpreter_really_runs(monkeypatch):
    x = torch.randn(2, 3, 2, 2)
    assert ops.resolve_backend("triton", x) == "triton"
    k = kernels(True)
    assert isinstance(k.normalize.fused_forward_kernel, InterpretedFunction)
    assert isinstance(k.backward.fused_backward_kernel, InterpretedFunction)
    launched = []
    for mod, name in ((k.normalize, "fused_forward_kernel"), (k.backward, "fused_backward_kernel")):
        fn = getattr(mod, name)
        real = fn.run
        monkeypatch.setattr(fn, "run", lambda *a, _real=real, _n=name, **kw: (launched.append(_n),
                                                                              _real(*a, **kw))[1])
    x.requires_grad_()
    ops.bn_relu_route(x, _masks(3), 0, backend="triton").sum().backward()
    assert launched == ["fused_forward_kernel", "fused_backward_kernel"]


def test_cpu_kernels_interpret_without_env(monkeypatch):
    """The CPU registration always interprets, whatever TRITON_INTERPRET says at call time."""
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(3, 4, 5)
    route = _masks(4)[0]
    y, *_ = torch.ops.taskrouting.triton_bn_relu_route(x, route, None, None, None, None, True, 1e-5,
                                                       False, False)
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.batch_norm(
        x, None, None, training=True)) * route.view(1, -1, 1), **TOL[torch.float32])


def test_triton_imported_before_interpret():
    """A fresh process: triton and the kernels imported in compiled mode, env set afterwards."""
    code = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
import torch, taskrouting
from taskrouting import ops
from taskrouting.ops.triton import kernels
kernels(False)
import taskrouting.ops.triton.ops
from triton.runtime.interpreter import InterpretedFunction
assert not isinstance(tl.sum, InterpretedFunction)
os.environ["TRITON_INTERPRET"] = "1"
x = torch.randn(3, 4, 5, requires_grad=True)
masks = taskrouting.make_masks(2, 4, 0.5, torch.Generator().manual_seed(0))
y = ops.bn_relu_route(x, masks, 1, backend="triton")
y.sum().backward()
ref = ops.bn_relu_route(x.detach(), masks, 1, backend="reference")
torch.testing.assert_close(y, ref)
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_compiled_kernels_build_for_sm90_after_interpreted_import():
    """A fresh process importing triton under TRITON_INTERPRET=1 (its library functions are then
    interpreted) can still build the compiled kernels: ahead-of-time to sm_90 cubins, no GPU."""
    code = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("SKIP", exc); raise SystemExit
from taskrouting.ops.triton import kernels
k = kernels(False)
geo = dict(CL=True, ROUTE_2D=True, BN=2, BP=16, BC=64, BIG=True)
ptr = lambda n: dict((a, "*fp32") for a in n)
def build(fn, sig, consts, warps=8):
    sig = dict(sig)
    sig.update({c: "constexpr" for c in consts})
    sig = {a: sig[a] for a in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})
ints = lambda n: dict((a, "i32") for a in n)
try:
    fn = k.normalize.fused_forward_kernel
    build(fn, {**ptr(fn.arg_names[:9]), "x_ptr": "*bf16", "y_ptr": "*bf16", "route_ptr": "*u8",
               **ints(["N", "C", "HW", "route_sn"]), "eps": "fp32"},
          dict(ROUTED=False, SKIP_UNUSED=True, HAS_W=True, HAS_B=True, **geo), 16)
    fn = k.stats.channel_stats_kernel
    build(fn, {**ptr(fn.arg_names[:8]), "x_ptr": "*fp16", "route_ptr": "*u8", "used_ptr": "*u8",
               **ints(["N", "C", "HW", "route_sn", "Tp", "T", "TPC", "P"]), "eps": "fp32"},
          dict(ROUTED=True, SKIP_UNUSED=True, FINAL=False, WRITE_INVSTD=False, **geo))
    fn = k.backward.fused_backward_kernel
    build(fn, {**ptr(fn.arg_names[:11]), "route_ptr": "*u8", **ints(["N", "C", "HW", "route_sn"])},
          dict(HAS_W=True, HAS_B=False, TRAINING=True, ROUTED=False, WRITE_GX=True, WRITE_GW=True,
               WRITE_GB=True, **geo), 16)
except Exception as exc:
    if "ptxas" in str(exc) or "cuda" in str(exc).lower() and "not found" in str(exc).lower():
        print("SKIP", exc); raise SystemExit
    raise
print("OK")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    if "SKIP" in out.stdout:
        pytest.skip(out.stdout)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_compiled_and_interpreted_copies_are_separate():
    a, b = kernels(True), kernels(False)
    assert a.stats is not b.stats
    assert not isinstance(b.stats.channel_stats_kernel, InterpretedFunction)
    # the compiled copy's kernels call the compiled copy's helpers (same-mode imports)
    assert b.normalize.tile_offsets is b.stats.tile_offsets


# ----------------------------------------------------------------------------- fused op vs reference
CASES = [
    # shape, channels_last, dtype, task, stats, training
    ((3, 5, 4, 3), False, torch.float32, "batch", "batch", True),
    ((3, 5, 4, 3), True, torch.float32, "batch", "batch", True),
    ((3, 5, 4, 3), False, torch.float32, "sample", "batch", True),
    ((3, 5, 4, 3), True, torch.float32, "sample", "batch", True),
    ((3, 5, 4, 3), False, torch.float32, "batch", "routed", True),
    ((3, 5, 4, 3), True, torch.float32, "sample", "routed", True),
    ((3, 5, 4, 3), False, torch.float32, "sample", "routed", True),
    ((3, 5, 4, 3), False, torch.float32, "batch", "batch", False),
    ((3, 5, 4, 3), True, torch.float32, "sample", "batch", False),
    ((3, 5, 4, 3), False, torch.float16, "batch", "batch", True),
    ((3, 5, 4, 3), True, torch.bfloat16, "sample", "routed", True),
    ((3, 5, 4, 3), True, torch.float16, "batch", "batch", False),
    ((4, 6), False, torch.float32, "batch", "batch", True),            # rank 2 ([N, C], HW = 1)
    ((4, 6), False, torch.float32, "sample", "routed", True),
    ((4, 6), False, torch.bfloat16, "sample", "batch", False),
    ((3, 5, 7), False, torch.float32, "sample", "batch", True),        # rank 3
    ((3, 5, 7), False, torch.float16, "batch", "routed", True),
    ((2, 3, 2, 3, 3), False, torch.float32, "sample", "batch", True),  # rank 5
    ((2, 3, 2, 3, 3), True, torch.float32, "batch", "routed", True),
    ((2, 3, 2, 3, 3), True, torch.bfloat16, "sample", "batch", False),
    ((1, 4, 3, 3), True, torch.float32, "batch", "batch", True),       # N = 1
    ((1, 4, 3, 3), False, torch.float32, "sample", "routed", True),
    ((5, 4, 1, 1), True, torch.float32, "sample", "batch", True),      # HW = 1
    ((5, 4, 1, 1), False, torch.float32, "batch", "routed", False),
]


@pytest.mark.parametrize("shape,cl,dtype,task,stats,training", CASES)
def test_matches_reference(shape, cl, dtype, task, stats, training):
    compare(shape, cl, dtype, task, stats, training)


SPLIT_CASES = [
    ((3, 5, 4, 3), False, torch.float32, "batch", "batch", True),
    ((3, 5, 4, 3), True, torch.float32, "sample", "batch", True),
    ((3, 5, 4, 3), False, torch.float32, "sample", "routed", True),
    ((3, 5, 4, 3), True, torch.float32, "batch", "routed", True),
    ((3, 5, 4, 3), True, torch.float32, "sample", "batch", False),
    ((3, 5, 4, 3), False, torch.bfloat16, "batch", "batch", True),
    ((5, 3), False, torch.float32, "sample", "batch", True),
    ((2, 3, 2, 2, 3), True, torch.float16, "sample", "routed", True),
]


@pytest.mark.parametrize("shape,cl,dtype,task,stats,training", SPLIT_CASES)
def test_matches_reference_split(split, shape, cl, dtype, task, stats, training):
    compare(shape, cl, dtype, task, stats, training)


@pytest.mark.parametrize("sigma", [0.0, 1.0, 0.25])
def test_sharing_ratios(path, sigma):
    compare((3, 6, 3, 2), sigma=sigma, task="sample")
    compare((3, 6, 3, 2), cl=True, sigma=sigma, stats="routed")


def test_user_masks_and_channel_one(path):
    masks = torch.tensor([[True, False, False, True], [False, True, True, True]])
    compare((3, 4, 5), masks=masks, task="sample", stats="routed")
    compare((3, 4, 2, 2), cl=True, masks=masks)
    compare((3, 1, 2, 3), masks=torch.ones(1, 1, dtype=torch.bool), sigma=1.0)   # C = 1
    compare((3, 1, 2, 3), cl=True, masks=torch.ones(2, 1, dtype=torch.bool), task="sample",
            training=False)


@pytest.mark.parametrize("training", [True, False])
def test_no_affine_no_running_stats(path, training):
    compare((3, 5, 2, 3), affine=False, running=False, training=training)
    compare((3, 5, 2, 3), cl=True, affine=False, running=False, training=training, task="sample")


def test_half_params(path):
    compare((3, 4, 2, 3), dtype=torch.float16, param_dtype=torch.float16)
    compare((3, 4, 2, 3), cl=True, dtype=torch.bfloat16, param_dtype=torch.bfloat16, training=False)


def test_empty_batch(path):
    for training in (True, False):
        for cl in (False, True):
            x = _layout(torch.randn(0, 4, 3, 2), cl)
            out = compare(tuple(x.shape), cl=cl, training=training)
            assert out["y"].shape == x.shape and out["gx"].shape == x.shape
    x = torch.randn(0, 4, requires_grad=True)
    y = ops.bn_relu_route(x, _masks(4), torch.zeros(0, dtype=torch.long), backend="triton")
    y.sum().backward()
    assert y.shape == (0, 4) and x.grad.shape == (0, 4)


def test_module_running_stats_and_momentum_none(path):
    """BNReLURoute2d, cumulative average (momentum=None), a few steps, then eval."""
    mods = {b: taskrouting.BNReLURoute2d(5, momentum=None, num_tasks=3, sharing_ratio=0.6, seed=1,
                                         backend=b) for b in ("reference", "triton")}
    torch.manual_seed(3)
    for step in range(2):
        x = torch.randn(2, 5, 3, 3) * (step + 1)
        for b, m in mods.items():
            m(x, task=step)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(mods["triton"], name), getattr(mods["reference"], name),
                                   **STAT_TOL)
    x = torch.randn(3, 5, 3, 3)
    outs = {b: m.eval()(x, task=torch.tensor([0, 2, 1])) for b, m in mods.items()}
    torch.testing.assert_close(outs["triton"], outs["reference"], **TOL[torch.float32])


def test_zero_variance_channels(path):
    x = torch.randn(3, 4, 2, 3)
    x[:, 1] = 2.5          # constant channel: var 0, invstd = rsqrt(eps)
    masks = torch.ones(1, 4, dtype=torch.bool)
    outs = {}
    for b in ("reference", "triton"):
        xx = x.clone().requires_grad_()
        y = ops.bn_relu_route(xx, masks, 0, torch.ones(4), torch.full((4,), 0.1), backend=b)
        y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(0)))
        outs[b] = (y, xx.grad)
    for a, b in zip(outs["triton"], outs["reference"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_layouts_in_and_out(path):
    """Non-contiguous x (a slice), and a non-contiguous / expanded grad_y."""
    torch.manual_seed(0)
    base = torch.randn(3, 10, 4, 3)
    masks = _masks(5)
    for x0 in (base[:, ::2], base.to(memory_format=torch.channels_last)[:, 2:7]):
        outs = {}
        for b in ("reference", "triton"):
            x = x0.detach().clone().requires_grad_() if b == "reference" else x0.detach().requires_grad_()
            y = ops.bn_relu_route(x, masks, 2, backend=b)
            (y * torch.arange(12.).view(1, 1, 4, 3)).sum().backward()   # grad_y: expanded
            outs[b] = (y.detach(), x.grad)
        torch.testing.assert_close(outs["triton"], outs["reference"], **GRAD_TOL[torch.float32])
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    y = ops.bn_relu_route(x, _masks(3), 0, backend="triton")
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_int64_offsets_path(monkeypatch, path):
    """Force the int64-offset kernels (used for >= 2^31 elements) on a tiny tensor."""
    monkeypatch.setattr(T, "_INT32_LIMIT", 16)
    compare((3, 5, 4, 3), task="sample")
    compare((3, 5, 4, 3), cl=True, stats="routed", training=True)
    compare((3, 5, 4, 3), cl=True, training=False)


# ----------------------------------------------------------------------------- masked channels never read
def _nan_masked(x, route):
    """x with NaN wherever the route says a (sample, channel) is not used."""
    r = route if route.dim() == 2 else route.expand(x.shape[0], -1)
    r = r.reshape(r.shape + (1,) * (x.dim() - 2)).expand_as(x)
    return x.masked_fill(~r, float("nan"))


@pytest.mark.parametrize("cl", [False, True])
def test_masked_channels_never_read(path, cl):
    torch.manual_seed(0)
    C = 6
    masks = _masks(C, 0.5)
    w = torch.rand(C) + 0.5
    b = torch.randn(C) * 0.1
    for task in (1, torch.tensor([0, 2, 0])):
        route = select_route(masks, task, 3)
        unused = ~(route if route.dim() == 1 else route.any(0))
        clean = _layout(torch.randn(3, C, 2, 3), cl)
        for training, stats, running in ((False, "batch", True), (True, "batch", False),
                                         (True, "routed", True)):
            if training and stats == "batch":
                x0 = clean.clone()
                x0[:, unused] = float("nan")   # only channels masked for the whole batch
            else:
                x0 = _nan_masked(clean, route)  # every non-routed (sample, channel)
            x0 = _layout(x0, cl)
            rm, rv = torch.randn(C) * 0.1, torch.rand(C) + 0.5
            rm0, rv0 = rm.clone(), rv.clone()
            x = x0.clone().requires_grad_()
            ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
            y = ops.bn_relu_route(x, masks, task, ww, bb, rm if running else None,
                                  rv if running else None, training=training, stats=stats,
                                  backend="triton")
            y.backward(torch.ones_like(y))
            for t in (y, x.grad, ww.grad, bb.grad, rm, rv):
                assert torch.isfinite(t).all(), (task, training, stats)
            assert (y[:, unused] == 0).all() and (x.grad[:, unused] == 0).all()
            assert (ww.grad[unused] == 0).all() and (bb.grad[unused] == 0).all()
            if training and stats == "routed" and route.dim() == 1:
                assert torch.equal(rm[unused], rm0[unused]) and torch.equal(rv[unused], rv0[unused])


def _addresses(t, which):
    """Memory addresses of the elements of ``t`` where ``which`` is True."""
    off = torch.zeros(t.shape, dtype=torch.long)
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        off += torch.arange(size).view([-1 if i == d else 1 for i in range(t.dim())]) * stride
    return (t.data_ptr() + off[which] * t.element_size()).numpy().astype(np.uint64)


@pytest.fixture
def loads(monkeypatch):
    """Every address a Triton kernel loads from (unmasked lanes), recorded by the interpreter."""
    seen = []
    orig = interpreter.InterpreterBuilder.create_masked_load

    def create_masked_load(self, ptrs, mask, *rest):
        seen.append(ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64).ravel())
        return orig(self, ptrs, mask, *rest)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", create_masked_load)
    return seen


def _read(seen, t, which):
    got = np.concatenate(seen) if seen else np.zeros(0, np.uint64)
    return bool(np.isin(_addresses(t, which), got).any())


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("task", [1, "sample"])
def test_masked_data_never_loaded(path, loads, cl, task):
    """Address-level check: the kernels load no element they are not allowed to read."""
    torch.manual_seed(0)
    N, C = 3, 6
    x = _layout(torch.randn(N, C, 2, 3), cl)
    g = _layout(torch.randn(N, C, 2, 3), cl)
    route = select_route(_masks(C), torch.tensor([0, 2, 0]) if task == "sample" else task, N)
    r_nc = (route if route.dim() == 2 else route.expand(N, -1)).view(N, C, 1, 1).expand_as(x)
    unused = ~r_nc.any(0, keepdim=True).expand_as(x)   # channels masked for the whole batch
    w, b = torch.rand(C) + 0.5, torch.randn(C) * 0.1
    rm, rv = torch.randn(C) * 0.1, torch.rand(C) + 0.5
    tr = torch.ops.taskrouting
    for training, routed, running in ((False, False, True), (True, False, False), (True, True, True)):
        loads.clear()
        _, mean, invstd, _, count = tr.triton_bn_relu_route(
            x, route, w, b, rm if running else None, rv if running else None, training, 1e-5, routed,
            training and running and not routed)
        assert loads, "the interpreter recorded no load"
        forbidden = unused if (training and not routed) else ~r_nc
        assert not _read(loads, x, forbidden), ("forward", training, routed)
        assert _read(loads, x, r_nc), "sanity: routed data is read"
        loads.clear()
        tr.triton_bn_relu_route_backward(g, x, route, w, b, mean, invstd, count, training, routed,
                                         [True, True, True])
        assert not _read(loads, x, unused if (training and not routed) else ~r_nc), ("backward x", training)
        assert not _read(loads, g, ~r_nc), ("backward grad_y", training, routed)


# ----------------------------------------------------------------------------- stage ops
def _stage_inputs(shape, cl, task, seed=0):
    torch.manual_seed(seed)
    N, C = shape[:2]
    x = _layout(torch.randn(shape) + 1.0, cl)
    g = _layout(torch.randn(shape), cl)
    route = select_route(_masks(C), _task(task, N), N)
    return x, g, route, torch.rand(C) + 0.5, torch.randn(C) * 0.2


def _ref_stats(x, route, routed):
    r = route if route.dim() == 2 else route.expand(x.shape[0], -1)
    r = r.reshape(r.shape + (1,) * (x.dim() - 2)).expand_as(x).double()
    if not routed:
        r = torch.ones_like(r)
    dims = [0] + list(range(2, x.dim()))
    xd = x.double()
    cnt = r.sum(dims)
    mean = (xd * r).sum(dims) / cnt.clamp_min(1)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    var = ((xd - mean.view(shape)) ** 2 * r).sum(dims) / cnt.clamp_min(1)
    return mean.float(), var.float(), cnt.float()


@pytest.mark.parametrize("shape,cl,task", [((3, 5, 4, 3), False, "batch"), ((3, 5, 4, 3), True, "sample"),
                                           ((4, 6), False, "sample"), ((2, 3, 2, 2, 3), True, "batch")])
def test_stage_ops(path, shape, cl, task):
    x, g, route, w, b = _stage_inputs(shape, cl, task)
    C = shape[1]
    used = route if route.dim() == 1 else route.any(0)
    tr = torch.ops.taskrouting
    shp = (1, -1) + (1,) * (x.dim() - 2)
    for routed in (False, True):
        for all_channels in (False, True):
            mean, var, count = tr.triton_channel_stats(x, route, routed, all_channels)
            m_ref, v_ref, c_ref = _ref_stats(x, route, routed)
            if not routed and not all_channels:
                m_ref, v_ref, c_ref = (t * used for t in (m_ref, v_ref, c_ref))
            torch.testing.assert_close((mean, var, count), (m_ref, v_ref, c_ref), **STAT_TOL)
    mean, var, count = tr.triton_channel_stats(x, route, False, True)
    invstd = torch.rsqrt(var + 1e-5)
    y = tr.triton_normalize_relu_route(x, route, mean, invstd, w, b)
    rv = route.reshape(route.shape[:1] + (C,) + (1,) * (x.dim() - 2)) if route.dim() == 2 \
        else route.view(shp)
    pre = (x - mean.view(shp)) * invstd.view(shp) * w.view(shp) + b.view(shp)
    torch.testing.assert_close(y, torch.relu(pre) * rv, **TOL[torch.float32])
    assert y.stride() == x.stride()
    sum_dy, sum_dy_xmu = tr.triton_backward_reduce(g, x, route, mean, invstd, w, b)
    gg = g * rv * (pre > 0)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(sum_dy, gg.sum(dims), **GRAD_TOL[torch.float32])
    torch.testing.assert_close(sum_dy_xmu, (gg * (x - mean.view(shp))).sum(dims), **GRAD_TOL[torch.float32])
    for training in (True, False):
        gx = tr.triton_backward_apply(g, x, route, mean, invstd, w, b, sum_dy, sum_dy_xmu, count,
                                      training, False)
        k = (w * invstd).view(shp)
        if training:
            cnt = count.view(shp)
            ref = k * (gg - sum_dy.view(shp) / cnt
                       - (x - mean.view(shp)) * invstd.view(shp) ** 2 * sum_dy_xmu.view(shp) / cnt)
        else:
            ref = gg * k
        torch.testing.assert_close(gx, ref, **GRAD_TOL[torch.float32])
    # the stages compose to the fused op (what a synced multi-GPU variant will do)
    fused = tr.triton_bn_relu_route(x, route, w, b, None, None, True, 1e-5, False, True)
    torch.testing.assert_close(fused[0], y, **TOL[torch.float32])
    gx_fused, gw, gb = tr.triton_bn_relu_route_backward(g, x, route, w, b, fused[1], fused[2],
                                                        fused[4], True, False, [True, True, True])
    gx = tr.triton_backward_apply(g, x, route, mean, invstd, w, b, sum_dy, sum_dy_xmu, count, True, False)
    torch.testing.assert_close(gx_fused, gx, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(gw, sum_dy_xmu * invstd, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(gb, sum_dy, **GRAD_TOL[torch.float32])


def test_backward_output_mask(path):
    x, g, route, w, b = _stage_inputs((3, 4, 2, 3), False, "sample")
    tr = torch.ops.taskrouting
    _, mean, invstd, _, count = tr.triton_bn_relu_route(x, route, w, b, None, None, True, 1e-5, False, False)
    for training in (True, False):
        full = tr.triton_bn_relu_route_backward(g, x, route, w, b, mean, invstd, count, training, False,
                                                [True, True, True])
        for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
            out = tr.triton_bn_relu_route_backward(g, x, route, w, b, mean, invstd, count, training,
                                                   False, mask)
            for want, o, f in zip(mask, out, full):
                if want:
                    torch.testing.assert_close(o, f, **GRAD_TOL[torch.float32])
                else:
                    assert o.numel() == 0
    w16 = w.half()
    out = tr.triton_bn_relu_route_backward(g, x, route, w16, b.half(), mean, invstd, count, True, False,
                                           [False, True, True])
    assert out[1].dtype == torch.float16 and out[2].dtype == torch.float16


# ----------------------------------------------------------------------------- opcheck / errors
def test_opcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 2)
    g = torch.randn(2, 3, 2, 2)
    route = torch.tensor([True, False, True])
    route2 = torch.tensor([[True, False, True], [False, False, True]])
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.zeros(3), torch.ones(3)
    mean, var, count = torch.zeros(3), torch.ones(3), torch.full((3,), 8.0)
    invstd = torch.rsqrt(var + 1e-5)
    tr = torch.ops.taskrouting
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    checks = [
        (tr.triton_bn_relu_route.default, (xg, route, wg, bg, rm, rv, True, 1e-5, False, True)),
        (tr.triton_bn_relu_route.default, (xg, route2, wg, None, rm, rv, False, 1e-5, False, False)),
        (tr.triton_bn_relu_route_backward.default,
         (g, x, route, w, b, mean, invstd, count, True, False, [True, True, True])),
        (tr.triton_channel_stats.default, (x, route2, True, False)),
        (tr.triton_normalize_relu_route.default, (x, route, mean, invstd, w, b)),
        (tr.triton_backward_reduce.default, (g, x, route, mean, invstd, w, b)),
        (tr.triton_backward_apply.default,
         (g, x, route, mean, invstd, w, b, mean, mean, count, True, True)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                    "test_faketensor"))
    torch.library.opcheck(checks[0][0], checks[0][1], test_utils=("test_aot_dispatch_dynamic",))


def test_torch_compile_fullgraph():
    """No graph break through the public op (aot_eager: no C++ compiler needed)."""
    masks = _masks(6)

    def f(x, w, b, rm, rv):
        return ops.bn_relu_route(x, masks, 1, w, b, rm, rv, backend="triton")

    x = torch.randn(3, 6, 2, 2, requires_grad=True)
    w, b = torch.rand(6, requires_grad=True), torch.randn(6, requires_grad=True)
    rm, rv, rm2, rv2 = torch.zeros(6), torch.ones(6), torch.zeros(6), torch.ones(6)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b, rm, rv)
    y.sum().backward()
    torch.testing.assert_close(y, f(x, w, b, rm2, rv2))
    torch.testing.assert_close((rm, rv), (rm2, rv2))


def test_bad_inputs():
    tr = torch.ops.taskrouting
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="route"):
        tr.triton_channel_stats(x, torch.ones(4, dtype=torch.bool), False, True)
    with pytest.raises(TypeError, match="route"):
        tr.triton_channel_stats(x, torch.ones(3), False, True)
    with pytest.raises(TypeError, match="float"):
        tr.triton_channel_stats(x.double(), torch.ones(3, dtype=torch.bool), False, True)
    with pytest.raises(ValueError, match="running_mean"):
        tr.triton_bn_relu_route(x, torch.ones(3, dtype=torch.bool), None, None, None, None, False, 1e-5,
                                False, False)
    with pytest.raises(ValueError, match="weight"):
        tr.triton_normalize_relu_route(x, torch.ones(3, dtype=torch.bool), torch.zeros(3), torch.ones(3),
                                       torch.ones(4), None)
    with pytest.raises(TypeError, match="float64"):
        ops.bn_relu_route(x.double(), _masks(3), 0, backend="triton")
