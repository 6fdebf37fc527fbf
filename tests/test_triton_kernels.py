"""What only the Triton backend has: the interpreter (it really runs, in-bounds and address checks, compiled
and interpreted copies, an sm_90 offline compile), the split path with several chunks and the int64-offset
path, and on a CUDA GPU the compiled kernels on realistic and huge shapes (``gpu`` marker). The op's behaviour
on this backend is checked by the conformance suite (test_bn_relu_route.py, targets ``triton_interp`` and
``triton_cuda``).

Interpreter notes.

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

import math
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import numpy as np  # noqa: E402
from op_cases import check_large_tensor, compare, make_case  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from taskrouting import ops  # noqa: E402
from taskrouting.nn.masks import make_masks  # noqa: E402
from taskrouting.ops.route import select_route  # noqa: E402

pytestmark = pytest.mark.usefixtures("in_bounds")
T = pytest.importorskip("taskrouting.ops.triton.ops")
from taskrouting.ops.triton import kernels  # noqa: E402


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
        x, None, None, training=True)) * route.view(1, -1, 1), rtol=2e-4, atol=1e-4)


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
ptr = lambda fn: dict((a, "*fp32") for a in fn.arg_names if a.endswith("_ptr"))
def build(fn, sig, consts, warps=8):
    sig = dict(sig)
    sig.update({c: "constexpr" for c in consts})
    sig = {a: sig[a] for a in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})
ints = lambda n: dict((a, "i32") for a in n)
try:
    fn = k.normalize.fused_forward_kernel
    for residual in (False, True):  # bn_relu_route, bn_add_relu_route
        build(fn, {**ptr(fn), "x_ptr": "*bf16", "res_ptr": "*bf16", "y_ptr": "*bf16", "route_ptr": "*u8",
                   **ints(["N", "C", "HW", "route_sn"]), "eps": "fp32"},
              dict(ROUTED=False, SKIP_UNUSED=True, HAS_W=True, HAS_B=True, HAS_RESIDUAL=residual, **geo), 16)
    fn = k.stats.channel_stats_kernel
    build(fn, {**ptr(fn), "x_ptr": "*fp16", "route_ptr": "*u8", "used_ptr": "*u8",
               **ints(["N", "C", "HW", "route_sn", "Tp", "T", "TPC", "P"]), "eps": "fp32"},
          dict(ROUTED=True, SKIP_UNUSED=True, FINAL=False, WRITE_INVSTD=False, **geo))
    fn = k.backward.fused_backward_kernel
    for gate in (0, 1):  # the pre-activation (bn_relu_route), the saved output y (bn_add_relu_route)
        build(fn, {**ptr(fn), "route_ptr": "*u8", **ints(["N", "C", "HW", "route_sn"])},
              dict(HAS_W=True, HAS_B=False, TRAINING=True, ROUTED=False, WRITE_GX=True, WRITE_GW=True,
                   WRITE_GB=True, GATE=gate, WRITE_GR=gate == 1, **geo), 16)
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


# ----------------------------------------------------------------------------- the split path
def _compare(shape, channels_last=False, dtype=torch.float32, per_sample=False, stats="batch", training=True,
             **kw):
    case = make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample, **kw)
    return compare("triton", case, training, stats)


SPLIT_CASES = [
    # shape, channels_last, dtype, per_sample, stats, training
    ((3, 5, 4, 3), False, torch.float32, False, "batch", True),
    ((3, 5, 4, 3), True, torch.float32, True, "batch", True),
    ((3, 5, 4, 3), False, torch.float32, True, "routed", True),
    ((3, 5, 4, 3), True, torch.float32, False, "routed", True),
    ((3, 5, 4, 3), True, torch.float32, True, "batch", False),
    ((3, 5, 4, 3), False, torch.bfloat16, False, "batch", True),
    ((5, 3), False, torch.float32, True, "batch", True),
    ((2, 3, 2, 2, 3), True, torch.float16, True, "routed", True),
]


@pytest.mark.parametrize("shape,channels_last,dtype,per_sample,stats,training", SPLIT_CASES)
def test_matches_reference_split(split, shape, channels_last, dtype, per_sample, stats, training):
    _compare(shape, channels_last, dtype, per_sample, stats, training)


@pytest.mark.parametrize("what", ["sharing-0", "sharing-1", "one-channel", "no-affine", "no-running-stats",
                                  "half-params", "empty-batch", "zero-variance"])
def test_split_edge_cases(split, what):
    if what == "sharing-0":
        _compare((3, 6, 3, 2), per_sample=True, sharing_ratio=0.0, num_tasks=3)
    elif what == "sharing-1":
        _compare((3, 6, 3, 2), channels_last=True, stats="routed", sharing_ratio=1.0)
    elif what == "one-channel":
        _compare((3, 1, 2, 3), sharing_ratio=1.0, num_tasks=1)
        _compare((3, 1, 2, 3), channels_last=True, per_sample=True, training=False, sharing_ratio=1.0, num_tasks=2)
    elif what == "no-affine":
        _compare((3, 5, 2, 3), affine=False)
        _compare((3, 5, 2, 3), channels_last=True, per_sample=True, affine=False, training=False)
    elif what == "no-running-stats":
        compare("triton", make_case((3, 5, 2, 3), per_sample=True), True, "batch", track=False)
    elif what == "half-params":
        case = make_case((3, 4, 2, 3), dtype=torch.float16)
        for key in ("weight", "bias", "running_mean", "running_var"):
            case[key] = case[key].half()
        compare("triton", case, True, "batch")
    elif what == "empty-batch":
        for training in (True, False):
            _compare((0, 4, 3, 2), training=training)
    else:
        case = make_case((3, 4, 2, 3))
        case["x"][:, 1] = 2.5
        compare("triton", case, True, "batch")


def test_int64_offsets_path(monkeypatch, path):
    """Force the int64-offset kernels (used for >= 2^31 elements) on a tiny tensor."""
    monkeypatch.setattr(T, "_INT32_LIMIT", 16)
    _compare((3, 5, 4, 3), per_sample=True)
    _compare((3, 5, 4, 3), channels_last=True, stats="routed")
    _compare((3, 5, 4, 3), channels_last=True, training=False)


def test_rejects_float64():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float"):
        torch.ops.taskrouting.triton_channel_stats(x, torch.ones(3, dtype=torch.bool), False, True)
    with pytest.raises(TypeError, match="float64"):
        ops.bn_relu_route(x, _masks(3), 0, backend="triton")


# ----------------------------------------------------------------------------- masked data never read
def _nan_masked(x, route):
    """x with NaN wherever the route says a (sample, channel) is not used."""
    r = route if route.dim() == 2 else route.expand(x.shape[0], -1)
    r = r.reshape(r.shape + (1,) * (x.dim() - 2)).expand_as(x)
    return x.masked_fill(~r, float("nan"))


@pytest.mark.parametrize("cl", [False, True])
def test_unrouted_entries_never_read(path, cl):
    """NaN in every (sample, channel) that is not routed (eval, routed training), or in the channels no sample
    uses (batch-statistics training), must not reach any output."""
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


# ----------------------------------------------------------------------------- compiled, on a GPU
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (8, 32, 8, 8), (2, 3, 256, 256), (1024, 256),
                                   (4, 16, 8, 16, 16), (64, 512, 7, 7)], ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("_", [pytest.param(None, marks=gpu, id="gpu")])
def test_realistic_shapes_on_gpu(_, shape, cl, dtype):
    for per_sample, stats, training in ((False, "batch", True), (True, "routed", True), (True, "batch", False)):
        case = make_case(shape, dtype=dtype, channels_last=cl, per_sample=per_sample, num_tasks=4, device="cuda")
        compare("triton", case, training, stats)


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("_", [pytest.param(None, marks=gpu, id="gpu")])
def test_split_fills_the_gpu(_):
    """Few channels, many pixels: the reduction is split over many chunks per channel."""
    x = torch.randn(2, 3, 512, 512, device="cuda")
    p = T._Problem(x, torch.ones(3, dtype=torch.bool, device="cuda"), "test")
    assert p.fused_plan() is None
    plan = p.split_plan()
    assert plan.P * plan.CB >= 2 * torch.cuda.get_device_properties(0).multi_processor_count
    compare("triton", make_case((2, 3, 512, 512), device="cuda"))


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("cl", [pytest.param(False, marks=gpu, id="nchw"), pytest.param(True, marks=gpu, id="cl")])
def test_more_than_2_31_elements(cl):
    """int64 offsets: bf16 x with more than 2^31 elements; checks the stats and the tail of y / grad_x."""
    if torch.cuda.mem_get_info()[0] / 2 ** 30 < 24:
        pytest.skip("needs ~24 GB of free GPU memory")
    shape = (2, 8, 2 ** 13, 2 ** 14 + 1) if cl else (1, 2, 2 ** 30 + 4096)
    assert math.prod(shape) > 2 ** 31
    x = _layout(torch.empty(shape, device="cuda", dtype=torch.bfloat16), cl)
    x.normal_().add_(0.5)
    tr = torch.ops.taskrouting
    check_large_tensor(x, tr.triton_bn_relu_route, tr.triton_bn_relu_route_backward, cl)


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("_", [pytest.param(None, marks=gpu, id="gpu")])
def test_bandwidth_report(_):
    """Not a pass/fail benchmark: prints effective GB/s (bytes the op must move / time); run with -s."""
    for shape, cl in (((64, 256, 56, 56), False), ((64, 256, 56, 56), True), ((2, 3, 1024, 1024), False)):
        x = _layout(torch.randn(shape, device="cuda", dtype=torch.float16), cl)
        C = shape[1]
        route = torch.ones(C, dtype=torch.bool, device="cuda")
        w, b = torch.ones(C, device="cuda"), torch.zeros(C, device="cuda")
        fwd = lambda: torch.ops.taskrouting.triton_bn_relu_route(x, route, w, b, None, None, True, 1e-5, False, False)
        _, mean, invstd, _, count = fwd()
        g = torch.randn_like(x)
        bwd = lambda: torch.ops.taskrouting.triton_bn_relu_route_backward(
            g, x, route, w, b, mean, invstd, count, True, False, [True, True, True])
        for name, fn, passes in (("fwd", fwd, 3), ("bwd", bwd, 5)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 20
            gbs = passes * x.numel() * x.element_size() / ms / 1e6
            print(f"{name} {shape} cl={cl}: {ms * 1e3:.1f} us, {gbs:.0f} GB/s (x{passes} tensor passes)")
            assert math.isfinite(gbs)


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("_", [pytest.param(None, marks=gpu, id="gpu")])
def test_route_selection_on_gpu(_):
    """Per-sample routes selected on the GPU through the public op."""
    masks = make_masks(3, 8, 0.5, torch.Generator().manual_seed(0)).to("cuda")
    route = select_route(masks, torch.tensor([0, 1, 2, 1], device="cuda"), 4, torch.device("cuda"))
    assert route.shape == (4, 8)
    compare("triton", make_case((4, 8, 5, 5), per_sample=True, num_tasks=3, device="cuda"), True, "routed")
