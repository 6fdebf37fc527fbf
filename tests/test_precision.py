"""Mixed precision and channels_last in training: ``--amp bf16`` and ``--channels-last``."""
import pytest
import torch

from taskrouting import BNReLURoute2d
from taskrouting.cli import main
from taskrouting.data import load_dataset
from taskrouting.training import TrainConfig, build_model, fit


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_tasks=3, num_samples=200, image_size=16, num_factors=4, seed=2)


def test_bf16_channels_last_keeps_the_fused_layer_in_the_autocast_graph(data):
    model = build_model("vgg11", data.num_tasks, 0.5, width_mult=0.125, in_channels=data.image_shape[0])
    seen = []
    for m in model.modules():
        if isinstance(m, BNReLURoute2d):
            m.register_forward_hook(lambda mod, args, out: seen.append(
                (args[0].dtype, out.dtype, args[0].is_contiguous(memory_format=torch.channels_last))))
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05, momentum=0.9, amp="bf16", channels_last=True)
    results = fit(model, data, config, progress=False, log=lambda *_: None)
    # The fused layers take the convolutions' bf16 output as is (no cast around them) in channels_last.
    assert seen and all(dtype_in == dtype_out == torch.bfloat16 and cl for dtype_in, dtype_out, cl in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    losses = [h["loss"] for h in results["history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert results["means"]["accuracy"] > 0


def test_amp_is_checked():
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="int8")


def test_cli_rejects_an_unknown_amp(capsys):
    assert main(["train", "--data", "digits", "--amp", "fp8"]) == 2
    assert "--amp" in capsys.readouterr().err
