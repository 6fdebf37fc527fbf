"""The core installs with torch and numpy alone: the layer works without the extras, and a command that
needs a missing extra says which one to install."""
import subprocess
import sys
import textwrap

import pytest

from taskrouting.extras import MissingExtraError, require

BLOCK_EXTRAS = ("import sys\nfor name in ('sklearn', 'tqdm', 'matplotlib', 'PIL', 'triton'):\n"
                "    sys.modules[name] = None\n")


def run_without_extras(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_EXTRAS + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_require_names_the_extra():
    assert require("math", "train", "x").sqrt(4.0) == 2.0
    with pytest.raises(MissingExtraError, match=r"digits needs no_such_module.*pip install 'taskrouting\[train\]'"):
        require("no_such_module.sub", "train", "digits")


def test_layer_and_models_work_without_extras():
    result = run_without_extras("""
        import torch
        import taskrouting as tr
        layer = tr.BNReLURoute2d(8, num_tasks=3, sharing_ratio=0.5, seed=0)
        layer.active_task = 1
        y = layer(torch.randn(4, 8, 5, 5))
        y.sum().backward()
        model = tr.models.vgg11_bn(3, width_mult=0.125)
        tr.set_active_task(model, 2)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2,)
        from taskrouting.training.batches import progress_bar
        with progress_bar(3, "x", True) as bar:
            bar.update()
        print("ok", "tqdm" in sys.modules and sys.modules["tqdm"] is not None)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "False"]


def test_command_that_needs_a_missing_extra_says_which():
    result = run_without_extras("""
        from taskrouting.cli import main
        sys.exit(main(["train", "--data", "digits", "--epochs", "1"]))
    """)
    assert result.returncode != 0
    assert "pip install 'taskrouting[train]'" in result.stderr
    assert "Traceback" not in result.stderr
