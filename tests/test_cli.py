"""The ``taskrouting`` command on tiny runs: train, sweep, bench delegation, errors."""
from __future__ import annotations

import json
import subprocess
import sys
import types

from taskrouting.cli import main

TINY = ["--width-mult", "0.0625", "--pool-size", "1", "--embedding-dim", "8", "--epochs", "1", "--no-progress"]


def test_train_digits_prints_table_and_baseline(tmp_path, capsys):
    argv = ["train", "--data", "digits", "--data-arg", "image_size=8", "--model", "vgg11", "--sharing-ratio", "0.4",
            "--batch-size", "32", "--lr", "0.05", "--momentum", "0.9", "--seed", "3", "--out", str(tmp_path), *TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "digit_9" in out and "mean (10 tasks)" in out and "majority-class baseline: mean accuracy" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["sharing_ratio"] == 0.4 and results["config"]["seed"] == 3 and results["num_tasks"] == 10
    assert main([*argv[:-len(TINY)], *TINY[:-3], "--epochs", "2", "--resume", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["history"][-1]["epoch"] == 2


def test_train_selects_tasks_by_name(capsys):
    argv = ["train", "--data", "digits", "--data-arg", "image_size=8", "--tasks", "digit_1,digit_7", *TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mean (2 tasks)" in out and "digit_7" in out and "digit_0" not in out


def test_sweep_synthetic(tmp_path, capsys):
    argv = ["sweep", "--data", "synthetic", "--data-arg", "num_tasks=6", "--data-arg", "num_samples=200",
            "--data-arg", "image_size=8", "--data-arg", "positive_rate=(0.2,0.5)", "--tasks", "3,6",
            "--sharing-ratios", "0.5,1", "--out", str(tmp_path), *TINY]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| σ = 1 |" in out and "| σ = 0.5 |" in out and "6 tasks Recall" in out
    assert (tmp_path / "sweep.png").is_file() and (tmp_path / "tasks6_sigma0.5" / "results.json").is_file()


def test_sweep_seeds_start_at_zero_and_bad_seeds_are_one_line_errors(capsys):
    from taskrouting.cli import build_parser

    assert build_parser().parse_args(["sweep", "--seeds", "0,1,2"]).seeds == [0, 1, 2]  # the README's command
    for bad, message in (("-1", "expected an integer >= 0"), ("0,0", "expected distinct seeds"), ("a", "integer")):
        assert main(["sweep", "--seeds", bad]) == 2
        err = capsys.readouterr().err
        assert "--seeds" in err and message in err and "Traceback" not in err


def test_bench_is_delegated(monkeypatch):
    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 7)
    monkeypatch.setitem(sys.modules, "taskrouting.bench", fake)
    assert main(["bench", "--quick", "--tasks", "1,2"]) == 7 and seen == [["--quick", "--tasks", "1,2"]]


def test_bench_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "taskrouting.bench", None)
    assert main(["bench"]) == 2
    assert "taskrouting.bench is not installed" in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["train", "--data", "celeba", "--root", str(tmp_path), *TINY]) == 2
    assert "list_attr_celeba.txt" in capsys.readouterr().err
    assert main(["train", "--data", "nope", *TINY]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["sweep", "--sharing-ratios", "a,b"]) == 2
    assert "--sharing-ratios" in capsys.readouterr().err


def test_python_dash_m_help():
    done = subprocess.run([sys.executable, "-m", "taskrouting", "train", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--sharing-ratio" in done.stdout and "--resume" in done.stdout
