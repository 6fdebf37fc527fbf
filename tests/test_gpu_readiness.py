"""GPU readiness (issue 10): output strides, misaligned inputs, > 2^31-element planes, host syncs.

Every test runs on each backend available here: ``reference`` and ``cpu`` on CPU tensors,
``triton`` on CPU tensors through the interpreter, and ``cuda`` / ``triton`` on a GPU (skipped
without one). What only a GPU can show (a real 2^31-element plane, CUDA-graph capture) is
marked ``gpu`` and skips cleanly; the CPU-visible half of each defect is checked here too: the
Triton tile offsets through the interpreter, the strides of every backend against its fake
kernel, and the host reads of the task check counted as ``aten._local_scalar_dense`` calls.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from taskrouting import ops
from taskrouting.nn import BNReLURoute2d, TaskRouter, set_active_task
from taskrouting.nn.masks import make_masks
from taskrouting.ops.backends import TRITON_INSTALLED, family_op
from taskrouting.ops.route import select_route

CUDA = torch.cuda.is_available()
TARGETS = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
           ("reference", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]


@pytest.fixture(params=TARGETS, ids=[f"{b}-{d}" for b, d in TARGETS])
def target(request, monkeypatch):
    """``(backend, device)``; Triton runs interpreted on CPU tensors and compiled on CUDA ones."""
    backend, device = request.param
    if device == "cuda" and not CUDA:
        pytest.skip("needs a CUDA GPU")
    if backend == "triton":
        if not TRITON_INSTALLED:
            pytest.skip("triton is not installed")
        if device == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if backend not in ops.available_backends(device):
        pytest.skip(f"backend {backend!r} is not available for {device} tensors")
    return backend, device


def _family(backend: str) -> str | None:
    return ops.BACKENDS[backend].family


# ----------------------------------------------------------------------------- layouts
def _layouts(device):
    """Inputs of every kind of layout: the two kernel layouts, dense permutations, non-dense views."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g).to(device)

    return {
        "contiguous": randn(3, 6, 5, 4),
        "channels_last": randn(3, 6, 5, 4).contiguous(memory_format=torch.channels_last),
        "transpose23": randn(3, 6, 4, 5).transpose(2, 3),
        "c_between": randn(3, 5, 6, 4).transpose(1, 2),
        "non_dense": randn(3, 6, 5, 8)[..., ::2],
        "channels_last_non_dense": randn(3, 6, 6, 4).contiguous(memory_format=torch.channels_last)[:, :, 1:],
        "channels_last_1d": randn(3, 5, 6).transpose(1, 2),
        "transpose_3d": randn(2, 6, 2, 3, 4).transpose(2, 4),
    }


LAYOUTS = list(_layouts("cpu"))


def _fake_outputs(op, *args):
    """The outputs of ``op``'s fake kernel for real ``args`` (the metadata torch.compile trusts)."""
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return op(*fake)


def _params(C, device):
    g = torch.Generator().manual_seed(1)
    return (torch.rand(C, generator=g).add(0.5).to(device), torch.randn(C, generator=g).to(device))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strides_match_fake_kernels(target, layout):
    """y and grad_x have the strides of the fake kernels for every input layout, and the right values."""
    backend, device = target
    x = _layouts(device)[layout]
    C = x.shape[1]
    masks = make_masks(3, C, 0.5, torch.Generator().manual_seed(2)).to(device)
    route = select_route(masks, 1, x.shape[0], x.device)
    w, b = _params(C, device)
    native = family_op("native", "bn_relu_route")
    fake_y = _fake_outputs(native, x, route, w, b, None, None, True, 1e-5, False, False)[0]
    fake_gx = _fake_outputs(family_op("native", "bn_relu_route_backward"), torch.ones_like(x), x, route, w, b,
                            fake_y.new_ones(C), fake_y.new_ones(C), fake_y.new_ones(C), True, False,
                            [True, True, True])[0]

    xr = x.detach().requires_grad_()
    y = ops.bn_relu_route(xr, masks, 1, w, b, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(device)
    (gx,) = torch.autograd.grad(y, xr, gy)
    assert y.stride() == fake_y.stride(), f"y: {y.stride()} vs fake {fake_y.stride()}"
    assert gx.stride() == fake_gx.stride(), f"grad_x: {gx.stride()} vs fake {fake_gx.stride()}"

    xc = x.detach().contiguous().requires_grad_()
    want = ops.bn_relu_route(xc, masks, 1, w, b, backend="reference")
    (want_gx,) = torch.autograd.grad(want, xc, gy)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, want_gx, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["transpose23", "channels_last_1d", "non_dense"])
def test_stage_op_strides_match_fake_kernels(target, layout):
    """The stage ops that return an x-shaped tensor agree with their fake kernels too."""
    backend, device = target
    family = _family(backend)
    if family is None:
        pytest.skip("the reference path has no stage ops")
    x = _layouts(device)[layout]
    C = x.shape[1]
    route = torch.ones(C, dtype=torch.bool, device=device)
    mean, invstd = torch.zeros(C, device=device), torch.ones(C, device=device)
    w, b = _params(C, device)
    normalize = family_op(family, "normalize_relu_route")
    args = (x, route, mean, invstd, w, b)
    assert normalize(*args).stride() == _fake_outputs(normalize, *args).stride()
    apply = family_op(family, "backward_apply")
    args = (torch.ones_like(x), x, route, mean, invstd, w, b, mean, mean, invstd, True, False)
    assert apply(*args).stride() == _fake_outputs(apply, *args).stride()


def test_compile_fullgraph_permuted_input(target):
    """torch.compile(fullgraph=True) of the op on a dense permuted input: inductor asserts the
    fake kernel's strides on the real outputs (it failed there before the strides agreed)."""
    backend, device = target
    torch._dynamo.reset()
    x = _layouts(device)["transpose23"]
    C = x.shape[1]
    masks = make_masks(3, C, 0.5, torch.Generator().manual_seed(2)).to(device)
    w, b = _params(C, device)

    def step(x, w, b):
        y = ops.bn_relu_route(x, masks, 2, w, b, backend=backend)
        return y * 2

    params = [t.detach().requires_grad_() for t in (x, w, b)]
    compiled = torch.compile(step, fullgraph=True)
    # a cached graph would carry the strides of an earlier fake kernel, and its assertion with them
    with torch._inductor.config.patch(force_disable_caches=True):
        got = compiled(*params)
        got.sum().backward()
    eager = [t.detach().requires_grad_() for t in (x, w, b)]
    want = step(*eager)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for p, q in zip(params, eager):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- misaligned inputs
@pytest.mark.parametrize("channels_last", [False, True], ids=["planes", "rows"])
def test_misaligned_input(target, channels_last):
    """x starting one element past an aligned address (no vector path may assume alignment)."""
    backend, device = target
    shape = (3, 8, 6, 6)
    base = torch.randn(math.prod(shape) + 1, generator=torch.Generator().manual_seed(4)).to(device)
    if channels_last:
        n, c, h, w_ = shape
        x = base.as_strided(shape, (h * w_ * c, 1, w_ * c, c), storage_offset=1)
    else:
        x = base[1:].view(shape)
    assert x.storage_offset() == 1
    masks = make_masks(3, shape[1], 0.5, torch.Generator().manual_seed(2)).to(device)
    w, b = _params(shape[1], device)
    xr = x.detach().requires_grad_()
    y = ops.bn_relu_route(xr, masks, 0, w, b, backend=backend)
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device)
    (gx,) = torch.autograd.grad(y, xr, gy)
    xc = x.detach().contiguous().requires_grad_()
    want = ops.bn_relu_route(xc, masks, 0, w, b, backend="reference")
    (want_gx,) = torch.autograd.grad(want, xc, gy)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, want_gx, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- > 2^31-element planes
def _interpreted_tile_probe():
    """A one-program kernel that writes the offsets and mask ``tile_offsets`` gives one tile."""
    import triton
    import triton.language as tl

    from taskrouting.ops.triton import kernels

    global _tile_offsets  # a jitted kernel finds the functions it calls among its module's globals
    _tile_offsets = kernels(interpret=True).stats.tile_offsets
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # triton.jit picks the mode when it decorates
    try:
        @triton.jit
        def probe(off_ptr, valid_ptr, t, Tp, N, C, HW, CL: tl.constexpr, BN: tl.constexpr,
                  BP: tl.constexpr, BC: tl.constexpr, BIG: tl.constexpr):
            off, valid, n3, c3 = _tile_offsets(t, Tp, N, C, HW, 0, CL, BN, BP, BC, BIG)
            i = (tl.arange(0, BN)[:, None, None] * BP + tl.arange(0, BP)[None, :, None]) * BC \
                + tl.arange(0, BC)[None, None, :]
            tl.store(off_ptr + i, off.to(tl.int64))
            tl.store(valid_ptr + i, valid.to(tl.int8))
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
    return probe


@pytest.mark.skipif(not TRITON_INSTALLED, reason="triton is not installed")
@pytest.mark.parametrize("channels_last", [False, True], ids=["planes", "rows"])
def test_triton_tile_offsets_past_2_31(channels_last):
    """The last tile of a (1, 1, 2^31 + 3) plane starts at 2^31: its offsets must not wrap to
    negative values (which pass ``p < HW`` and address 8 GiB before x) nor lose the tail."""
    probe = _interpreted_tile_probe()
    HW, BP = 2 ** 31 + 3, 4
    Tp = -(-HW // BP)
    off = torch.zeros(BP, dtype=torch.int64)
    valid = torch.zeros(BP, dtype=torch.int8)
    probe[(1,)](off, valid, Tp - 1, Tp, 1, 1, HW, CL=channels_last, BN=1, BP=BP, BC=1, BIG=True)
    start = (Tp - 1) * BP
    assert off.tolist() == [start + i for i in range(BP)]
    assert valid.tolist() == [int(start + i < HW) for i in range(BP)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_plane_past_2_31_elements(backend, monkeypatch):
    """A (1, 1, 2^31 + 3) bf16 plane: odd length, one channel, last tile past 2^31."""
    from op_cases import check_large_tensor

    if backend not in ops.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip("needs ~24 GB of free GPU memory")
    x = torch.empty((1, 1, 2 ** 31 + 3), device="cuda", dtype=torch.bfloat16).normal_().add_(0.5)
    prefix = "triton_" if backend == "triton" else ""
    tr = torch.ops.taskrouting
    check_large_tensor(x, getattr(tr, prefix + "bn_relu_route"), getattr(tr, prefix + "bn_relu_route_backward"),
                       False)


# ----------------------------------------------------------------------------- host reads of the task
class _HostReads(TorchDispatchMode):
    """Counts the reads of tensor values on the host: ``aten._local_scalar_dense`` (``item``,
    ``int()``) through the dispatcher, ``Tensor.tolist`` (which bypasses it) by a patch."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted(t):
            self.count += 1
            return tolist(t)
        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _routed_model(backend, device, tasks=3, C=4):
    return torch.nn.Sequential(
        BNReLURoute2d(C, num_tasks=tasks, seed=0, backend=backend),
        TaskRouter(C, num_tasks=tasks, seed=1),
        BNReLURoute2d(C, num_tasks=tasks, seed=2, backend=backend),
    ).to(device)


def test_routed_layers_read_no_task_ids(target, monkeypatch):
    """A per-sample task set with set_active_task is read once there; the routed layers' forward
    and backward read nothing from the device (before: one ``.tolist()`` sync per layer)."""
    backend, device = target
    model = _routed_model(backend, device)
    x = torch.randn(3, 4, 5, 5, device=device, requires_grad=True)
    set_active_task(model, torch.tensor([0, 2, 1], device=device))
    with _HostReads(monkeypatch) as reads:
        model(x).sum().backward()
    assert reads.count == 0


def test_task_tensor_passed_to_layers_read_once(target, monkeypatch):
    backend, device = target
    model = _routed_model(backend, device)
    x = torch.randn(3, 4, 5, 5, device=device)
    task = torch.tensor([1, 1, 0], device=device)
    with _HostReads(monkeypatch) as reads:
        for layer in model:
            x = layer(x, task=task)
    assert reads.count == 1


def test_out_of_range_task_ids_still_raise(target):
    backend, device = target
    model = _routed_model(backend, device)
    x = torch.randn(3, 4, 5, 5, device=device)
    with pytest.raises(IndexError, match=r"task ids must be in \[0, 3\), got values in \[0, 3\]"):
        model[0](x, task=torch.tensor([0, 3, 1], device=device))
    set_active_task(model, torch.tensor([0, -1, 1], device=device))
    with pytest.raises(IndexError, match=r"task ids must be in \[0, 3\)"):
        model(x)
    set_active_task(model, torch.tensor(3, device=device))
    with pytest.raises(IndexError, match="task 3 is out of range for 3 tasks"):
        model(x)


def test_task_changed_in_place_is_checked_again(target):
    """The bounds read at set_active_task belong to that version of the tensor: an in-place
    change is read and checked again."""
    backend, device = target
    model = _routed_model(backend, device)
    x = torch.randn(3, 4, 5, 5, device=device)
    task = torch.tensor([0, 1, 2], device=device)
    set_active_task(model, task)
    model(x)
    task[1] = 7
    with pytest.raises(IndexError, match=r"got values in \[0, 7\]"):
        model(x)
    task.fill_(1)
    torch.testing.assert_close(model(x), _with_task(model, x, 1))


def _with_task(model, x, task):
    out = x
    for layer in model:
        out = layer(out, task=task)
    return out


@pytest.mark.gpu
def test_cuda_graph_capture_of_routed_layers(target):
    """With the task set beforehand, a forward of routed layers is capturable in a CUDA graph,
    and replays follow new ids copied into the captured task tensor."""
    backend, device = target
    if device != "cuda":
        pytest.skip("CUDA-graph capture needs a CUDA GPU")
    model = _routed_model(backend, device).eval()
    static_x = torch.randn(3, 4, 5, 5, device=device)
    static_task = torch.tensor([0, 1, 2], device=device)
    set_active_task(model, static_task)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # warm-up outside the capture (Triton compiles, cuDNN picks)
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = model(static_x)
    for ids in ([2, 2, 0], [1, 0, 1]):
        static_x.copy_(torch.randn_like(static_x))
        static_task.copy_(torch.tensor(ids, device=device))
        graph.replay()
        with torch.no_grad():
            want = _with_task(model, static_x, torch.tensor(ids, device=device))
        torch.testing.assert_close(static_y, want)
