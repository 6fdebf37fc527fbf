"""What only the C++ CPU backend has: the extension is built, and outputs above a size are written with
non-temporal (streaming) stores. Its behaviour as a backend is checked by the conformance suite
(test_bn_relu_route.py, target ``cpu``)."""
import os

import pytest
import torch
from op_cases import make_case, run

from taskrouting import ops
from taskrouting.ops import extension

needs_kernels = pytest.mark.skipif(not ops.NATIVE_KERNELS.get("cpu"), reason="the CPU kernels are not built")


def test_extension_is_built():
    if os.environ.get("TASKROUTING_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("TASKROUTING_ALLOW_NO_EXTENSION=1")
    assert extension.loaded(), extension.LOAD_ERROR
    assert "cpu" in ops.available_backends("cpu")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_streaming_stores_write_the_same_outputs(monkeypatch, dtype, channels_last, training):
    """Outputs above TASKROUTING_STREAM_MIN_BYTES are written with non-temporal stores (0: all
    of them): bit for bit what normal stores write, with unaligned planes and rows too."""
    for shape, per_sample in (((4, 6, 5, 7), False), ((3, 37), True), ((2, 20, 9, 9), True)):
        case = make_case(shape, dtype=dtype, channels_last=channels_last, per_sample=per_sample)
        monkeypatch.setenv("TASKROUTING_STREAM_MIN_BYTES", str(2 ** 62))
        normal = run("cpu", case, training=training)
        monkeypatch.setenv("TASKROUTING_STREAM_MIN_BYTES", "0")
        streamed = run("cpu", case, training=training)
        for name, value in normal.items():
            assert torch.equal(streamed[name], value), name


@needs_kernels
def test_large_output_streams_by_default(monkeypatch):
    """An 8 MiB output takes the streaming path with the default threshold: same bits, and
    the reference's output (its sums over 2^18 values per channel differ in the last bits)."""
    monkeypatch.delenv("TASKROUTING_STREAM_MIN_BYTES", raising=False)
    case = make_case((8, 64, 64, 64), seed=2)
    streamed = run("cpu", case)
    monkeypatch.setenv("TASKROUTING_STREAM_MIN_BYTES", str(2 ** 62))
    normal = run("cpu", case)
    for name, value in normal.items():
        assert torch.equal(streamed[name], value), name
    torch.testing.assert_close(streamed["y"], run("reference", case)["y"], rtol=1e-5, atol=1e-5)
