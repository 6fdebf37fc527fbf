"""The command answers every ordinary mistake with one line on stderr and exit status 2, no traceback
(issue 14, item 8); a diverged run exits 1."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_data import make_zappos

from taskrouting.cli import main

TINY = ["--width-mult", "0.0625", "--pool-size", "1", "--embedding-dim", "8", "--epochs", "1", "--no-progress",
        "--data-arg", "image_size=8"]
SMALL = ["--data", "synthetic", "--data-arg", "num_tasks=3", "--data-arg", "num_samples=40", "--data-arg",
         "image_size=8", "--width-mult", "0.0625", "--pool-size", "1", "--embedding-dim", "8", "--epochs", "1",
         "--no-progress"]


def one_line_error(capsys, *words):
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


MISTAKES = [
    (["--device", "bogus"], ["--device", "'bogus'"]),
    (["--device", "mps"], ["--device", "cpu or cuda"]),
    (["--backend", "nope"], ["--backend", "'nope'"]),
    (["--threads", "-2"], ["--threads", "-2"]),
    (["--threads", "x"], ["--threads"]),
    (["--seed", str(2 ** 70)], ["--seed", "2**32"]),
    (["--seed", "-1"], ["--seed"]),
    (["--lr", "inf"], ["--lr", "finite"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--momentum", "nan"], ["--momentum", "finite"]),
    (["--weight-decay", "-1"], ["--weight-decay", ">= 0"]),
    (["--width-mult", "inf"], ["--width-mult", "finite"]),
    (["--sharing-ratio", "2"], ["--sharing-ratio", "[0, 1]"]),
    (["--sharing-ratio", "nan"], ["--sharing-ratio"]),
    (["--workers", "-1"], ["--workers"]),
    (["--batch-size", "1"], ["--batch-size"]),
    (["--epochs", "-1"], ["--epochs"]),
    (["--data-arg", "image_size=0"], ["image_size", ">= 1"]),
    (["--data-arg", "test_every=0"], ["test_every", ">= 2"]),
    (["--data-arg", "x=inf"], ["--data digits", "'x'"]),
    (["--data-arg", "novalue"], ["--data-arg", "KEY=VALUE"]),
    (["--tasks", "digit_1,digit_1"], ["duplicate task name 'digit_1'"]),
    (["--tasks", "nope"], ["no task 'nope'"]),
    (["--eval-split", "val"], ["no 'val' split"]),
    (["--bn-eval", "x"], ["--bn-eval"]),
]


@pytest.mark.parametrize("flags, words", MISTAKES, ids=[" ".join(f) for f, _ in MISTAKES])
def test_train_mistakes(flags, words, capsys):
    assert main(["train", "--data", "digits", *TINY, *flags]) == 2
    one_line_error(capsys, "taskrouting train: error:", *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(capsys):
    assert main(["train", *TINY, "--device", "cuda"]) == 2
    one_line_error(capsys, "--device", "CUDA is not available")
    assert main(["train", *TINY, "--backend", "cuda"]) == 2
    one_line_error(capsys, "--backend", "'cuda' cannot run on --device cpu")


def test_out_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", *TINY, "--out", str(tmp_path / "file")]) == 2
    one_line_error(capsys, "--out", "is a file")
    assert main(["train", *TINY, "--out", str(tmp_path / "file" / "below")]) == 2
    one_line_error(capsys, "--out", "is a file")
    assert not (tmp_path / "file" / "below").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_without_permission(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["train", *TINY, "--out", str(locked / "run")]) == 2
    one_line_error(capsys, "--out", "permission denied")


@pytest.mark.parametrize("content, words", [(b"", ["empty"]), (b"garbage" * 5, ["not a taskrouting checkpoint"])])
def test_bad_checkpoints(tmp_path, capsys, content, words):
    (tmp_path / "checkpoint.pt").write_bytes(content)
    assert main(["train", *SMALL, "--out", str(tmp_path), "--resume"]) == 2
    one_line_error(capsys, "checkpoint", *words)


def test_sweep_rejects_sharing_ratio_outside_0_1(capsys):
    assert main(["sweep", *SMALL, "--sharing-ratios", "0.5,2"]) == 2
    one_line_error(capsys, "--sharing-ratios", "'2'")
    assert main(["sweep", *SMALL, "--tasks", "0,2"]) == 2
    one_line_error(capsys, "--tasks")


def test_data_arg_inf_is_a_number(capsys):
    assert main(["train", *SMALL, "--data-arg", "pixel_noise=inf"]) == 2
    one_line_error(capsys, "pixel_noise must be a finite number")


def test_empty_train_split(capsys):
    assert main(["train", *SMALL, "--data-arg", "test_fraction=0.99"]) == 2
    one_line_error(capsys, "'train' split")


def test_corrupt_image_file(tmp_path, capsys):
    root = make_zappos(tmp_path, split="train")
    (root / "ut-zap50k-images/Boots/b.jpg").write_bytes(b"not a jpeg")
    assert main(["train", "--data", "zappos", "--root", str(root), "--eval-split", "train", *TINY]) == 2
    one_line_error(capsys, "cannot decode image file", "b.jpg")


def test_diverged_run_exits_1(capsys):
    assert main(["train", *SMALL, "--lr", "1e12", "--momentum", "0.9", "--epochs", "3"]) == 1
    one_line_error(capsys, "run failed: training diverged")


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="test_every"):
        main(["train", *TINY, "--data-arg", "test_every=0", "--debug"])


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "taskrouting", *argv], capture_output=True, text=True, timeout=300)


def test_through_a_subprocess(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00" * 10)
    for argv, word in ((["train", "--lr", "inf"], "--lr"), (["train", "--device", "bogus"], "--device"),
                       (["train", *SMALL, "--out", str(tmp_path), "--resume"], "checkpoint")):
        done = _cli(*argv)
        lines = [line for line in done.stderr.splitlines() if "warn" not in line.lower()]
        assert done.returncode == 2 and len(lines) == 1 and word in lines[0] and "Traceback" not in done.stderr
