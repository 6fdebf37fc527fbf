"""The ``taskrouting`` command: ``train``, ``sweep`` and ``bench``.

    taskrouting train --data digits --model vgg11 --sharing-ratio 0.4 --epochs 35 --out runs/digits
    taskrouting sweep --data synthetic --data-arg num_tasks=300 --sharing-ratios 0,0.2,0.4,0.6,0.8,1
    taskrouting bench --quick
"""
from __future__ import annotations

import argparse
import ast
import importlib
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _value(text: str):
    """A --data-arg value: a Python literal (int, float, tuple, ...), true/false, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _data_arg(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), _value(value.strip())


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _task_selection(text: str):
    """``--tasks`` for train: K (the first K tasks) or comma-separated task names."""
    return int(text) if text.strip().isdigit() else [t.strip() for t in text.split(",") if t.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    from .data import DATASETS
    from .training.config import BN_EVAL, BN_EVAL_ALIASES, MODELS, TrainConfig

    d = TrainConfig()
    data = p.add_argument_group("data")
    data.add_argument("--data", default="digits", help=f"data set: {', '.join(DATASETS)} (default: digits)")
    data.add_argument("--root", type=Path, help="folder holding the data set's files (file-based data sets)")
    data.add_argument("--data-arg", type=_data_arg, action="append", default=[], metavar="KEY=VALUE",
                      help="keyword for the loader, e.g. num_tasks=300, relatedness=0.5, image_size=64 (repeatable)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="vgg11", choices=list(MODELS))
    model.add_argument("--width-mult", type=float, default=1.0, help="multiplies every conv width")
    model.add_argument("--pool-size", type=int, help="side of the pool before the heads (model default if unset)")
    model.add_argument("--embedding-dim", type=int, help="width of each task's embedding (model default if unset)")
    model.add_argument("--stats", choices=("batch", "routed"), default="batch")
    model.add_argument("--unfused", action="store_true", help="BatchNorm2d -> ReLU -> TaskRouter, not the fused op")
    model.add_argument("--backend", default="auto", help="fused op backend (auto, reference, cpu, cuda, triton)")
    train = p.add_argument_group("training (defaults: the paper's)")
    train.add_argument("--epochs", type=int, default=d.epochs)
    train.add_argument("--batch-size", type=int, default=d.batch_size)
    train.add_argument("--lr", type=float, default=d.lr)
    train.add_argument("--momentum", type=float, default=d.momentum)
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
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
    train.add_argument("--workers", type=int, default=d.num_workers, help="DataLoader workers decoding images")
    train.add_argument("--device", default=d.device)
    train.add_argument("--threads", type=int, help="torch CPU threads")
    run = p.add_argument_group("output")
    run.add_argument("--out", type=Path, help="folder for checkpoints and results (none: nothing written)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint(s) in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskrouting", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sweep,bench}")
    train = sub.add_parser("train", help="train and evaluate one model (Algorithm 1 of the paper)")
    _add_common(train)
    train.add_argument("--sharing-ratio", type=float, default=0.5, help="σ: fraction of channels per task")
    train.add_argument("--tasks", type=_task_selection, help="first K tasks, or comma-separated task names")
    train.add_argument("--max-rows", type=int, default=50, help="task rows to print (all are in per_task.csv)")
    sweep = sub.add_parser("sweep", help="train and evaluate for several σ (and task counts)")
    _add_common(sweep)
    sweep.add_argument("--sharing-ratios", type=_float_list, default=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    sweep.add_argument("--tasks", type=_int_list, help="task counts to sweep (the first K tasks), e.g. 10,50,100")
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
    kwargs = {"width_mult": args.width_mult, "stats": args.stats, "fused": not args.unfused, "backend": args.backend}
    for name in ("pool_size", "embedding_dim"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    return kwargs


def _config(args):
    from .training.config import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       weight_decay=args.weight_decay, seed=args.seed, hflip=args.hflip, eval_split=args.eval_split,
                       eval_batch_size=args.eval_batch_size, num_workers=args.workers, device=args.device,
                       bn_eval=args.bn_eval, bn_batches=args.bn_batches)


def _train(args, dataset) -> int:
    from .training.loop import run_experiment
    from .training.metrics import format_table

    results = run_experiment(dataset, args.model, args.sharing_ratio, _config(args), _model_kwargs(args), args.out,
                             args.resume, not args.no_progress)
    print(format_table(results["metrics"], results["baseline"], args.max_rows))
    means, base = results["means"], results["majority_baseline"]
    print(f"mean accuracy {100 * means['accuracy']:.2f}%  precision {100 * means['precision']:.2f}%  "
          f"recall {100 * means['recall']:.2f}%  f1 {100 * means['f1']:.2f}%")
    print(f"majority-class baseline: mean accuracy {100 * base['accuracy']:.2f}%")
    print(f"trained {results['train_seconds']:.1f} s, evaluated {results['eval_seconds']:.1f} s")
    if args.out is not None:
        print(f"results: {args.out / 'results.json'}, {args.out / 'per_task.csv'}")
    return 0


def _sweep(args, dataset) -> int:
    from .training.sweep import format_markdown, sweep

    rows = sweep(dataset, args.sharing_ratios, args.tasks, args.model, _model_kwargs(args), _config(args), args.out,
                 args.resume, not args.no_progress)
    print(format_markdown(rows))
    if args.out is not None:
        print(f"results: {args.out / 'sweep.md'}, sweep.csv, sweep.json, sweep.png")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``taskrouting`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    import torch

    from .data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tasks = args.tasks if args.command == "train" else None
        dataset = load_dataset(args.data, args.root, tasks=tasks, **dict(args.data_arg))
        return (_train if args.command == "train" else _sweep)(args, dataset)
    except (FileNotFoundError, ImportError, ValueError, KeyError, TypeError) as exc:
        print(f"taskrouting {args.command}: error: {exc}", file=sys.stderr)
        return 1
