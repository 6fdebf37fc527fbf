"""Sweep the sharing ratio σ (and optionally the number of tasks): train and evaluate each
setting, then write a table like the paper's Tables 1 and 2 and plots of the scores against σ
(and against the number of tasks)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from ..data import MultiTaskDataset
from ..extras import MissingExtraError, require
from .config import ModelBuildError, TrainConfig
from .loop import run_experiment
from .results import write_csv, write_json

__all__ = ["sweep", "format_markdown", "plot_sweep", "write_sweep", "SCORES"]

SCORES = ("accuracy", "precision", "recall")


def _run_dir(out: Path, num_tasks: int, sharing_ratio: float) -> Path:
    return out / f"tasks{num_tasks}_sigma{sharing_ratio:g}"


def _row(num_tasks: int, sharing_ratio: float, results: dict | None, error: str = "") -> dict:
    if results is None:
        return {"num_tasks": num_tasks, "sharing_ratio": sharing_ratio, **{k: math.nan for k in (*SCORES, "f1")},
                "majority_accuracy": math.nan, "final_loss": math.nan, "train_seconds": math.nan, "error": error}
    history = results["history"]
    row = {"num_tasks": num_tasks, "sharing_ratio": sharing_ratio, **results["means"],
           "majority_accuracy": results["majority_baseline"]["accuracy"],
           "final_loss": history[-1]["loss"] if history else math.nan,
           "train_seconds": results["train_seconds"], "error": ""}
    return {k: math.nan if v is None else v for k, v in row.items()}  # JSON wrote nan as null


def sweep(dataset: MultiTaskDataset, sharing_ratios, task_counts=None, model_name: str = "vgg11",
          model_kwargs: dict | None = None, config: TrainConfig | None = None, out=None, resume: bool = False,
          progress: bool = True, log=print) -> list[dict]:
    """One run per (task count, σ): the first ``k`` tasks of ``dataset`` (all when ``task_counts``
    is None), same seed for every run. Each run writes into ``out/tasks<k>_sigma<σ>/``; with
    ``resume``, finished runs are read back and interrupted ones continue from their checkpoint.
    A setting the model cannot be built for (σ = 0 with more tasks than channels) is reported
    as n/a. Returns one row of mean scores per run; with ``out``, writes the table and plots."""
    config = config or TrainConfig()
    out = Path(out) if out is not None else None
    rows = []
    for num_tasks in task_counts or [dataset.num_tasks]:
        data = dataset if num_tasks == dataset.num_tasks else dataset.select_tasks(num_tasks)
        for sharing_ratio in sharing_ratios:
            run_dir = _run_dir(out, num_tasks, sharing_ratio) if out is not None else None
            log(f"== {num_tasks} tasks, sharing ratio {sharing_ratio:g}")
            if resume and run_dir is not None and (run_dir / "results.json").is_file():
                results = json.loads((run_dir / "results.json").read_text())
                if results.get("history") and results["history"][-1]["epoch"] >= config.epochs:
                    rows.append(_row(num_tasks, sharing_ratio, results))
                    continue
            try:
                results = run_experiment(data, model_name, sharing_ratio, config, model_kwargs, run_dir, resume,
                                         progress, log)
            except ModelBuildError as exc:
                log(f"   n/a: {exc}")
                rows.append(_row(num_tasks, sharing_ratio, None, str(exc)))
                continue
            rows.append(_row(num_tasks, sharing_ratio, results))
            log("   " + ", ".join(f"{k} {100 * rows[-1][k]:.1f}" for k in (*SCORES, "majority_accuracy")))
    if out is not None:
        write_sweep(rows, out)
    return rows


def _sigma_order(sharing_ratios) -> list[float]:
    """The paper's row order: σ = 0 and σ = 1 (no sharing, hard sharing) first, then the rest."""
    ends = [s for s in (0.0, 1.0) if s in sharing_ratios]
    return ends + sorted(s for s in sharing_ratios if s not in ends)


def _cell(value: float, best: bool) -> str:
    if math.isnan(value):
        return "n/a"
    return f"**{100 * value:.1f}**" if best else f"{100 * value:.1f}"


def format_markdown(rows: list[dict]) -> str:
    """Rows σ, columns (task count × accuracy/precision/recall), best per column in bold, scores in %;
    the last row is the majority-class baseline's accuracy."""
    counts = sorted({r["num_tasks"] for r in rows})
    sigmas = _sigma_order(sorted({r["sharing_ratio"] for r in rows}))
    table = {(r["num_tasks"], r["sharing_ratio"]): r for r in rows}
    header = ["Approach"] + [f"{k} tasks {s.capitalize()}" for k in counts for s in SCORES]
    best = {(k, s): max((r[s] for r in rows if r["num_tasks"] == k and not math.isnan(r[s])), default=math.nan)
            for k in counts for s in SCORES}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sigma in sigmas:
        cells = [f"σ = {sigma:g}"]
        for k in counts:
            row = table.get((k, sigma))
            cells += [_cell(row[s] if row else math.nan, bool(row) and row[s] == best[(k, s)]) for s in SCORES]
        lines.append("| " + " | ".join(cells) + " |")
    baseline = ["majority class"]
    for k in counts:
        accuracy = next((r["majority_accuracy"] for r in rows if r["num_tasks"] == k
                         and not math.isnan(r["majority_accuracy"])), math.nan)
        baseline += [_cell(accuracy, False), "", ""]
    lines.append("| " + " | ".join(baseline) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], out: Path) -> list[Path]:
    """``sweep.png``: accuracy, precision, recall against σ (a line per task count); with several
    task counts, also ``sweep_tasks.png``: the same against the number of tasks (a line per σ)."""
    Figure = require("matplotlib.figure", "plot", "plotting the sweep").Figure  # no pyplot: Agg, no display

    counts = sorted({r["num_tasks"] for r in rows})
    sigmas = sorted({r["sharing_ratio"] for r in rows})
    plots = [("sweep.png", "sharing ratio σ", "sharing_ratio", "num_tasks", counts, "{:g} tasks")]
    if len(counts) > 1:
        plots.append(("sweep_tasks.png", "number of tasks", "num_tasks", "sharing_ratio", sigmas, "σ = {:g}"))
    paths = []
    for name, xlabel, x_key, line_key, line_values, label in plots:
        fig = Figure(figsize=(12, 3.6), layout="constrained")
        for axes, score in zip(fig.subplots(1, 3), SCORES):
            for value in line_values:
                points = sorted((r[x_key], 100 * r[score]) for r in rows
                                if r[line_key] == value and not math.isnan(r[score]))
                if not points:
                    continue
                (line,) = axes.plot(*zip(*points), marker="o", label=label.format(value))
                base = [r["majority_accuracy"] for r in rows if r[line_key] == value
                        and not math.isnan(r["majority_accuracy"])]
                if score == "accuracy" and x_key == "sharing_ratio" and base:
                    axes.axhline(100 * base[0], linestyle="--", linewidth=1, color=line.get_color(),
                                 label=f"majority class, {label.format(value)}")
            axes.set(xlabel=xlabel, ylabel=f"mean {score} (%)", title=score)
            axes.grid(alpha=0.3)
        fig.axes[0].legend(fontsize="small")
        fig.savefig(out / name, dpi=120)
        paths.append(out / name)
    return paths


def write_sweep(rows: list[dict], out: Path) -> None:
    """``sweep.csv``, ``sweep.json``, ``sweep.md`` and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sweep.csv")
    write_json(rows, out / "sweep.json")
    (out / "sweep.md").write_text(format_markdown(rows))
    try:
        plot_sweep(rows, out)
    except MissingExtraError as exc:  # the tables are written; the plots are optional
        warnings.warn(f"plots skipped: {exc}", stacklevel=2)
