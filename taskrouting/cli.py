"""The ``taskrouting`` command: ``train``, ``sweep`` and ``bench``.

    taskrouting train --data digits --model vgg11 --sharing-ratio 0.4 --epochs 35 --out runs/digits
    taskrouting sweep --data synthetic --data-arg num_tasks=300 --sharing-ratios 0,0.2,0.4,0.6,0.8,1
    taskrouting bench --quick

Exit status: 0 done; 1 the run failed (training diverged: non-finite loss or weights); 2 a mistake in the
command or its inputs (a flag, a data file, a checkpoint), told in one line on stderr (--debug: the traceback).
"""
from __future__ import annotations

import argparse
import ast
import importlib
import math
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "UsageError"]


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}")


def _value(text: str):
    """A --data-arg value: a Python literal (int, float, tuple, ...), true/false, inf/nan, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _ratio(text: str) -> float:
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a sharing ratio is in [0, 1], got {text!r}")
    return value


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _data_arg(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), _value(value.strip())


def _ratio_list(text: str) -> list[float]:
    values = [_ratio(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated sharing ratios, got {text!r}")
    return values


def _int_list(text: str, least: int = 1) -> list[int]:
    values = [_int_at_least(v, least) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def _seed_list(text: str) -> list[int]:
    """``--seeds``: distinct integers >= 0 (a seed of 0 is the default one)."""
    values = _int_list(text, 0)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return values


def _task_selection(text: str):
    """``--tasks`` for train: K (the first K tasks) or comma-separated task names."""
    return int(text) if text.strip().isdigit() else [t.strip() for t in text.split(",") if t.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    from .data import DATASETS
    from .training.batches import TASK_SAMPLING
    from .training.config import BN_EVAL, BN_EVAL_ALIASES, MODELS, TrainConfig

    d = TrainConfig()
    data = p.add_argument_group("data")
    data.add_argument("--data", default="digits", help=f"data set: {', '.join(DATASETS)} (default: digits)")
    data.add_argument("--root", type=Path, help="folder holding the data set's files (file-based data sets)")
    data.add_argument("--data-arg", type=_data_arg, action="append", default=[], metavar="KEY=VALUE",
                      help="keyword for the loader, e.g. num_tasks=300, relatedness=0.5, image_size=64 (repeatable)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="vgg11", choices=list(MODELS))
    model.add_argument("--width-mult", type=_finite, default=1.0, help="multiplies every conv width")
    model.add_argument("--pool-size", type=int, help="side of the pool before the heads (model default if unset)")
    model.add_argument("--embedding-dim", type=int, help="width of each task's embedding (model default if unset)")
    model.add_argument("--stats", choices=("batch", "routed"), default="batch")
    model.add_argument("--unfused", action="store_true", help="BatchNorm2d -> ReLU -> TaskRouter, not the fused op")
    model.add_argument("--backend", default="auto", help="fused op backend (auto, reference, cpu, cuda, triton)")
    model.add_argument("--no-task-stats", dest="task_stats", action="store_false",
                       help="one set of BatchNorm running statistics for all tasks (default: one per task, so that "
                            "--bn-eval stored fits each task)")
    model.add_argument("--memory-efficient", action="store_true",
                       help="rebuild the fused layers' outputs in backward instead of keeping them (less memory)")
    train = p.add_argument_group("training (defaults: the paper's)")
    train.add_argument("--epochs", type=int, default=d.epochs)
    train.add_argument("--batch-size", type=int, default=d.batch_size)
    train.add_argument("--lr", type=_finite, default=d.lr)
    train.add_argument("--momentum", type=_finite, default=d.momentum)
    train.add_argument("--weight-decay", type=_finite, default=d.weight_decay)
    train.add_argument("--seed", type=int, default=d.seed)
    flips = train.add_mutually_exclusive_group()
    flips.add_argument("--flip", dest="hflip", action="store_true", default=None, help="random horizontal flips")
    flips.add_argument("--no-flip", dest="hflip", action="store_false", help="no flips (default: as the data set says)")
    train.add_argument("--eval-split", default=d.eval_split, help="split to evaluate on (default: test)")
    train.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    train.add_argument("--bn-eval", choices=(*BN_EVAL, *BN_EVAL_ALIASES), default=d.bn_eval,
                       help="BatchNorm statistics at evaluation: stored = plain model.eval() with what the layers "
                            "hold (each task's own with per-task statistics; default), recalibrate = re-estimated "
                            "per task on training batches, batch = the evaluation batch's "
                            "(per-task and running: old names of recalibrate and stored)")
    train.add_argument("--bn-batches", type=int, default=d.bn_batches,
                       help="training batches per task for --bn-eval recalibrate")
    train.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                       help="mixed precision: autocast to bf16 (CPU and CUDA) or fp16 (with loss scaling)")
    train.add_argument("--channels-last", action="store_true",
                       help="model and inputs in channels_last memory format")
    train.add_argument("--task-sampling", choices=TASK_SAMPLING, default=d.task_sampling,
                       help="task of each batch: drawn uniformly (default, the paper) or round-robin over tasks")
    train.add_argument("--val-fraction", type=float, default=d.val_fraction,
                       help="hold out this fraction of the train split, evaluate on it and report the test "
                            "scores of the epoch with the best validation mean F1 (default 0: the last epoch)")
    train.add_argument("--eval-every", type=int, default=d.eval_every,
                       help="with --val-fraction: evaluate on the held-out part every this many epochs")
    train.add_argument("--workers", type=int, default=d.num_workers, help="DataLoader workers decoding images")
    train.add_argument("--device", default=d.device)
    train.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    run = p.add_argument_group("output")
    run.add_argument("--out", type=Path, help="folder for checkpoints and results (none: nothing written)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint(s) in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--debug", action="store_true", help="on an error, show the traceback")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="taskrouting", description=__doc__.split("\n\n")[0],
                     epilog=__doc__.split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sweep,bench}")
    train = sub.add_parser("train", help="train and evaluate one model (Algorithm 1 of the paper)")
    _add_common(train)
    train.add_argument("--sharing-ratio", type=_ratio, default=0.5, help="σ: fraction of channels per task")
    train.add_argument("--tasks", type=_task_selection, help="first K tasks, or comma-separated task names")
    train.add_argument("--max-rows", type=int, default=50, help="task rows to print (all are in per_task.csv)")
    sweep = sub.add_parser("sweep", help="train and evaluate for several σ (and task counts)")
    _add_common(sweep)
    sweep.add_argument("--sharing-ratios", type=_ratio_list, default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    sweep.add_argument("--tasks", type=_int_list, help="task counts to sweep (the first K tasks), e.g. 10,50,100")
    sweep.add_argument("--seeds", type=_seed_list, help="run every setting for each of these seeds, e.g. 0,1,2; "
                                                      "the table gives mean ± std (runs in --out merge)")
    sweep.add_argument("--single-task", type=int, metavar="N",
                       help="also train single-task baselines for N tasks (a fixed sample) and report Δm")
    sub.add_parser("bench", help="benchmark the fused op (see: taskrouting bench --help)", add_help=False)
    return parser


def _bench(argv: list[str]) -> int:
    try:
        bench = importlib.import_module("taskrouting.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "taskrouting.bench":
            raise
        print("taskrouting bench: the benchmark module taskrouting.bench is not installed", file=sys.stderr)
        return 2
    return bench.main(argv)


def _model_kwargs(args) -> dict:
    kwargs = {"width_mult": args.width_mult, "stats": args.stats, "fused": not args.unfused, "backend": args.backend,
              "task_stats": args.task_stats, "memory_efficient": args.memory_efficient}
    for name in ("pool_size", "embedding_dim"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


_FLAGS = {"num_workers": "--workers", "hflip": "--flip/--no-flip"}  # TrainConfig fields whose flag is not --<field>


def _config(args):
    from .training.config import ConfigError, TrainConfig

    try:
        return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, seed=args.seed, hflip=args.hflip,
                           eval_split=args.eval_split, eval_batch_size=args.eval_batch_size, num_workers=args.workers,
                           device=args.device, bn_eval=args.bn_eval, bn_batches=args.bn_batches,
                           task_sampling=args.task_sampling, val_fraction=args.val_fraction,
                           eval_every=args.eval_every, amp=args.amp, channels_last=args.channels_last)
    except ConfigError as exc:
        flag = _FLAGS.get(exc.field, "--" + exc.field.replace("_", "-"))
        raise UsageError(f"taskrouting {args.command}: error: argument {flag}: {exc}") from None


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"argument --device: {device!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if kind.type not in ("cpu", "cuda"):
        raise UsageError(f"argument --device: training runs on cpu or cuda, not {device!r}")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"argument --device: {device!r}: CUDA is not available on this machine")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise UsageError(f"argument --device: {device!r}: this machine has {torch.cuda.device_count()} CUDA devices")


def _check_backend(backend: str, device: str) -> None:
    import torch

    from .ops.backends import BACKENDS

    if backend == "auto":
        return
    if backend not in BACKENDS:
        raise UsageError(f"argument --backend: expected auto or one of {', '.join(BACKENDS)}, got {backend!r}")
    chosen = BACKENDS[backend]
    if not chosen.available(torch.device(device)):
        raise UsageError(f"argument --backend: {backend!r} cannot run on --device {device}: "
                         f"{chosen.why_not(torch.device(device))}")


def _check_out(out: Path | None) -> None:
    """A clear error now, rather than after training, when the results cannot be written to ``out``."""
    if out is None:
        return
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"argument --out: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"argument --out: cannot write to {str(existing)!r} (permission denied)")


def _check_args(args) -> None:
    for check in (lambda: _check_device(args.device), lambda: _check_backend(args.backend, args.device),
                  lambda: _check_out(args.out)):
        try:
            check()
        except UsageError as exc:
            raise UsageError(f"taskrouting {args.command}: error: {exc}") from None


def _train(args, dataset, config) -> int:
    from .training import distributed
    from .training.loop import run_experiment
    from .training.metrics import format_table

    config = distributed.setup(config)  # joins torchrun's process group, if launched by torchrun
    results = run_experiment(dataset, args.model, args.sharing_ratio, config, _model_kwargs(args), args.out,
                             args.resume, not args.no_progress)
    if not distributed.is_main():
        return 0
    print(format_table(results["metrics"], results["baseline"], args.max_rows))
    means, base = results["means"], results["majority_baseline"]
    print(f"mean accuracy {100 * means['accuracy']:.2f}%  precision {100 * means['precision']:.2f}%  "
          f"recall {100 * means['recall']:.2f}%  f1 {100 * means['f1']:.2f}%")
    print(f"majority-class baseline: mean accuracy {100 * base['accuracy']:.2f}%")
    print(f"trained {results['train_seconds']:.1f} s, evaluated {results['eval_seconds']:.1f} s")
    if args.out is not None:
        print(f"results: {args.out / 'results.json'}, {args.out / 'per_task.csv'}")
    return 0


def _sweep(args, dataset, config) -> int:
    from .training.sweep import format_markdown, sweep

    rows = sweep(dataset, args.sharing_ratios, args.tasks, args.model, _model_kwargs(args), config, args.out,
                 args.resume, not args.no_progress, seeds=args.seeds, single_task=args.single_task)
    print(format_markdown(rows))
    if args.out is not None:
        print(f"results: {args.out / 'sweep.md'}, sweep.csv, sweep.json, sweep_summary.csv, sweep.png")
        print(f"the table covers every finished run in {args.out}, this call's and earlier ones'")
    return 0


def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split())  # one line


def _run(args) -> int:
    import torch

    from .data import load_dataset

    _check_args(args)
    config = _config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = args.tasks if args.command == "train" else None
    try:
        dataset = load_dataset(args.data, args.root, tasks=tasks, **dict(args.data_arg))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if args.debug:
            raise
        raise UsageError(f"taskrouting {args.command}: error: --data {args.data}: {_message(exc)}") from None
    return (_train if args.command == "train" else _sweep)(args, dataset, config)


def main(argv=None) -> int:
    """Entry point of the ``taskrouting`` command; returns the exit status (see the module docstring)."""
    from .training.loop import TrainingDiverged

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(_message(exc), file=sys.stderr)
        return 2
    try:
        return _run(args)
    except UsageError as exc:
        print(_message(exc), file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        if args.debug:
            raise
        print(f"taskrouting {args.command}: run failed: {_message(exc)}", file=sys.stderr)
        return 1
    except (OSError, ImportError, ValueError, KeyError, TypeError) as exc:
        if args.debug:
            raise
        print(f"taskrouting {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2
